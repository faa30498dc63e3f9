"""Attaching user hooks to HookPoints by name or filter, and taking them off again.

`add` attaches model-wide hooks (add_hook, add_perma_hook: every call sees them). `attached`
(the `hooks()` context, run_with_hooks, run_with_cache, generate) attaches a call's hooks to the
current thread or asyncio task only, and they are gone when the block ends, by return or exception.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Iterable, Iterator, Sequence, Union

from fxhook.core import hook_names
from fxhook.core.hook_point import Direction, HookEntry, HookFn, HookPoint, call_hooks, drop_call_hooks

NameOrFilter = Union[str, Callable[[str], bool], Sequence[str]]
HookSpec = tuple[NameOrFilter, HookFn]


class UnknownHookError(KeyError):
    """A hook name that this model does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def unknown_hook_message(name: str, known: Iterable[str]) -> str:
    known = list(known)
    kind = hook_names.kind_of(name)
    if kind is not None and kind.flag is not None:
        return (f"no hook point named {name!r} in this model: it exists only while {kind.flag} is on "
                f"(model.cfg.{kind.flag} = True)")
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"no hook point named {name!r} in this model.{hint} "
            f"(model.hook_dict lists all {len(known)} names; some hooks only exist when their flag is on, "
            f"e.g. set_use_attn_result(True) for hook_result)")


class HookRegistry:
    """The live hook points of a model, looked up by name or filter."""

    def __init__(self, points: Callable[[], dict[str, HookPoint]]):
        self._points = points  # current, visible points (depends on the model's flags)

    @property
    def points(self) -> dict[str, HookPoint]:
        return self._points()

    def select(self, name_or_filter: NameOrFilter) -> list[HookPoint]:
        points = self.points
        if isinstance(name_or_filter, str):
            if name_or_filter not in points:
                raise UnknownHookError(unknown_hook_message(name_or_filter, points))
            return [points[name_or_filter]]
        if callable(name_or_filter):
            return [p for name, p in points.items() if name_or_filter(name)]
        if isinstance(name_or_filter, (list, tuple, set, frozenset)):
            return [p for name in name_or_filter for p in self.select(name)]
        raise TypeError(f"a hook target must be a name, a list of names or a filter function, "
                        f"got {type(name_or_filter).__name__}")

    def add(self, name_or_filter: NameOrFilter, fn: HookFn, dir: Direction = "fwd",
            is_permanent: bool = False, prepend: bool = False) -> list[tuple[HookPoint, HookEntry]]:
        if not callable(fn):
            raise TypeError(f"a hook must be callable as fn(activation, hook), got {type(fn).__name__}")
        return [(p, p.add_hook(fn, dir=dir, is_permanent=is_permanent, prepend=prepend))
                for p in self.select(name_or_filter)]

    def reset(self, including_permanent: bool = False, clear_contexts: bool = True,
              all_points: Iterable[HookPoint] | None = None, direction: str = "both") -> None:
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")
        drop_call_hooks(direction)
        for p in (all_points if all_points is not None else self.points.values()):
            p.remove_hooks(direction, including_permanent=including_permanent)
            if clear_contexts:
                p.clear_context()

    @contextlib.contextmanager
    def attached(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = (),
                 reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator[None]:
        """Attach hooks for the block, to this thread or task only. With reset_hooks_end=False they are
        attached model-wide instead and stay after the block (TransformerLens's meaning)."""
        for _, fn in (*fwd_hooks, *bwd_hooks):
            if not callable(fn):
                raise TypeError(f"a hook must be callable as fn(activation, hook), got {type(fn).__name__}")
        added = [(point, direction, HookEntry(fn))
                 for direction, specs in (("fwd", fwd_hooks), ("bwd", bwd_hooks))
                 for name_or_filter, fn in specs for point in self.select(name_or_filter)]
        if not reset_hooks_end:
            for point, direction, entry in added:
                point.add_hook(entry.fn, dir=direction)
            yield
            return
        try:
            with call_hooks(added):
                yield
        finally:
            if clear_contexts:
                for point, _, _ in added:
                    point.clear_context()
