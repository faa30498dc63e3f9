"""The activation functions TransformerLens names, as plain functions of tensors."""
from __future__ import annotations

import math

import torch


def gelu_new(input: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU: [..., d_mlp] -> [..., d_mlp]."""
    return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * input.pow(3.0))))


def gelu_fast(input: torch.Tensor) -> torch.Tensor:
    """The same approximation written with a rounded constant, as some checkpoints were trained with."""
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


def solu(input: torch.Tensor) -> torch.Tensor:
    """SoLU: x * softmax(x) over the neurons (its LayerNorm is the MLP's, not part of this)."""
    return input * input.softmax(dim=-1)


def softcap_enabled(cap: float | None) -> bool:
    """A soft cap applies only for a positive value (None, 0 and -1 switch it off)."""
    return cap is not None and cap > 0


def apply_softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's cap * tanh(x / cap) when the cap is on, x otherwise."""
    return cap * torch.tanh(x / cap) if softcap_enabled(cap) else x


__all__ = ["gelu_new", "gelu_fast", "solu", "softcap_enabled", "apply_softcap"]
