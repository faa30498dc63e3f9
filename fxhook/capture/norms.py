"""The norm computation fxhook substitutes for HF norm modules during capture.

TransformerLens exposes `hook_scale` and `hook_normalized` inside every norm,
and editing `hook_scale` must change the output (freezing the LN scale is a
standard attribution trick), so the norm is computed here from its scale.
"""
from __future__ import annotations

import torch

from fxhook.core.hook_names import norm_hook
from fxhook.core.ops import hook_marker


def hooked_norm(
    x: torch.Tensor,  # [..., d]
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    prefix: str,
) -> torch.Tensor:
    """LayerNorm / RMSNorm / Gemma's (1 + w) RMSNorm with TransformerLens hook placement.

    hook_normalized is the pure normalised input, before the weight and bias,
    for every kind (as TransformerLens 3.9 does).
    """
    dtype = x.dtype
    h = x.float()
    if kind == "layernorm":
        h = h - h.mean(-1, keepdim=True)
    scale = hook_marker((h.pow(2).mean(-1, keepdim=True) + eps).sqrt(), norm_hook(prefix, "hook_scale"))
    h = hook_marker(h / scale, norm_hook(prefix, "hook_normalized")).to(dtype)
    if weight is not None:
        h = h * ((1.0 + weight.float()).to(dtype) if kind == "rmsnorm_plus_one" else weight)
    if bias is not None:
        h = h + bias
    return h
