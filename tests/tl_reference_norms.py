"""TransformerLens 3.9 references for Gemma, Gemma 2, Qwen3, OLMo 2 and Mixtral, built offline.

As tests/tl_reference.py: the config is written by hand from the HF config, following TransformerLens's
own per-architecture config code (loading_from_pretrained.py), and the weights go through its
converters, cloned. Its converters drop attention biases, so compare bias-free models only.
"""
from __future__ import annotations

from tl_reference import _rope_theta, build_tl_model, detached_copy


def tl_config(hf):
    from transformer_lens import HookedTransformerConfig

    c = hf.config
    arch = type(hf).__name__
    n_kv = c.num_key_value_heads
    cfg = dict(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
               d_head=c.head_dim, d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings,
               eps=c.rms_norm_eps, normalization_type="RMS", positional_embedding_type="rotary",
               rotary_dim=c.head_dim, rotary_adjacent_pairs=False, rotary_base=_rope_theta(c), gated_mlp=True,
               final_rms=True, n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
               act_fn=getattr(c, "hidden_act", None) or c.hidden_activation, original_architecture=arch, device="cpu", dtype=next(hf.parameters()).dtype,
               default_prepend_bos=False)
    if arch.startswith(("Gemma", "Mixtral")):  # TransformerLens's converter always writes grouped (_W_K) keys
        cfg["n_key_value_heads"] = n_kv
    if arch == "Gemma2ForCausalLM":
        cfg.update(attn_scale=c.query_pre_attn_scalar ** 0.5,
                   attn_scores_soft_cap=c.attn_logit_softcapping, output_logits_soft_cap=c.final_logit_softcapping,
                   use_normalization_before_and_after=True, use_local_attn=True, window_size=c.sliding_window,
                   attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types])
    elif arch == "Qwen3ForCausalLM":
        cfg.update(use_qk_norm=True)
    elif arch == "MixtralForCausalLM":
        cfg.update(num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok, norm_topk_prob=True)
    elif arch not in ("GemmaForCausalLM", "Olmo2ForCausalLM"):
        raise NotImplementedError(f"no TransformerLens reference builder for {arch}")
    return HookedTransformerConfig(**cfg)


def tl_state_dict(hf, cfg) -> dict:
    from transformer_lens.pretrained.weight_conversions import (convert_gemma_weights, convert_mixtral_weights,
                                                                convert_olmo2_weights, convert_qwen3_weights)

    convert = {"GemmaForCausalLM": convert_gemma_weights, "Gemma2ForCausalLM": convert_gemma_weights,
               "Qwen3ForCausalLM": convert_qwen3_weights, "Olmo2ForCausalLM": convert_olmo2_weights,
               "MixtralForCausalLM": convert_mixtral_weights}[type(hf).__name__]
    return detached_copy(convert(hf, cfg))


def tl_model(hf, **processing):
    """TransformerLens HookedTransformer with `hf`'s weights (no processing unless flags are given)."""
    cfg = tl_config(hf)
    return build_tl_model(cfg, tl_state_dict(hf, cfg), **processing)
