"""The KV-cache ops and masks of decode graphs: what a decode graph is made of.

`fxhook::kv_append` and `fxhook::decode_mask` are opaque in the captured decode graph
(fxhook/capture/kv.py) so that a pass can lower them two ways (fxhook/passes/kv_cache.py).
The mask helpers are called inside lowered graphs. Key j is visible to query i (absolute index
past + i) when j <= past + i, mask[j] is set and, for a sliding-window layer, past + i - j < window.
"""
from __future__ import annotations

import torch


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


def positions_from_mask(full_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids [b, q] of the last q_len tokens: real tokens counted from 0, left padding invisible."""
    return (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, full_mask.shape[1] - q_len:]




def growing_mask(full_mask: torch.Tensor, input_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Mask [b, 1, q, past + q] of this step's q = input_ids.shape[1] positions."""
    return step_mask(full_mask, input_ids.shape[1], sliding_window)


def static_mask(full_mask: torch.Tensor, cache_position: torch.Tensor, sliding_window: int | None
                ) -> torch.Tensor:
    """Mask [b, 1, q, max_len] of the queries at buffer slots cache_position [q]."""
    return mask_at(full_mask, cache_position, sliding_window)
