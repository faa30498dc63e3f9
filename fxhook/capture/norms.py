"""The norm computation fxhook substitutes for HF norm modules during capture.

TransformerLens exposes `hook_scale` and `hook_normalized` inside every norm,
and editing `hook_scale` must change the output (freezing the LN scale is a
standard attribution trick), so the norm is computed here from its scale.
"""
from __future__ import annotations

import torch

from fxhook.capture.ops import hook_marker


def hooked_norm(
    x: torch.Tensor,  # [..., d]
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    prefix: str,
) -> torch.Tensor:
    """LayerNorm / RMSNorm / Gemma's (1 + w) RMSNorm with TransformerLens hook placement.

    LayerNorm: hook_normalized is after weight and bias (as TransformerLens);
    RMSNorm: hook_normalized is before the weight (as TransformerLens).
    """
    dtype = x.dtype
    h = x.float()
    if kind == "layernorm":
        h = h - h.mean(-1, keepdim=True)
    scale = hook_marker((h.pow(2).mean(-1, keepdim=True) + eps).sqrt(), prefix + "hook_scale")
    h = h / scale
    if kind == "layernorm":
        h = h.to(dtype)
        if weight is not None:
            h = h * weight
        if bias is not None:
            h = h + bias
        return hook_marker(h, prefix + "hook_normalized")
    h = hook_marker(h, prefix + "hook_normalized").to(dtype)
    if weight is None:
        return h
    if kind == "rmsnorm_plus_one":
        return h * (1.0 + weight.float()).to(dtype)
    return h * weight
