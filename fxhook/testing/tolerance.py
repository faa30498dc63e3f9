"""Tolerances derived from a dtype's precision and the model's depth.

Two implementations of the same network differ by rounding: each operation adds an error of
about the dtype's machine epsilon relative to the values it handles, and each block adds its
own operations to the residual stream. So the allowed absolute difference is

    atol = factor * finfo(dtype).eps * (n_layers + 1) * max(1, rms(reference))

with factor 16 by default: float32 allows 5.7e-6 on a 2-block model whose values are of order 1
and 5.9e-5 on SmolLM2's 30 blocks; bfloat16 (eps 2**-7) and float16 (eps 2**-10) allow
proportionally more. The README's "Proving your own model equals Hugging Face" lists them.
"""
from __future__ import annotations

import torch

DEFAULT_FACTOR = 16.0


def tolerance(dtype: torch.dtype, n_layers: int, reference: torch.Tensor | None = None,
              factor: float = DEFAULT_FACTOR) -> float:
    """The absolute difference allowed between two runs in `dtype` through `n_layers` blocks,
    scaled by the root mean square of `reference` (values of order 1 and below count as 1)."""
    if not dtype.is_floating_point:
        raise ValueError(f"a tolerance needs a floating-point dtype, got {dtype}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    scale = 1.0
    if reference is not None and reference.numel():
        scale = max(1.0, float(reference.detach().double().pow(2).mean().sqrt()))
    return factor * torch.finfo(dtype).eps * (n_layers + 1) * scale


def tolerance_table(n_layers: int, factor: float = DEFAULT_FACTOR) -> dict[str, float]:
    """dtype name -> atol for values of order 1 (what the README's table shows)."""
    return {str(d).removeprefix("torch."): tolerance(d, n_layers, factor=factor)
            for d in (torch.float32, torch.bfloat16, torch.float16)}
