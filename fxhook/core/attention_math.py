"""Attention kernels called inside fxhook graphs: TransformerLens's explicit maths (the reference every
lowering equals), the fused SDPA form, grouped-query attention over a static cache, and the additive mask."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Identity = Callable[[torch.Tensor], torch.Tensor]
# how an SDPA call appears in a captured graph (torch's two spellings of one function)
SDPA_FUNCTIONS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)


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
    alibi_slopes: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (z [b, p_q, h, d_v], scores, pattern) with TransformerLens masking.

    `n_rep` = h // kv (grouped-query attention); passed in so the function can
    also be traced symbolically. `alibi_slopes` (one per query head) adds ALiBi's bias
    (`alibi_bias`) to the scaled scores before masking, as TransformerLens does.

    Masked scores are -inf; rows with nothing to attend to get an all-zero
    pattern rather than NaN (TransformerLens does the same), with finite gradients.
    """
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q, k, mask).to(scores.dtype)
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


def alibi_bias(slopes: Sequence[float], q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
               ) -> torch.Tensor:
    """ALiBi's score bias, broadcastable to [b, h, p_q, p_k]: slopes[h] * (key index - query index), float32.
    q [b, h, p_q, d] and k [b, kv, p_k, d] give only the lengths and device; mask is bool [b, 1, p_q, p_k].

    A query's index is read from the mask as the last key it may see (itself, for every real token), so
    the same rule holds in a forward pass, a growing KV cache and a static one (queries at any cache
    slot). A row with nothing to attend to is masked whole, whatever its bias. Without a mask the
    queries are the last p_q of the p_k keys. The slopes enter as a constant of the graph (`new_tensor`),
    so the function can be traced symbolically."""
    key_idx = torch.arange(k.shape[-2], device=q.device)  # [p_k]
    if mask is None:
        query_idx = (torch.arange(q.shape[-2], device=q.device) + (k.shape[-2] - q.shape[-2]))[:, None]
    else:
        query_idx = (mask * key_idx).amax(-1, keepdim=True)  # [b, 1, p_q, 1]
    distance = (key_idx - query_idx).to(torch.float32)
    per_head = q.new_tensor(list(slopes), dtype=torch.float32)[:, None, None]  # [h, 1, 1]
    return per_head * distance


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, n_rep: int) -> torch.Tensor:
    """z [b, p_q, h, d_v] by the fused kernel, equal to `eager_attention`'s z.

    A query row with nothing to attend to (a left-pad position) would make SDPA return NaN: it attends
    to every key instead and its z is set to zero, as the eager math gives.
    """
    if mask is None:
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=n_rep > 1)
        return z.transpose(1, 2)
    has_key = mask.any(dim=-1, keepdim=True)  # [b, 1, p_q, 1]
    z = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~has_key, scale=scaling, enable_gqa=n_rep > 1)
    return z.masked_fill(~has_key, 0.0).transpose(1, 2)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      scale: float | None = None, enable_gqa: bool = False, **_unused) -> torch.Tensor:
    """SDPA's result for grouped-query attention without repeating k and v.

    q [b, h, n, d], k/v [b, kv, L, d]: the r = h / kv query heads of a group are laid out as r * n
    rows against their group's keys, so both products are plain batched matmuls over the cache.
    (Compiled SDPA with enable_gqa copies each layer's whole static cache r times at every token.)
    """
    b, h, n, d = q.shape
    groups = k.shape[1]
    r = h // groups
    scale = d ** -0.5 if scale is None else scale
    scores = torch.matmul(q.reshape(b, groups, r * n, d), k.transpose(-1, -2)) * scale  # [b, kv, r*n, L]
    if attn_mask is not None:
        grouped = scores.view(b, groups, r, n, -1)
        mask = attn_mask.unsqueeze(2)  # [b, 1, 1, n, L]
        grouped = grouped.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else grouped + mask
        scores = grouped.view(b, groups, r * n, -1)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(pattern, v).view(b, h, n, v.shape[-1])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask (True = attend) -> 0 / -inf of `dtype`, what SDPA makes of it per call."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
