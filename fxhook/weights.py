"""Reading TransformerLens weight layouts out of HF projection parameters.

The same functions serve two callers: weight views (on tensors) and graph
passes (on fx Proxies standing for get_attr nodes), so a layout is written
once. Shapes follow TransformerLens: W_Q [heads, d_model, d_head],
b_Q [heads, d_head], W_O [heads, d_head, d_model], b_O [d_model].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class Projection:
    """A (possibly fused) projection: block-relative module path, weight layout, output slice."""

    module: str
    layout: Layout = "linear"  # nn.Linear weight [out, in]; GPT-2's Conv1D weight [in, out]
    chunk: int = 0  # fused projections (GPT-2 c_attn): which of `n_chunks` equal output slices
    n_chunks: int = 1
    interleaved: bool = False  # fused output laid out [heads, n_chunks, d_head] (GPT-NeoX), not [n_chunks, ...]


def in_out(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The weight as [in, out] (y = x @ W)."""
    return weight.t() if layout == "linear" else weight


def _out_slice(x: torch.Tensor, proj: Projection, width: int) -> torch.Tensor:
    if proj.n_chunks == 1:
        return x
    return x[..., proj.chunk * width:(proj.chunk + 1) * width]


def _head_slice(x: torch.Tensor, proj: Projection, n_heads: int, d_head: int) -> torch.Tensor:
    """[..., fused out] -> [..., heads, d_head] of `proj`'s chunk (a view)."""
    if proj.interleaved:
        return x.unflatten(-1, (n_heads, proj.n_chunks, d_head))[..., proj.chunk, :]
    return _out_slice(x, proj, n_heads * d_head).unflatten(-1, (n_heads, d_head))


def read_input_projection(weight: torch.Tensor, bias: torch.Tensor | None, proj: Projection,
                          n_heads: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [heads, d_model, d_head] and b [heads, d_head] of a q/k/v projection."""
    w = _head_slice(in_out(weight, proj.layout), proj, n_heads, d_head).permute(1, 0, 2)
    b = None if bias is None else _head_slice(bias, proj, n_heads, d_head)
    return w, b


def read_output_projection(weight: torch.Tensor, bias: torch.Tensor | None, proj: Projection,
                           n_heads: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_O [heads, d_head, d_model] and b_O [d_model]."""
    w = in_out(weight, proj.layout)  # [heads * d_head, d_model]
    return w.unflatten(0, (n_heads, d_head)), bias


def read_mlp_projection(weight: torch.Tensor, bias: torch.Tensor | None, proj: Projection
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [in, out] (W_in/W_gate: [d_model, d_mlp]; W_out: [d_mlp, d_model]) and b [out]."""
    return in_out(weight, proj.layout), bias
