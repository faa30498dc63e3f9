"""Capture helpers for block layouts beyond GPT-2/Llama, driven by adapter data.

- fused projections: hook_q / hook_k as a chunk of a fused qkv output (GPT-NeoX's
  per-head interleaved layout, or GPT-2's chunk-major one), marked in place so an
  edit made by a hook flows into the HF code that splits the fused tensor;
- token-flattened blocks: OPT runs its MLP half on [b * p, d]; markers see [b, p, ...];
- shared norms: GPT-J and Phi feed ln1's output to the MLP too. TransformerLens
  models that as an ln2 equal to ln1 applied to resid_pre, with its own hooks; we
  recompute the norm for the MLP under the ln2 hook names (same value as HF's).
"""
from __future__ import annotations

from typing import Callable

import torch

from fxhook.adapter import Site
from fxhook.core.ops import hook_marker


def mark_fused_chunk(x: torch.Tensor, site: Site, name: str, heads: int) -> torch.Tensor:
    """`x` [..., n_chunks * heads * d_head] with chunk `site.chunk` marked as [..., heads, d_head]."""
    shape = x.shape
    if site.interleaved:
        parts, axis = x.unflatten(-1, (heads, site.n_chunks, -1)), -2  # [..., heads, chunks, d_head]
    else:
        parts, axis = x.unflatten(-1, (site.n_chunks, heads, -1)), -3  # [..., chunks, heads, d_head]
    pieces = list(parts.unbind(axis))
    pieces[site.chunk] = hook_marker(pieces[site.chunk], name)
    return torch.stack(pieces, axis).reshape(shape)


class TokenShape:
    """The [b, p] of the block being run, so that [b * p, ...] tensors can be marked as [b, p, ...]."""

    def __init__(self) -> None:
        self.shape: tuple | None = None

    def record(self, x: torch.Tensor) -> None:
        self.shape = tuple(x.shape[:-1]) if x.dim() >= 3 else self.shape

    def apply(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn applied to `x` seen as [b, p, ...] when `x` has its token axes flattened to one."""
        if x.dim() != 2 or self.shape is None or len(self.shape) != 2:
            return fn(x)
        return fn(x.view(*self.shape, x.shape[-1])).reshape(x.shape)
