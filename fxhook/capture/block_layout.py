"""Blocks that run on flattened tokens: OPT runs its MLP half on [b * p, d], and a hook marker must see
[b, p, ...] there (TokenShape, read by the instrumenter)."""
from __future__ import annotations

from typing import Callable

import torch


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
