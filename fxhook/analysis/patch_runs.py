"""How a patching sweep's patches become forward passes, and the corrupted run that by-position passes resume.

A sweep does several patches per forward pass, as copies of the input along the batch axis. A pass
(`PatchRun`) resumes at one hook point (`start`) and computes only what comes after it; a pass of
patches that each change one position computes only the positions from the earliest of them on,
reading the earlier positions' keys and values from the corrupted run's KV cache (attention is causal:
positions before a patch keep their corrupted values). Short passes cost mostly the reading of the
weights, so both planners put patches of consecutive layers in one pass (it resumes at the lowest layer,
and a hook at each layer patches its own copies). When the metric reads the last position only
(metric_reads.py), every pass unembeds that position alone (`CorruptedRun(last_only=True)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import einops
import torch

from fxhook.analysis.resume import required_inputs, run_resumed_after
from fxhook.core.hook_names import get_act_name, position_axis
from fxhook.runtime.kv_cache import KVCache

if TYPE_CHECKING:
    from fxhook.model import HookedTransformer

Member = tuple[int, tuple[int, ...]]  # (row number in the sweep, index: layer first)


@dataclass(frozen=True)
class PatchRun:
    """One forward pass: copy i of the input gets the patch members[i]; computed from hook point `start`
    on, and from position `first` on (0: every position)."""

    start: str
    members: tuple[Member, ...]
    first: int = 0

    def by_hook(self, activation_name: str) -> dict[str, list[tuple[int, tuple[int, ...]]]]:
        """hook name -> [(copy, index with its position counted from `first`)] for the patches there."""
        hooks: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
        for copy, (_, index) in enumerate(self.members):
            shifted = (index[0], index[1] - self.first, *index[2:]) if self.first else index
            hooks.setdefault(get_act_name(activation_name, index[0]), []).append((copy, shifted))
        return hooks


def copies(x: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of a batch along the batch axis, copy-major: [b, ...] -> [n * b, ...]."""
    return einops.repeat(x, "b ... -> (copies b) ...", copies=n)


def layer_runs(rows: Sequence[tuple[int, ...]], activation_name: str, per_run: int) -> list[PatchRun]:
    """Passes of at most per_run patches (every position), in layer order; a pass resumes at its lowest layer's
    hook and a hook at each of its layers patches its own copies. A layer's last few patches share a pass with
    the next layer's first ones rather than make a short pass of their own (12 heads, 8 a pass: 3 passes per
    2 layers, not 4), but a pass spans at most 2 layers (a copy computes at most one layer it did not need):
    so a sweep has at most 2 graphs (a start and a set of hooked layers) per layer."""
    by_layer: dict[int, list[Member]] = {}
    for number, index in enumerate(rows):
        by_layer.setdefault(index[0], []).append((number, tuple(index)))
    runs: list[PatchRun] = []
    group: list[Member] = []

    def close() -> None:
        if group:
            runs.append(PatchRun(get_act_name(activation_name, group[0][1][0]), tuple(group)))
            group.clear()

    for layer in sorted(by_layer):
        pending = by_layer[layer]
        if group and group[0][1][0] != layer - 1:
            close()
        while pending:
            take = per_run - len(group)
            group.extend(pending[:take])
            pending = pending[take:]
            if len(group) == per_run or (pending and group[0][1][0] != layer):
                close()
    close()
    return runs


def position_runs(rows: Sequence[tuple[int, ...]], activation_name: str, per_run: int, length: int
                  ) -> list[PatchRun]:
    """Passes for patches [layer, pos, ...] that each change one position (pos in range(length)).

    Each layer's patches, by position, in groups of per_run; a group computes positions first.. only.
    Groups of the same positions in an aligned span of layers (span a power of two, starting at a multiple
    of it) are then packed into one pass while it holds at most per_run * length rows (copies x positions
    computed), the size of one full-length pass of per_run copies: short passes, which cost mostly the
    reading of the weights, become fewer. Aligned spans keep the number of distinct passes (each its own
    graph: a start and a set of hooked layers) under 2 per layer."""
    by_layer: dict[int, list[Member]] = {}
    for number, index in enumerate(rows):
        by_layer.setdefault(index[0], []).append((number, tuple(index)))
    groups: dict[tuple[int, ...], dict[int, list[list[Member]]]] = {}  # positions -> layer -> its groups
    for layer in sorted(by_layer):
        members = sorted(by_layer[layer], key=lambda m: m[1][1])
        for i in range(0, len(members), per_run):
            group = members[i:i + per_run]
            groups.setdefault(tuple(sorted({index[1] for _, index in group})), {}).setdefault(layer, []).append(group)
    runs: list[PatchRun] = []
    for positions, layers in groups.items():
        rows_per_layer = max(len(group) for groups_there in layers.values() for group in groups_there)
        span = 1
        while 2 * span * rows_per_layer * (length - positions[0]) <= per_run * length:
            span *= 2
        packed: dict[int, list[Member]] = {}
        for layer, groups_there in layers.items():
            if span == 1 or len(groups_there) > 1:
                runs.extend(_pass(activation_name, group) for group in groups_there)
            else:
                packed.setdefault(layer - layer % span, []).extend(groups_there[0])
        runs.extend(_pass(activation_name, members) for _, members in sorted(packed.items()))
    return runs


def _pass(activation_name: str, members: list[Member]) -> PatchRun:
    """A by-position pass: from its lowest layer's hook and its earliest position."""
    start = min(index[0] for _, index in members)
    return PatchRun(get_act_name(activation_name, start), tuple(members), min(index[1] for _, index in members))


class CorruptedRun:
    """The corrupted run, kept for passes that compute only the positions from their earliest patch on
    (and, with last_only, unembed only the last position): its logits, the activations those passes read,
    and its keys and values (a KV cache)."""

    def __init__(self, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, runs: Sequence[PatchRun],
                 activation_name: str, last_only: bool = False):
        self.model, self.tokens, self.mask, self.last_only = model, tokens, mask, last_only
        live = model.live_hooks()
        self.needed = {run: required_inputs(model, frozenset([run.start]),
                                            live_hooks=live | set(run.by_hook(activation_name)), after_cache=True,
                                            last_position=last_only)
                       for run in runs}
        wanted = sorted({name for names in self.needed.values() for name in names})
        self.logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=wanted)
        self.activations = dict(cache.items())
        self.kv = model.init_kv_cache(tokens.shape[0])
        if any(run.first for run in runs):
            model.decoder.run_growing(self.kv, tokens, mask)
        # what a last_only metric is given at the earlier positions
        self.unread = torch.full_like(self.logits[:, :-1], float("nan")) if last_only else None

    def logits_after(self, run: PatchRun) -> torch.Tensor:
        """Logits [copies * batch, pos - run.first, d_vocab] of the run's copies of the input at positions
        run.first.. (the last position only: [copies * batch, 1, d_vocab] with last_only), resumed at
        run.start (the hooks attached now fire)."""
        n, first = len(run.members), run.first
        past = KVCache([copies(k[:, :, :first], n) for k in self.kv.keys],
                       [copies(v[:, :, :first], n) for v in self.kv.values], copies(self.mask[:, :first], n))
        values = {name: copies(from_position(name, self.activations[name], first), n) for name in self.needed[run]}
        return run_resumed_after(self.model, frozenset([run.start]), values, past, copies(self.tokens[:, first:], n),
                                 copies(self.mask[:, first:], n), last_position=self.last_only)

    def whole(self, logits_after: torch.Tensor, first: int) -> torch.Tensor:
        """[batch, pos, d_vocab]: one copy's logits of the positions from `first` on, after the corrupted
        run's logits of the earlier positions; with last_only, the last position's after NaN."""
        if self.last_only:
            return torch.cat([self.unread, logits_after.to(self.logits)], dim=1)
        return torch.cat([self.logits[:, :first], logits_after.to(self.logits)], dim=1)


def from_position(name: str, value: torch.Tensor, first: int) -> torch.Tensor:
    """Activation `name` [batch, pos, ...] from position `first` on, along its position axis: for a pattern or
    scores [batch, head, query_pos, key_pos] the rows of the queries from `first` on, every key kept (what a
    pass of those positions after a KV cache of the earlier ones computes)."""
    if first == 0:
        return value
    axis = position_axis(name)
    if axis is None:
        raise ValueError(f"{name} is not a per-position activation: a pass over the later positions cannot read it")
    return value.narrow(axis, first, value.shape[axis] - first)
