"""The attention core as TransformerLens computes it, shared by every lowering."""
from __future__ import annotations

from typing import Callable

import torch

Identity = Callable[[torch.Tensor], torch.Tensor]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv, p, d] -> [b, kv * n_rep, p, d], each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def eager_attention(
    q: torch.Tensor,  # [b, h, p_q, d]
    k: torch.Tensor,  # [b, kv, p_k, d]
    v: torch.Tensor,  # [b, kv, p_k, d_v]
    mask: torch.Tensor | None,  # bool [b, 1, p_q, p_k], True = attend
    scaling: float,
    softcap: float | None,
    n_rep: int = 1,
    hook_scores: Identity = _same,
    hook_pattern: Identity = _same,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (z [b, p_q, h, d_v], scores, pattern) with TransformerLens masking.

    `n_rep` = h // kv (grouped-query attention); passed in so the function can
    also be traced symbolically.

    Masked scores are -inf; rows with nothing to attend to get an all-zero
    pattern rather than NaN (TransformerLens does the same), with finite gradients.
    """
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = hook_scores(scores)
    # a query with nothing to attend to (a left-pad position) gets an all-zero pattern; softmax over a
    # finite stand-in row keeps its gradient finite too
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)
    pattern = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1, dtype=torch.float32).to(scores.dtype)
    pattern = pattern.masked_fill(empty_row, 0.0)
    pattern = hook_pattern(pattern).to(v.dtype)
    z = torch.matmul(pattern, v).transpose(1, 2)
    return z, scores, pattern
