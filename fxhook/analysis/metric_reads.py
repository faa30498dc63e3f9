"""Whether a patching metric reads the last position's logits only.

Almost every patching metric is a logit difference at the final position, yet each patched pass
unembeds every position: on GPT-2's shape (vocab 50257) that is a quarter of a pass. When the metric
reads the last position only, a sweep's passes unembed that position alone (passes/last_position.py)
and give the metric NaN at the others.

A metric is an arbitrary function, so this is decided by probing it on the corrupted run's logits, and
each probe must agree: its gradient is zero at every earlier position, and its value is the same (to the
bit) when every earlier position is replaced by NaN, by +inf and by -inf (which catches reads that have no
gradient: argmax, comparisons, integer indexing by a value). A metric that then reads an earlier position
in some patched pass (its reads depend on the values) sees NaN there: a NaN result sends that pass back to
full recomputation (patching.py), so the result is right either way.
"""
from __future__ import annotations

from typing import Callable

import torch

_FILLS = (float("nan"), float("inf"), float("-inf"))


def reads_last_position_only(metric: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> bool:
    """True when metric(logits [batch, pos, d_vocab]) depends on logits[:, -1] only, by every probe above.
    False (read every position) for a metric that is not a differentiable scalar of the logits, that gives a
    non-finite value on them, or that fails on a probe (the sweep then calls it as usual and any error shows)."""
    if logits.dim() != 3 or logits.shape[1] < 2:
        return False
    try:
        with torch.no_grad():
            reference = metric(logits)
        if not isinstance(reference, torch.Tensor) or reference.numel() != 1 or not torch.isfinite(reference).all():
            return False
        probe = logits.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # sweeps run under no_grad
            value = metric(probe)
            if not (isinstance(value, torch.Tensor) and value.requires_grad):
                return False
            (gradient,) = torch.autograd.grad(value.sum(), probe)
        if gradient[:, :-1].any():
            return False
        with torch.no_grad():
            for fill in _FILLS:
                blanked = logits.clone()
                blanked[:, :-1] = fill
                out = metric(blanked)
                if not isinstance(out, torch.Tensor) or not torch.equal(out.reshape(()), reference.reshape(())):
                    return False
    except Exception:  # noqa: BLE001 - a metric that cannot take a probe is treated as reading every position
        return False
    return True
