"""TransformerLens 3.9 as a test oracle, built offline from an in-memory HF model.

`tl_model(hf)` builds a TransformerLens `HookedTransformer` with the same weights
as `hf` (a GPT2LMHeadModel or a Llama-family model: Llama, Mistral, Qwen2). By
default no weight processing is applied; pass `fold_ln=True` etc. to get
TransformerLens's processed model (same flags as `load_and_process_state_dict`).

TransformerLens's `from_pretrained` needs the hub even when given `hf_model=`,
so the config is written by hand from the HF config (design.md, "TransformerLens
as a test oracle") and the weights go through TransformerLens's converters.
"""
from __future__ import annotations

import warnings

NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                     fold_value_biases=False)


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def tl_config(hf):
    """A TransformerLens HookedTransformerConfig describing `hf`."""
    from transformer_lens import HookedTransformerConfig

    c = hf.config
    arch = type(hf).__name__
    dtype = next(hf.parameters()).dtype
    if arch == "GPT2LMHeadModel":
        return HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
            n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size,
            act_fn=c.activation_function, eps=c.layer_norm_epsilon, normalization_type="LN",
            positional_embedding_type="standard", original_architecture=arch, device="cpu", dtype=dtype,
            default_prepend_bos=False)
    if arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_kv = c.num_key_value_heads
        return HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=c.max_position_embeddings,
            d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size, act_fn=c.hidden_act, eps=c.rms_norm_eps, normalization_type="RMS",
            positional_embedding_type="rotary", rotary_dim=d_head, rotary_adjacent_pairs=False,
            rotary_base=_rope_theta(c), gated_mlp=True, final_rms=True,
            n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
            original_architecture=arch, device="cpu", dtype=dtype, default_prepend_bos=False)
    raise NotImplementedError(f"no TransformerLens reference builder for {arch}")


def _llama_biases(hf, cfg, sd: dict) -> None:
    """convert_llama_weights writes zero biases; carry over the HF model's real ones.

    TransformerLens's gated MLP cannot represent gate_proj or up_proj biases (it has
    no gate bias, and adds b_in after act(gate) * up rather than inside the up
    projection): refuse nonzero ones rather than compare different models.
    """
    gqa = "_" if cfg.n_key_value_heads is not None else ""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    for l, layer in enumerate(hf.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for proj, key, heads in ((attn.q_proj, "b_Q", cfg.n_heads), (attn.k_proj, gqa + "b_K", n_kv),
                                 (attn.v_proj, gqa + "b_V", n_kv)):
            if proj.bias is not None:
                sd[f"blocks.{l}.attn.{key}"] = proj.bias.reshape(heads, cfg.d_head)
        if attn.o_proj.bias is not None:
            sd[f"blocks.{l}.attn.b_O"] = attn.o_proj.bias
        for proj in (mlp.gate_proj, mlp.up_proj):
            if getattr(proj, "bias", None) is not None and bool(proj.bias.ne(0).any()):
                raise ValueError("TransformerLens's gated MLP cannot represent gate_proj/up_proj biases: "
                                 "zero them (down_proj and attention biases are fine)")
        if getattr(mlp.down_proj, "bias", None) is not None:
            sd[f"blocks.{l}.mlp.b_out"] = mlp.down_proj.bias


def tl_state_dict(hf, cfg) -> dict:
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    if type(hf).__name__ == "GPT2LMHeadModel":
        sd = convert_gpt2_weights(hf, cfg)
    else:
        sd = convert_llama_weights(hf, cfg)
        _llama_biases(hf, cfg, sd)
    return detached_copy(sd)


def build_tl_model(cfg, state_dict: dict, **processing):
    """A TransformerLens HookedTransformer from its config and TL-layout weights (no processing unless
    flags are given). Shared by every family's reference builder."""
    from transformer_lens import HookedTransformer as TLHookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TLHookedTransformer(cfg)
        model.load_and_process_state_dict(state_dict, **{**NO_PROCESSING, **processing})
    return model.eval()


def detached_copy(state_dict: dict) -> dict:
    """TransformerLens's converters return views of the HF parameters: never let its processing write
    through them."""
    return {k: v.detach().clone() for k, v in state_dict.items()}


def tl_model(hf, **processing):
    """TransformerLens HookedTransformer with `hf`'s weights (no processing unless flags are given)."""
    cfg = tl_config(hf)
    return build_tl_model(cfg, tl_state_dict(hf, cfg), **processing)
