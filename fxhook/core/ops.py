"""Custom ops that mark hook sites so they survive `torch.export` as named nodes.

`fxhook::hook(x, name)` is an identity marker; the hook-insertion pass turns each
into a HookPoint call. `fxhook::attention(...)` keeps a layer's attention core
opaque during capture so a later pass can lower it either to explicit,
hookable math or to the fused SDPA kernel.
"""
from __future__ import annotations

import torch

HOOK_OP_NAME = "fxhook::hook"
ATTENTION_OP_NAME = "fxhook::attention"


@torch.library.custom_op(HOOK_OP_NAME, mutates_args=())
def hook_marker(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@hook_marker.register_fake
def _hook_marker_fake(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scaling: float, softcap: float | None, alibi_slopes: list[float] | None = None,
) -> torch.Tensor:
    """Plain attention: q [b h p d], k/v [b kv p_k d], mask bool [b 1 p p_k] -> z [b p h d]."""
    from fxhook.core.attention_math import eager_attention

    z, _scores, _pattern = eager_attention(q, k, v, mask, scaling, softcap, q.shape[1] // k.shape[1],
                                           alibi_slopes=alibi_slopes)
    return z


@torch.library.custom_op(ATTENTION_OP_NAME, mutates_args=())
def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scaling: float, softcap: float | None, layer: int, alibi_slopes: list[float] | None = None,
) -> torch.Tensor:
    """`alibi_slopes` (one per query head): ALiBi's score bias slope * (key index - query index)."""
    return _attention_reference(q, k, v, mask, scaling, softcap, alibi_slopes)


@attention_core.register_fake
def _attention_core_fake(q, k, v, mask, scaling, softcap, layer, alibi_slopes=None):
    b, h, p, _ = q.shape
    return q.new_empty((b, p, h, v.shape[-1]))


hook_op = torch.ops.fxhook.hook.default
attention_op = torch.ops.fxhook.attention.default
