"""Capture of the decode graph: a step of the model that reads and extends an explicit KV cache.

The decode root takes this step's tokens [b, q], the padding mask of the whole
sequence [b, past + q] and each layer's past keys and values
([b, kv_heads, past, d_head]), and returns the logits of the q new positions
with each layer's keys and values extended by this step's.

No HF cache object is involved. While the root runs, a module-level context
(`_ACTIVE`) holds the past tensors and the full mask; the registered fxhook
attention function (capture/hf_attention.py) asks `decode_attention_inputs`
for the keys, values and mask to attend with. That happens after the
hook_k / hook_rot_k / hook_v markers, so hooks see only this step's positions
and an edit made by a hook is what gets cached. Non-strict `torch.export`
traces this Python, so the graph simply contains the concatenations.

The mask is built here rather than by HF: query i of the step sits at absolute
index past + i; key j is visible when j <= past + i, mask[j] is set and, for a
sliding-window layer, past + i - j < window (HF's rule, on absolute indices).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export import Dim

from fxhook.adapter import Adapter


@dataclass
class _DecodeContext:
    past_keys: list[torch.Tensor]
    past_values: list[torch.Tensor]
    full_mask: torch.Tensor  # [b, past + q], nonzero = real token
    new_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    new_values: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: _DecodeContext | None = None


def decode_attention_inputs(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, sliding_window: int | None):
    """(key, value, mask) the attention core should use: unchanged outside decode capture."""
    ctx = _ACTIVE
    if ctx is None:
        return key, value, attention_mask
    key = torch.cat([ctx.past_keys[layer], key], dim=2)
    value = torch.cat([ctx.past_values[layer], value], dim=2)
    ctx.new_keys[layer] = key
    ctx.new_values[layer] = value
    return key, value, step_mask(ctx.full_mask, query.shape[2], sliding_window)


def step_mask(full_mask: torch.Tensor, q_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [b, 1, q, total] mask (True = attend) for the last q_len positions of `full_mask`."""
    total = full_mask.shape[1]
    key_idx = torch.arange(total, device=full_mask.device)
    query_idx = torch.arange(q_len, device=full_mask.device) + (total - q_len)
    allowed = key_idx[None, :] <= query_idx[:, None]
    if sliding_window is not None:
        allowed = allowed & (query_idx[:, None] - key_idx[None, :] < sliding_window)
    return allowed[None, None, :, :] & (full_mask != 0)[:, None, None, :]


class DecodeRoot(nn.Module):
    """(input_ids [b, q], attention_mask [b, past+q], *past_keys, *past_values) ->
    (logits [b, q, vocab], *keys, *values), keys/values per layer [b, kv, past+q, d]."""

    def __init__(self, hf_model: nn.Module, n_layers: int):
        super().__init__()
        self.hf = hf_model
        self.n_layers = n_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_keys: list[torch.Tensor],
                past_values: list[torch.Tensor]):
        global _ACTIVE
        n = self.n_layers
        q_len = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, attention_mask.shape[1] - q_len:]
        ctx = _DecodeContext(list(past_keys), list(past_values), attention_mask)
        previous, _ACTIVE = _ACTIVE, ctx
        try:
            # HF builds a mask for the q new positions only; the attention function ignores it.
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask[:, attention_mask.shape[1] - q_len:],
                          position_ids=positions, use_cache=False)
        finally:
            _ACTIVE = previous
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
    from fxhook.capture.instrument import instrumented
    from fxhook.passes.graph_utils import plain_codegen

    _check_sliding_window(hf_model)
    was_training = hf_model.training
    hf_model.eval()
    root = DecodeRoot(hf_model, n_layers)
    param = next(hf_model.parameters())
    b, past, q = 2, 3, 2
    ids = torch.zeros((b, q), dtype=torch.long, device=param.device)
    mask = torch.ones((b, past + q), dtype=torch.long, device=param.device)
    keys, values = ([torch.zeros((b, n_kv_heads, past, d_head), dtype=param.dtype, device=param.device)
                     for _ in range(n_layers)] for _ in range(2))
    dyn = Dim.DYNAMIC
    per_layer = [{0: dyn, 2: dyn} for _ in range(n_layers)]
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, per_layer, list(per_layer))
    try:
        with torch.no_grad(), instrumented(hf_model, adapter, n_heads, n_kv_heads) as norm_eps:
            ep = torch.export.export(root, (ids, mask, keys, values), dynamic_shapes=shapes, strict=False)
    finally:
        hf_model.train(was_training)
    gm = plain_codegen(ep.module())
    gm.meta["norm_eps"] = dict(norm_eps)
    return gm


def verify_decode(decode: torch.fx.GraphModule, full: torch.fx.GraphModule, n_layers: int, n_kv_heads: int,
                  d_head: int, vocab: int) -> None:
    """Check on a tiny input that prefill + single steps of `decode` give `full`'s logits.

    A model whose HF code derives positions or masks from something the decode root does not control
    would otherwise generate wrong tokens silently; this turns that into an error at build time.
    """
    param = next(iter(full.parameters()), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 5), generator=g).to(device)
    mask = torch.ones_like(tokens)
    mask[0, 0] = 0  # a left-padded row: positions must come from the mask
    with torch.no_grad():
        expected = full(tokens, mask)
        kv = [torch.zeros((2, n_kv_heads, 0, d_head), dtype=dtype, device=device) for _ in range(2 * n_layers)]
        got = []
        for start, stop in ((0, 3), (3, 4), (4, 5)):
            out = decode(tokens[:, start:stop], mask[:, :stop], *kv)
            got.append(out[0])
            kv = list(out[1:])
        got = torch.cat(got, dim=1)
    atol = 1e-3 if dtype == torch.float32 or dtype == torch.float64 else 5e-2
    scale = 1.0 + float(expected.abs().max())
    err = float((got.float() - expected.float()).abs().max())
    if not err <= atol * scale:
        raise NotImplementedError(
            f"fxhook's KV-cache decode graph disagrees with the full graph for this model (max logit difference "
            f"{err:.3g}): its HF code likely derives positions or the attention mask from something other than "
            f"position_ids and the padding mask. Generate with use_past_kv_cache=False.")
