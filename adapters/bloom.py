"""Bloom: refused, with the reason (ALiBi family; see README, "Architectures").

Supporting Bloom would cost far more than an adapter:
- BloomAttention computes attention inline (alibi.baddbmm, its own softmax) instead of going
  through transformers' attention registry, so fxhook's capture cannot mark q/k/v, the scores,
  the pattern or z there, nor keep attention one op for the passes and the KV cache;
- its attention and MLP modules add the residual stream inside themselves (dropout_add), so
  their outputs are not hook_attn_out / hook_mlp_out;
- the ALiBi bias (a per-head slope times the key position from the padding mask) would have to
  be an input of fxhook's attention op and of its decode graph.
Each needs Bloom-specific code in fxhook/, which the adapter design rules out.
"""

BLOOM_REFUSAL = (
    "Bloom (ALiBi) is not supported: BloomAttention computes attention inline rather than through "
    "transformers' attention registry (fxhook cannot mark q/k/v, scores, pattern or z in it), and its "
    "attention and MLP modules add the residual inside themselves. Supporting it needs a Bloom "
    "attention re-implementation with the ALiBi bias in fxhook/, not an adapter (see adapters/bloom.py).")

REFUSED: dict[str, str] = {"BloomForCausalLM": BLOOM_REFUSAL}
