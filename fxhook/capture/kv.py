"""Capture of the decode graph: a step of the model that reads and extends an explicit KV cache.

The decode root takes this step's tokens [b, q], their positions [b, q], the
padding mask of the whole sequence [b, past + q] and each layer's past keys
and values ([b, kv_heads, past, d_head]), and returns the logits of the q new
positions with each layer's keys and values extended by this step's.

No HF cache object is involved. While the root runs, the attention-capture context
(a contextvar in capture/hf_attention.py) holds the past tensors and the full mask; the registered fxhook
attention function (capture/hf_attention.py) reads
them for the keys, values and mask to attend with. That happens after the
hook_k / hook_rot_k / hook_v markers, so hooks see only this step's positions
and an edit made by a hook is what gets cached.

The cache write and the mask are two opaque custom ops in the captured graph
(`fxhook::kv_append`, `fxhook::decode_mask`), so a pass can lower them two
ways (fxhook/passes/kv_cache.py): a growing cache (concatenation, for eager
decode) or a static preallocated one (in-place writes at a cache position,
for compiled decode). Key j is visible to query i (absolute index past + i)
when j <= past + i, mask[j] is set and, for a sliding-window layer,
past + i - j < window (HF's rule, on absolute indices).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fxhook.adapter import Adapter
from fxhook.capture.hf_attention import DecodeCapture, attention_capture
from fxhook.capture.instrument import instrumented
from fxhook.core.graph import plain_codegen
from fxhook.core.kv_ops import positions_from_mask


class DecodeRoot(nn.Module):
    """(input_ids [b, q], position_ids [b, q], attention_mask [b, past+q], *past_keys, *past_values) ->
    (logits [b, q, vocab], *keys, *values), keys/values per layer [b, kv, past+q, d]."""

    def __init__(self, hf_model: nn.Module, n_layers: int):
        super().__init__()
        self.hf = hf_model
        self.n_layers = n_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        n = self.n_layers
        ctx = DecodeCapture(list(past_keys), list(past_values), attention_mask)
        with attention_capture(decode=ctx):
            # HF builds a mask for the q new positions only; the attention function ignores it (dead code).
            out = self.hf(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          position_ids=position_ids, use_cache=False)
        if len(ctx.new_keys) != n:
            raise RuntimeError(f"decode capture saw attention in {len(ctx.new_keys)} of {n} layers")
        return (out.logits, *(ctx.new_keys[i] for i in range(n)), *(ctx.new_values[i] for i in range(n)))


def _check_sliding_window(hf_model: nn.Module) -> None:
    """Sliding windows are applied in `step_mask`; refuse what it does not know (per-layer window kinds)."""
    config = hf_model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise NotImplementedError(f"the KV cache does not handle attention layer types {set(layer_types)}")


def capture_decode(hf_model: nn.Module, adapter: Adapter, n_layers: int, n_heads: int, n_kv_heads: int,
                   d_head: int) -> torch.fx.GraphModule:
    """Export the decode step of `hf_model` with fxhook's markers (flat inputs and outputs)."""
    _check_sliding_window(hf_model)
    was_training = hf_model.training
    hf_model.eval()
    root = DecodeRoot(hf_model, n_layers)
    param = next(hf_model.parameters())
    b, past, q = 2, 3, 2
    ids = torch.zeros((b, q), dtype=torch.long, device=param.device)
    mask = torch.ones((b, past + q), dtype=torch.long, device=param.device)
    positions = positions_from_mask(mask, q)
    keys, values = ([torch.zeros((b, n_kv_heads, past, d_head), dtype=param.dtype, device=param.device)
                     for _ in range(n_layers)] for _ in range(2))
    dyn = Dim.DYNAMIC
    per_layer = [{0: dyn, 2: dyn} for _ in range(n_layers)]
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, per_layer, list(per_layer))
    try:
        with torch.no_grad(), instrumented(hf_model, adapter, n_heads, n_kv_heads) as norm_eps:
            ep = torch.export.export(root, (ids, positions, mask, keys, values), dynamic_shapes=shapes, strict=False)
    finally:
        hf_model.train(was_training)
    gm = plain_codegen(ep.module())
    gm.meta["norm_eps"] = dict(norm_eps)
    return gm
