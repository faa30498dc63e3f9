"""The attention implementation fxhook registers with transformers for capture.

transformers 5.x routes every model's attention core through a registry. We
register "fxhook": it marks q/k/v (and rot_q/rot_k on rotary models) and calls
the opaque `fxhook::attention` op, then marks z. The matching mask function
always returns a boolean mask (True = attend): without a registered mask
function transformers silently drops the causal mask.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fxhook.core import hook_names
from fxhook.core.kv_ops import decode_mask, kv_append
from fxhook.core.ops import attention_core, hook_marker

IMPLEMENTATION_NAME = "fxhook"

_SUPPORTED_KWARGS = {"scaling", "dropout", "softcap", "sliding_window", "position_ids", "cache_position",
                     "output_attentions", "use_cache", "is_causal", "position_embeddings", "past_key_values",
                     "cache", "attention_mask", "output_router_logits"}


@dataclass
class DecodeCapture:
    """The explicit KV cache of a decode-step capture (fxhook/capture/kv.py): the attention reads the
    past keys and values from here and records each layer's extended ones."""

    past_keys: list[torch.Tensor]
    past_values: list[torch.Tensor]
    full_mask: torch.Tensor  # [b, past + q], nonzero = real token
    new_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    new_values: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionCapture:
    """What the registered attention marks during one export (None outside capture: plain attention)."""

    mark_qk_here: bool = True  # pre-rotary q/k are marked here (models without rotary)
    mark_rotated: bool = False  # rotary models: q/k arriving here are hook_rot_q / hook_rot_k
    decode: DecodeCapture | None = None  # set while the decode step is captured


# per thread and task: two captures running at once each see their own settings
_CAPTURE: contextvars.ContextVar[AttentionCapture] = contextvars.ContextVar("fxhook_attention_capture",
                                                                          default=AttentionCapture())


@contextlib.contextmanager
def attention_capture(**changes) -> Iterator[AttentionCapture]:
    """Within the block, the registered attention runs with these settings (fields of AttentionCapture)."""
    import dataclasses

    settings = dataclasses.replace(_CAPTURE.get(), **changes)
    token = _CAPTURE.set(settings)
    try:
        yield settings
    finally:
        _CAPTURE.reset(token)


def _decode_inputs(decode: DecodeCapture | None, layer: int, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, sliding_window: int | None):
    """(key, value, mask) the attention core should use: the cache's under decode capture."""
    if decode is None:
        return key, value, attention_mask
    key = kv_append(decode.past_keys[layer], key, layer)
    value = kv_append(decode.past_values[layer], value, layer)
    decode.new_keys[layer] = key
    decode.new_values[layer] = value
    return key, value, decode_mask(decode.full_mask, query, sliding_window)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [b, h, p, d] <-> [b, p, h, d]


def mark_heads(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mark a [b, h, p, d] tensor as the [b, p, h, d] hook `name`."""
    return _heads_last(hook_marker(_heads_last(x), name))


def fxhook_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     sliding_window=None, alibi_slopes=None, **kwargs):
    """`alibi_slopes` (one per query head; fxhook's native model passes them): ALiBi's score bias."""
    unknown = set(kwargs) - _SUPPORTED_KWARGS
    if unknown or getattr(module, "sinks", None) is not None:
        raise NotImplementedError(
            f"fxhook's attention capture does not handle {sorted(unknown) or ['attention sinks']} "
            f"(layer {module.__class__.__name__}); add support in fxhook/capture/hf_attention.py.")
    if dropout and module.training:
        raise NotImplementedError("fxhook captures models in eval mode; attention dropout is not supported.")
    layer = int(module.layer_idx)
    settings = _CAPTURE.get()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if settings.mark_qk_here:
        query = mark_heads(query, hook_names.block_hook(layer, "attn.hook_q"))
        key = mark_heads(key, hook_names.block_hook(layer, "attn.hook_k"))
    if settings.mark_rotated:
        query = mark_heads(query, hook_names.block_hook(layer, "attn.hook_rot_q"))
        key = mark_heads(key, hook_names.block_hook(layer, "attn.hook_rot_k"))
    value = mark_heads(value, hook_names.block_hook(layer, "attn.hook_v"))
    key, value, attention_mask = _decode_inputs(settings.decode, layer, query, key, value, attention_mask,
                                                sliding_window)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError("fxhook attention expects a boolean mask; the mask function was not registered.")
    alibi = () if alibi_slopes is None else ([float(s) for s in alibi_slopes],)
    z = attention_core(query, key, value, attention_mask, float(scaling),
                       None if softcap is None else float(softcap), layer, *alibi)
    z = hook_marker(z, hook_names.block_hook(layer, "attn.hook_z"))
    return z, None


def fxhook_mask(*args, **kwargs):
    """Boolean mask, never skipped: the explicit attention needs it on every layer."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(IMPLEMENTATION_NAME, fxhook_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, fxhook_mask)
