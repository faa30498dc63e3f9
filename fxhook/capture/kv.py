"""Capture of the decode graph: a step of the model that reads and extends an explicit KV cache.

The decode root takes this step's tokens [b, q], their positions [b, q], the
padding mask of the whole sequence [b, past + q] and each layer's past keys
and values ([b, kv_heads, past, d_head]), and returns the logits of the q new
positions with each layer's keys and values extended by this step's.

No HF cache object is involved. While the root runs, a module-level context
(`_ACTIVE`) holds the past tensors and the full mask; the registered fxhook
attention function (capture/hf_attention.py) asks `decode_attention_inputs`
for the keys, values and mask to attend with. That happens after the
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


# ---------------------------------------------------------------- the two cache ops of the captured graph
@torch.library.custom_op("fxhook::kv_append", mutates_args=())
def kv_append(past: torch.Tensor, new: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer`'s keys (or values) [b, kv, past, d] extended by this step's [b, kv, q, d]."""
    return torch.cat([past, new], dim=2)


@kv_append.register_fake
def _kv_append_fake(past: torch.Tensor, new: torch.Tensor, layer: int) -> torch.Tensor:
    b, h, p, d = past.shape
    return past.new_empty((b, h, p + new.shape[2], d))


@torch.library.custom_op("fxhook::decode_mask", mutates_args=())
def decode_mask(full_mask: torch.Tensor, query: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [b, 1, q, past + q] mask for the q = query.shape[2] newest positions of full_mask."""
    return step_mask(full_mask, query.shape[2], sliding_window)


@decode_mask.register_fake
def _decode_mask_fake(full_mask: torch.Tensor, query: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    return full_mask.new_empty((full_mask.shape[0], 1, query.shape[2], full_mask.shape[1]), dtype=torch.bool)


KV_APPEND = torch.ops.fxhook.kv_append.default
DECODE_MASK = torch.ops.fxhook.decode_mask.default


def decode_attention_inputs(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, sliding_window: int | None):
    """(key, value, mask) the attention core should use: unchanged outside decode capture."""
    ctx = _ACTIVE
    if ctx is None:
        return key, value, attention_mask
    key = kv_append(ctx.past_keys[layer], key, layer)
    value = kv_append(ctx.past_values[layer], value, layer)
    ctx.new_keys[layer] = key
    ctx.new_values[layer] = value
    return key, value, decode_mask(ctx.full_mask, query, sliding_window)


def step_mask(full_mask: torch.Tensor, q_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [b, 1, q, total] mask (True = attend) for the last q_len positions of `full_mask`."""
    total = full_mask.shape[1]
    query_idx = torch.arange(q_len, device=full_mask.device) + (total - q_len)
    return mask_at(full_mask, query_idx, sliding_window)


def mask_at(full_mask: torch.Tensor, query_idx: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [b, 1, q, total] mask for queries at absolute indices query_idx [q] of full_mask [b, total]."""
    key_idx = torch.arange(full_mask.shape[1], device=full_mask.device)
    allowed = key_idx[None, :] <= query_idx[:, None]
    if sliding_window is not None:
        allowed = allowed & (query_idx[:, None] - key_idx[None, :] < sliding_window)
    return allowed[None, None, :, :] & (full_mask != 0)[:, None, None, :]


class DecodeRoot(nn.Module):
    """(input_ids [b, q], position_ids [b, q], attention_mask [b, past+q], *past_keys, *past_values) ->
    (logits [b, q, vocab], *keys, *values), keys/values per layer [b, kv, past+q, d]."""

    def __init__(self, hf_model: nn.Module, n_layers: int):
        super().__init__()
        self.hf = hf_model
        self.n_layers = n_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        global _ACTIVE
        n = self.n_layers
        ctx = _DecodeContext(list(past_keys), list(past_values), attention_mask)
        previous, _ACTIVE = _ACTIVE, ctx
        try:
            # HF builds a mask for the q new positions only; the attention function ignores it (dead code).
            out = self.hf(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          position_ids=position_ids, use_cache=False)
        finally:
            _ACTIVE = previous
        if len(ctx.new_keys) != n:
            raise RuntimeError(f"decode capture saw attention in {len(ctx.new_keys)} of {n} layers")
        return (out.logits, *(ctx.new_keys[i] for i in range(n)), *(ctx.new_values[i] for i in range(n)))


def positions_from_mask(full_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids [b, q] of the last q_len tokens: real tokens counted from 0, left padding invisible."""
    return (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, full_mask.shape[1] - q_len:]


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


def verify_decode(decode, full: torch.fx.GraphModule, n_layers: int, n_kv_heads: int, d_head: int, vocab: int,
                  static: bool = False, embed=None) -> None:
    """Check on a tiny input that prefill + single steps of `decode` give `full`'s logits.

    `decode` follows the calling convention of fxhook/passes/kv_cache.py (growing cache, or static
    with `static`); with `embed` (tokens -> embeddings) it takes the embeddings as its last input
    before any cache position. A model whose HF code derives positions or masks from something the
    decode root does not control would otherwise generate wrong tokens silently; this turns that
    into an error at build time.
    """
    param = next(iter(full.parameters()), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 5), generator=g).to(device)
    mask = torch.ones_like(tokens)
    mask[0, 0] = 0  # a left-padded row: positions must come from the mask
    length = 8 if static else 0  # static: slots past the sequence exist and must not be read
    kv = [torch.zeros((2, n_kv_heads, length, d_head), dtype=dtype, device=device) for _ in range(2 * n_layers)]
    buffer_mask = torch.ones((2, length), dtype=mask.dtype, device=device)
    buffer_mask[:, :5] = mask if static else buffer_mask[:, :5]
    with torch.no_grad():
        expected = full(tokens, mask)
        got = []
        for start, stop in ((0, 3), (3, 4), (4, 5)):
            ids = tokens[:, start:stop]
            positions = positions_from_mask(mask[:, :stop], stop - start)
            extra = [] if embed is None else [embed(ids)]
            if embed is not None:
                ids = torch.zeros_like(ids)  # the graph must not read the ids
            if static:
                got.append(decode(ids, positions, buffer_mask, *kv, *extra,
                                  torch.arange(start, stop, device=device)))
            else:
                out = decode(ids, positions, mask[:, :stop], *kv, *extra)
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
