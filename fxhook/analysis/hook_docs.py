"""A one-line meaning and the axes of every hook point, by TransformerLens name (for listings)."""
from __future__ import annotations

import re

# name with the block index replaced by L -> (axes, meaning)
HOOK_DOCS: dict[str, tuple[str, str]] = {
    "hook_embed": ("batch pos d_model", "token embedding"),
    "hook_pos_embed": ("batch pos d_model", "learned position embedding"),
    "blocks.L.hook_resid_pre": ("batch pos d_model", "residual stream entering the block"),
    "blocks.L.ln1.hook_scale": ("batch pos 1", "norm scale before attention: sqrt(var+eps); RMS: sqrt(mean x^2+eps)"),
    "blocks.L.ln1.hook_normalized": ("batch pos d_model", "normalised input to attention (before the norm's weight)"),
    "blocks.L.hook_attn_in": ("batch pos head d_model", "attention input, one copy per head"),
    "blocks.L.hook_q_input": ("batch pos head d_model", "query input, one copy per head"),
    "blocks.L.hook_k_input": ("batch pos head d_model", "key input, one copy per head"),
    "blocks.L.hook_v_input": ("batch pos head d_model", "value input, one copy per head"),
    "blocks.L.attn.hook_q": ("batch pos head d_head", "queries (before rotary)"),
    "blocks.L.attn.hook_k": ("batch pos kv_head d_head", "keys (before rotary; key/value heads under GQA)"),
    "blocks.L.attn.hook_v": ("batch pos kv_head d_head", "values (key/value heads under GQA)"),
    "blocks.L.attn.hook_rot_q": ("batch pos head d_head", "queries after rotary position embedding"),
    "blocks.L.attn.hook_rot_k": ("batch pos kv_head d_head", "keys after rotary position embedding"),
    "blocks.L.attn.hook_attn_scores": ("batch head query_pos key_pos", "scaled attention scores, -inf where masked"),
    "blocks.L.attn.hook_pattern": ("batch head query_pos key_pos", "attention pattern (softmax of the scores)"),
    "blocks.L.attn.hook_z": ("batch pos head d_head", "attention-weighted values, before the output projection"),
    "blocks.L.attn.hook_result": ("batch pos head d_model", "each head's output to the residual stream"),
    "blocks.L.hook_attn_out": ("batch pos d_model", "attention output added to the residual stream"),
    "blocks.L.hook_resid_mid": ("batch pos d_model", "residual stream between attention and MLP"),
    "blocks.L.ln2.hook_scale": ("batch pos 1", "norm scale before the MLP"),
    "blocks.L.ln2.hook_normalized": ("batch pos d_model", "normalised input to the MLP (before the norm's weight)"),
    "blocks.L.hook_mlp_in": ("batch pos d_model", "MLP input"),
    "blocks.L.mlp.hook_pre": ("batch pos d_mlp", "MLP pre-activation (the gate branch when gated)"),
    "blocks.L.mlp.hook_pre_linear": ("batch pos d_mlp", "linear (up) branch of a gated MLP"),
    "blocks.L.mlp.hook_post": ("batch pos d_mlp", "MLP neuron activations (times the linear branch when gated)"),
    "blocks.L.hook_mlp_out": ("batch pos d_model", "MLP output added to the residual stream"),
    "blocks.L.hook_resid_post": ("batch pos d_model", "residual stream leaving the block"),
    # family-specific (Gemma 2 post norms, Qwen3 / OLMo 2 q/k norms, Mixtral routing)
    "blocks.L.ln1_post.hook_scale": ("batch pos 1", "scale of the norm after attention (Gemma 2)"),
    "blocks.L.ln1_post.hook_normalized": ("batch pos d_model", "attention output, normalised (Gemma 2)"),
    "blocks.L.ln2_post.hook_scale": ("batch pos 1", "scale of the norm after the MLP (Gemma 2)"),
    "blocks.L.ln2_post.hook_normalized": ("batch pos d_model", "MLP output, normalised (Gemma 2)"),
    "blocks.L.attn.q_norm.hook_scale": ("batch pos ...", "scale of the query norm (per head; OLMo 2: all heads)"),
    "blocks.L.attn.q_norm.hook_normalized": ("batch pos ...", "normalised queries"),
    "blocks.L.attn.k_norm.hook_scale": ("batch pos ...", "scale of the key norm (per head; OLMo 2: all heads)"),
    "blocks.L.attn.k_norm.hook_normalized": ("batch pos ...", "normalised keys"),
    "blocks.L.mlp.hook_expert_weights": ("batch pos n_experts", "router softmax over all experts, before top-k"),
    "blocks.L.mlp.hook_expert_indices": ("batch pos k", "the experts each token is routed to"),
    "ln_final.hook_scale": ("batch pos 1", "final norm scale"),
    "ln_final.hook_normalized": ("batch pos d_model", "normalised final residual stream, read by the unembedding"),
}


def generic_name(name: str) -> str:
    """"blocks.12.attn.hook_q" -> "blocks.L.attn.hook_q"."""
    return re.sub(r"^blocks\.\d+\.", "blocks.L.", name)


def describe(name: str) -> tuple[str, str]:
    """(axes, meaning) of a hook point; ("", "") for one this table does not know."""
    return HOOK_DOCS.get(generic_name(name), ("", ""))
