"""TransformerLens 3.9 references for GPT-NeoX, GPT-J, OPT and Phi, built offline from an HF model.

As tests/tl_reference.py: the config is written by hand from the HF config (TransformerLens's
`from_pretrained` needs the hub), following TransformerLens's own per-architecture config code,
and the weights go through its converters, cloned (they return views of the HF parameters).
"""
from __future__ import annotations

from tl_reference import build_tl_model, detached_copy


def _rotary_dim(hf) -> int:
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    if type(hf).__name__ == "GPTJForCausalLM":
        return c.rotary_dim or d_head
    return int(d_head * c.rope_parameters.get("partial_rotary_factor", 1.0))


def tl_config(hf):
    from transformer_lens import HookedTransformerConfig

    c = hf.config
    arch = type(hf).__name__
    common = dict(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                  d_head=c.hidden_size // c.num_attention_heads, d_vocab=c.vocab_size,
                  n_ctx=c.max_position_embeddings, normalization_type="LN", original_architecture=arch,
                  device="cpu", dtype=next(hf.parameters()).dtype, default_prepend_bos=False)
    if arch == "GPTNeoXForCausalLM":
        return HookedTransformerConfig(**common, d_mlp=c.intermediate_size, eps=c.layer_norm_eps,
                                       act_fn=c.hidden_act, parallel_attn_mlp=c.use_parallel_residual,
                                       positional_embedding_type="rotary", rotary_adjacent_pairs=False,
                                       rotary_dim=_rotary_dim(hf))
    if arch == "GPTJForCausalLM":
        return HookedTransformerConfig(**common, d_mlp=c.n_inner or 4 * c.hidden_size, eps=c.layer_norm_epsilon,
                                       act_fn=c.activation_function, parallel_attn_mlp=True,
                                       positional_embedding_type="rotary", rotary_adjacent_pairs=True,
                                       rotary_dim=_rotary_dim(hf))
    if arch == "OPTForCausalLM":
        return HookedTransformerConfig(**common, d_mlp=c.ffn_dim, eps=1e-5, act_fn=c.activation_function,
                                       positional_embedding_type="standard")
    if arch == "PhiForCausalLM":
        return HookedTransformerConfig(**common, d_mlp=c.intermediate_size, eps=c.layer_norm_eps,
                                       act_fn=c.hidden_act, parallel_attn_mlp=True,
                                       positional_embedding_type="rotary", rotary_dim=_rotary_dim(hf),
                                       rotary_base=c.rope_parameters["rope_theta"])
    raise NotImplementedError(f"no TransformerLens reference builder for {arch}")


def tl_state_dict(hf, cfg) -> dict:
    from transformer_lens.pretrained.weight_conversions import convert_gptj_weights, convert_neox_weights, \
        convert_opt_weights, convert_phi_weights

    convert = {"GPTNeoXForCausalLM": convert_neox_weights, "GPTJForCausalLM": convert_gptj_weights,
               "OPTForCausalLM": convert_opt_weights, "PhiForCausalLM": convert_phi_weights}[type(hf).__name__]
    return detached_copy(convert(hf, cfg))


def tl_model(hf, **processing):
    """TransformerLens HookedTransformer with `hf`'s weights (no processing unless flags are given)."""
    cfg = tl_config(hf)
    return build_tl_model(cfg, tl_state_dict(hf, cfg), **processing)
