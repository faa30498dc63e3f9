"""Passes that split attention per head: TransformerLens's use_attn_result,
use_split_qkv_input and use_attn_in.

They rewrite a layer's projections as per-head einsums over weight views read
from the HF parameters, so a hook on one head's result or input changes only
that head. The old fused path becomes dead code and is removed.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxhook.adapter import Adapter
from fxhook.capture.norms import hooked_norm
from fxhook.core import hook_names as hn
from fxhook.core.ops import hook_op
from fxhook.config import HookedTransformerConfig
from fxhook.passes.graph_params import BlockParams
from fxhook.core.graph import finish, hook_markers


def _markers_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {m.args[1]: m for m in hook_markers(gm.graph)}


def _require(adapter: Adapter, *fields: str) -> None:
    """The attention projections `fields` ("q_proj", ...) are described by the adapter."""
    missing = [f for f in fields if getattr(adapter.attention, f) is None]
    if missing:
        raise NotImplementedError(f"the {adapter.architectures[0]} adapter does not describe {missing}; "
                                  f"per-head hooks need them (add Projection entries in adapters/)")


def _refuse_post_norm_blocks(adapter: Adapter, flag: str) -> None:
    """Post-norm blocks (OLMo 2) normalise q and k over all heads and the attention output as a whole:
    a per-head split cannot reproduce that, so the flag is refused rather than computed wrongly."""
    if adapter.norms.post_norm:
        raise NotImplementedError(
            f"{flag} is not available for {adapter.architectures[0]}: its post-norm blocks normalise "
            f"the attention output (and q/k across all heads) as a whole, so per-head hooks cannot be split "
            f"out of it; hook blocks.L.attn.hook_z (per head, before the output projection) instead")


def split_attn_result(gm: fx.GraphModule, adapter: Adapter, cfg: HookedTransformerConfig) -> fx.GraphModule:
    """attn_out = sum_h hook_result[b, p, h, d_model] + b_O (then ln1_post where the block has one, as
    TransformerLens's Gemma 2: hook_result is before the post norm)."""
    _require(adapter, "o_proj")
    _refuse_post_norm_blocks(adapter, "use_attn_result")
    markers = _markers_by_name(gm)
    tracer = GraphAppendingTracer(gm.graph)
    for layer in range(cfg.n_layers):
        z_node = markers[hn.block_hook(layer, "attn.hook_z")]
        out_node = markers[hn.block_hook(layer, "hook_attn_out")]
        with gm.graph.inserting_before(out_node):
            params = BlockParams(gm, adapter, layer, tracer)
            w_o, b_o = params.output_projection(adapter.attention.o_proj, cfg.n_heads, cfg.d_head)
            z = Proxy(z_node, tracer)
            result = torch.einsum("bphd,hdm->bphm", z.to(w_o.dtype), w_o)
            result = hook_op(result, hn.block_hook(layer, "attn.hook_result"))
            out = result.sum(dim=2)
            if b_o is not None:
                out = out + b_o
            if adapter.norms.ln1_post is not None:
                prefix = hn.norm_prefix(layer, "ln1_post")
                w, b, eps = params.norm(adapter.norms.ln1_post, prefix)
                out = hooked_norm(out, w, b, eps, adapter.norms.kind, prefix)
        out_node.args = (out.node, out_node.args[1])
    return finish(gm)


_INPUT_HOOKS = {"q": "hook_q_input", "k": "hook_k_input", "v": "hook_v_input"}
_PROJECTED = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _repeat_heads(x: Proxy, n_heads: int) -> Proxy:
    """[b, p, d_model] -> [b, p, n_heads, d_model] (a copy, so each head's input is its own)."""
    return x.unsqueeze(2).expand(-1, -1, n_heads, -1).clone()


def split_qkv_input(gm: fx.GraphModule, adapter: Adapter, cfg: HookedTransformerConfig,
                    split: bool, attn_in: bool, ungrouped: bool = False) -> fx.GraphModule:
    """q/k/v computed per head from per-head copies of resid_pre, each through ln1.

    split (use_split_qkv_input): hook_q_input / hook_k_input / hook_v_input;
    attn_in (use_attn_in): one hook_attn_in shared by q, k and v.
    """
    _require(adapter, "q_proj", "k_proj", "v_proj")
    _refuse_post_norm_blocks(adapter, "use_attn_in" if attn_in and not split else "use_split_qkv_input")
    if attn_in and not split and cfg.n_kv_heads != cfg.n_heads and not ungrouped:
        raise NotImplementedError("use_attn_in gives every query head its own input, which grouped-query "
                                  "attention cannot use for its shared keys/values; use "
                                  "set_use_split_qkv_input(True) instead")
    markers = _markers_by_name(gm)
    tracer = GraphAppendingTracer(gm.graph)
    n_kv = cfg.n_heads if ungrouped else cfg.n_kv_heads
    heads = {"q": cfg.n_heads, "k": n_kv, "v": n_kv}
    for layer in range(cfg.n_layers):
        first = min((markers[hn.block_hook(layer, _PROJECTED[x])] for x in "qkv"), key=_position(gm.graph))
        resid = markers[hn.block_hook(layer, "hook_resid_pre")]
        with gm.graph.inserting_before(first):
            params = BlockParams(gm, adapter, layer, tracer)
            ln1 = hn.norm_prefix(layer, "ln1")
            ln_w, ln_b, eps = params.norm(adapter.norms.ln1, ln1)
            resid_proxy = Proxy(resid, tracer)
            shared = hook_op(_repeat_heads(resid_proxy, cfg.n_heads), hn.block_hook(layer, "hook_attn_in")) if attn_in else None
            for x in "qkv":
                if split:
                    inp = hook_op(_repeat_heads(resid_proxy, heads[x]), hn.block_hook(layer, _INPUT_HOOKS[x]))
                else:
                    inp = shared
                normed = hooked_norm(inp, ln_w, ln_b, eps, adapter.norms.kind, ln1)
                w, b = params.input_projection(getattr(adapter.attention, f"{x}_proj"), heads[x], cfg.d_head)
                value = torch.einsum("bphm,hmd->bphd", normed.to(w.dtype), w)
                if b is not None:
                    value = value + b
                target = markers[hn.block_hook(layer, _PROJECTED[x])]
                target.args = (value.node, target.args[1])
    return finish(gm)


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda node: order[node]
