"""TransformerLens-layout views of a HF model's parameters, keyed by TransformerLens names.

`live_weights` returns views (not copies) of the HF parameters, so writing into
one edits the model: weight processing writes its results back this way, and
the model's weight properties are these same views.
Keys: embed.W_E, pos_embed.W_pos, blocks.L.ln1.w/b, blocks.L.attn.W_Q/b_Q/W_K/b_K/
W_V/b_V/W_O/b_O (K and V at kv heads), blocks.L.ln2.w/b, blocks.L.mlp.W_in/b_in/
W_gate/b_gate/W_out/b_out, ln_final.w/b, unembed.W_U/b_U. Absent biases are absent.
"""
from __future__ import annotations

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.processing.extra_weights import add_extra_weights
from fxhook.weights import Projection, read_input_projection, read_mlp_projection, read_output_projection
from fxhook.core.hook_names import block_name, block_prefix


def _param(root: nn.Module, path: str, leaf: str) -> torch.Tensor | None:
    return getattr(root.get_submodule(path), leaf, None)


def ensure_bias(module: nn.Module, size: int) -> None:
    """Give a bias-less linear layer a zero bias, so a folded bias has somewhere to live."""
    if getattr(module, "bias", None) is None:
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(size, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)


def untie_unembed(hf_model: nn.Module, adapter: Adapter) -> None:
    """Give the unembedding its own weight when it is tied to the embedding."""
    unembed = hf_model.get_submodule(adapter.unembed)
    embed = hf_model.get_submodule(adapter.embed)
    if unembed.weight is embed.weight:
        unembed.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        hf_model.config.tie_word_embeddings = False


def _norm(out: dict, hf_model: nn.Module, path: str, key: str) -> None:
    for leaf, short in (("weight", "w"), ("bias", "b")):
        value = _param(hf_model, path, leaf)
        if value is not None:
            out[f"{key}.{short}"] = value


def _projection(out: dict, block: nn.Module, proj: Projection | None, key: str, reader, *args) -> None:
    if proj is None:
        return
    w, b = reader(_param(block, proj.module, "weight"), _param(block, proj.module, "bias"), proj, *args)
    out[key.replace("?", "W")] = w
    if b is not None:
        out[key.replace("?", "b")] = b


def live_weights(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"embed.W_E": _param(hf_model, adapter.embed, "weight")}
    pos, norms, attn, ff = adapter.positions, adapter.norms, adapter.attention, adapter.feed_forward
    if pos.pos_embed is not None:
        out["pos_embed.W_pos"] = _param(hf_model, pos.pos_embed, "weight")[pos.pos_embed_offset:]
    for layer, block in enumerate(hf_model.get_submodule(adapter.blocks)):
        p = block_prefix(layer)
        _norm(out, block, norms.ln1, p + "ln1")
        if not adapter.attn_only:
            _norm(out, block, norms.ln2 or norms.ln1, p + "ln2")  # no ln2: the MLP reads ln1 too
        _projection(out, block, attn.q_proj, p + "attn.?_Q", read_input_projection, cfg.n_heads, cfg.d_head)
        _projection(out, block, attn.k_proj, p + "attn.?_K", read_input_projection, cfg.n_kv_heads, cfg.d_head)
        _projection(out, block, attn.v_proj, p + "attn.?_V", read_input_projection, cfg.n_kv_heads, cfg.d_head)
        _projection(out, block, attn.o_proj, p + "attn.?_O", read_output_projection, cfg.n_heads, cfg.d_head)
        _projection(out, block, ff.in_proj, p + "mlp.?_in", read_mlp_projection)
        _projection(out, block, ff.gate_proj, p + "mlp.?_gate", read_mlp_projection)
        _projection(out, block, ff.out_proj, p + "mlp.?_out", read_mlp_projection)
        add_extra_weights(out, block, adapter, p)
    _norm(out, hf_model, adapter.final_norm, "ln_final")
    unembed = hf_model.get_submodule(adapter.unembed)
    out["unembed.W_U"] = unembed.weight.t()
    if getattr(unembed, "bias", None) is not None:
        out["unembed.b_U"] = unembed.bias
    return out


def bias_homes(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig) -> dict[str, tuple[nn.Module, int]]:
    """For each bias key processing may need to create: (the module that would hold it, its size)."""
    homes: dict[str, tuple[nn.Module, int]] = {}
    blocks = hf_model.get_submodule(adapter.blocks)
    sizes = {"Q": cfg.n_heads * cfg.d_head, "K": cfg.n_kv_heads * cfg.d_head, "V": cfg.n_kv_heads * cfg.d_head,
             "O": cfg.d_model, "in": cfg.d_mlp, "gate": cfg.d_mlp, "out": cfg.d_model}
    attn, ff = adapter.attention, adapter.feed_forward
    for layer, block in enumerate(blocks):
        for name, proj in (("attn.b_Q", attn.q_proj), ("attn.b_K", attn.k_proj), ("attn.b_V", attn.v_proj),
                           ("attn.b_O", attn.o_proj), ("mlp.b_in", ff.in_proj),
                           ("mlp.b_gate", ff.gate_proj), ("mlp.b_out", ff.out_proj)):
            if proj is not None and proj.n_chunks == 1:
                homes[block_name(layer, name)] = (block.get_submodule(proj.module), sizes[name.rsplit("_", 1)[1]])
            elif proj is not None:  # a fused projection: the bias covers the whole fused output
                module = block.get_submodule(proj.module)
                homes[block_name(layer, name)] = (module, module.weight.shape[0 if proj.layout == "linear" else 1])
    homes["unembed.b_U"] = (hf_model.get_submodule(adapter.unembed), cfg.d_vocab_out)
    return homes
