"""Random HF models of the parallel-block, partial-rotary and learned-offset families (GPT-NeoX,
GPT-J, OPT, Phi) for tests/models.py, and where each keeps its parts (for HF-side references).

`spec.variant` picks the family's options: the rotary fraction (1, 1/2, 1/4 of d_head, kept even)
and, for GPT-NeoX, parallel (even variants) or sequential (odd) blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, \
    OPTForCausalLM, PhiConfig, PhiForCausalLM

MHA_ONLY = ("gpt_neox", "gptj", "opt")  # no grouped-query attention in these HF classes


def rotary_fraction(spec) -> float:
    """1, 1/2 or 1/4 of d_head by variant, raised until the rotary dimension is even."""
    for fraction in (1.0, 0.5, 0.25)[spec.variant % 3::-1]:
        if int(spec.d_head * fraction) % 2 == 0 and int(spec.d_head * fraction) > 0:
            return fraction
    return 1.0


def is_parallel(spec) -> bool:
    return spec.family in ("gptj", "phi") or (spec.family == "gpt_neox" and spec.variant % 2 == 0)


def _rope(spec) -> dict:
    # GPTNeoXConfig ignores a partial_rotary_factor keyword (its rotary_pct default wins): say it here
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_fraction(spec)}


def _neox(spec, n_ctx: int, vocab: int) -> nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=spec.n_layers, hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
        intermediate_size=spec.d_mlp, vocab_size=vocab, max_position_embeddings=n_ctx,
        rope_parameters=_rope(spec), use_parallel_residual=is_parallel(spec),
        attention_bias=spec.bias, tie_word_embeddings=spec.tied, hidden_act="gelu", bos_token_id=0,
        eos_token_id=1))


def _gptj(spec, n_ctx: int, vocab: int) -> nn.Module:
    return GPTJForCausalLM(GPTJConfig(
        n_layer=spec.n_layers, n_embd=spec.d_model, n_head=spec.n_heads, n_inner=spec.d_mlp,
        rotary_dim=int(spec.d_head * rotary_fraction(spec)), vocab_size=vocab, n_positions=n_ctx,
        tie_word_embeddings=spec.tied, activation_function="gelu_new", bos_token_id=0, eos_token_id=1))


def _opt(spec, n_ctx: int, vocab: int) -> nn.Module:
    return OPTForCausalLM(OPTConfig(
        num_hidden_layers=spec.n_layers, hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
        ffn_dim=spec.d_mlp, vocab_size=vocab, max_position_embeddings=n_ctx, word_embed_proj_dim=spec.d_model,
        enable_bias=spec.bias, tie_word_embeddings=spec.tied, activation_function="relu",
        do_layer_norm_before=True, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def _phi(spec, n_ctx: int, vocab: int) -> nn.Module:
    return PhiForCausalLM(PhiConfig(
        num_hidden_layers=spec.n_layers, hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads, intermediate_size=spec.d_mlp, vocab_size=vocab,
        max_position_embeddings=n_ctx, rope_parameters=_rope(spec),
        tie_word_embeddings=spec.tied, hidden_act="gelu_new", qk_layernorm=False, bos_token_id=0,
        eos_token_id=1))


FAMILY_BUILDERS: dict[str, Callable[..., nn.Module]] = {"gpt_neox": _neox, "gptj": _gptj, "opt": _opt, "phi": _phi}


@dataclass(frozen=True)
class Parts:
    """HF module paths of a family (relative to the causal LM; block-relative below `blocks`)."""

    embed: str
    pos_embed: str | None
    blocks: str
    final_norm: str
    unembed: str
    ln1: str
    q: str
    k: str
    v: str
    o: str
    fused_qkv: str | None = None  # NeoX: query_key_value, laid out [heads, (q k v), d_head]


PARTS = {
    "gpt_neox": Parts("gpt_neox.embed_in", None, "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head",
                  "input_layernorm", "", "", "", "attention.dense", fused_qkv="attention.query_key_value"),
    "gptj": Parts("transformer.wte", None, "transformer.h", "transformer.ln_f", "lm_head", "ln_1",
                  "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
    "opt": Parts("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.layers",
                 "model.decoder.final_layer_norm", "lm_head", "self_attn_layer_norm", "self_attn.q_proj",
                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "phi": Parts("model.embed_tokens", None, "model.layers", "model.final_layernorm", "lm_head",
                 "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
}


def hf_block(hf: nn.Module, spec, layer: int) -> nn.Module:
    return hf.get_submodule(PARTS[spec.family].blocks)[layer]


def hf_qkv(hf: nn.Module, spec, layer: int, resid_pre: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [b, p, heads, d_head] from HF's own modules: ln1 then the projections (before rotary)."""
    parts, block = PARTS[spec.family], hf_block(hf, spec, layer)
    normed = block.get_submodule(parts.ln1)(resid_pre)
    b, p, _ = resid_pre.shape
    if parts.fused_qkv is not None:
        fused = block.get_submodule(parts.fused_qkv)(normed).view(b, p, spec.n_heads, 3, spec.d_head)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
    heads = {"q": spec.n_heads, "k": spec.n_kv_heads, "v": spec.n_kv_heads}
    return tuple(block.get_submodule(getattr(parts, x))(normed).view(b, p, heads[x], spec.d_head)  # type: ignore
                 for x in "qkv")


def hf_rotate(hf: nn.Module, spec, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own rotary embedding of q, k [b, p, heads, d_head] (partial, interleaved as the family does)."""
    if spec.family == "gptj":
        from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

        sin, cos = hf.transformer.rotary_emb(q, positions)
        rot = hf.config.rotary_dim or spec.d_head
        return tuple(torch.cat([apply_rotary_pos_emb(x[..., :rot], sin, cos), x[..., rot:]], -1)  # type: ignore
                     for x in (q, k))
    if spec.family == "gpt_neox":
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        cos, sin = hf.gpt_neox.rotary_emb(q, position_ids=positions)
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    if spec.family == "phi":
        from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

        cos, sin = hf.model.rotary_emb(q, position_ids=positions)
        rot = cos.shape[-1]
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim=2)
        return torch.cat([q_rot, q[..., rot:]], -1), torch.cat([k_rot, k[..., rot:]], -1)
    raise ValueError(f"{spec.family} has no rotary embedding")
