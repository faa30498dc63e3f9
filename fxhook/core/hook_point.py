"""HookPoint: an identity module at a named activation, running user hooks.

Hooks live in plain lists rather than as nn.Module hooks, so nothing depends
on torch.compile's nn.Module-hook guards: under compilation a hooked point runs
its hooks outside the graph (see `_run_hooks_outside_graph`), and which points
are hooked selects the graph variant that runs.

Two kinds of hooks: model-wide ones (`add_hook`, seen by every call) live on
the point; hooks of one call (`model.hooks()`, `run_with_hooks`, ...) live in
a context variable (`call_hooks`), so concurrent calls from other threads or
asyncio tasks never see them.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from fxhook.core.hook_names import layer_of

HookFn = Callable[..., Any]
Direction = Literal["fwd", "bwd"]


class HookShapeError(ValueError):
    """A hook returned a tensor whose shape differs from the activation it replaces."""


@dataclass(eq=False)
class HookEntry:
    fn: HookFn
    permanent: bool = False


# the hooks of the calls running in this context: point -> (forward entries, backward entries)
_CallHooks = Mapping["HookPoint", tuple[tuple[HookEntry, ...], tuple[HookEntry, ...]]]
_CALL_HOOKS: contextvars.ContextVar[_CallHooks] = contextvars.ContextVar("fxhook_call_hooks", default={})
_NONE: tuple[tuple[HookEntry, ...], tuple[HookEntry, ...]] = ((), ())


@contextlib.contextmanager
def call_hooks(added: Sequence[tuple["HookPoint", Direction, HookEntry]]) -> Iterator[None]:
    """Within the block, in this thread or task only, these hooks run at their points (after the
    model-wide ones). They are gone when the block ends, however it ends."""
    hooks = dict(_CALL_HOOKS.get())
    for point, direction, entry in added:
        fwd, bwd = hooks.get(point, _NONE)
        hooks[point] = (fwd + (entry,), bwd) if direction == "fwd" else (fwd, bwd + (entry,))
    token = _CALL_HOOKS.set(hooks)
    try:
        yield
    finally:
        _CALL_HOOKS.reset(token)


def call_hooked_points() -> Iterator["HookPoint"]:
    """The points that have hooks of the calls running in this context."""
    return iter(_CALL_HOOKS.get())


def drop_call_hooks(direction: Literal["fwd", "bwd", "both"] = "both") -> None:
    """Remove the hooks of the calls running in this context (reset_hooks inside a hooks() block)."""
    drop_fwd, drop_bwd = direction in ("fwd", "both"), direction in ("bwd", "both")
    kept = {point: (() if drop_fwd else fwd, () if drop_bwd else bwd) for point, (fwd, bwd) in _CALL_HOOKS.get().items()}
    _CALL_HOOKS.set({point: hooks for point, hooks in kept.items() if hooks[0] or hooks[1]})


class HookPoint(nn.Module):
    """Identity at activation `name`; `fn(activation, hook=self)` may return a replacement."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self._fwd: list[HookEntry] = []  # model-wide hooks
        self._bwd: list[HookEntry] = []
        self.ctx: dict = {}

    @property
    def fwd_hooks(self) -> tuple[HookEntry, ...]:
        """The forward hooks this point runs in this context: model-wide, then this call's."""
        return (*self._fwd, *_CALL_HOOKS.get().get(self, _NONE)[0])

    @property
    def bwd_hooks(self) -> tuple[HookEntry, ...]:
        return (*self._bwd, *_CALL_HOOKS.get().get(self, _NONE)[1])

    def has_model_wide_hooks(self) -> bool:
        return bool(self._fwd or self._bwd)

    def __hash__(self) -> int:  # identity, as nn.Module; stated because the context keys on points
        return id(self)

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd_hooks)}, bwd={len(self.bwd_hooks)})"

    def layer(self) -> int:
        """The block index in this hook's name (TransformerLens's `hook.layer()`)."""
        layer = layer_of(self.name)
        if layer is None:
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return layer

    def add_hook(self, fn: HookFn, dir: Direction = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> HookEntry:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        entry = HookEntry(fn, is_permanent)
        hooks = self._fwd if dir == "fwd" else self._bwd
        hooks.insert(0, entry) if prepend else hooks.append(entry)
        return entry

    def remove_hooks(self, dir: Direction | Literal["both"] = "fwd", including_permanent: bool = False) -> None:
        def keep(entry: HookEntry) -> bool:
            return entry.permanent and not including_permanent
        if dir in ("fwd", "both"):
            self._fwd[:] = [e for e in self._fwd if keep(e)]
        if dir in ("bwd", "both"):
            self._bwd[:] = [e for e in self._bwd if keep(e)]

    def remove_entry(self, entry: HookEntry) -> None:
        for hooks in (self._fwd, self._bwd):
            if entry in hooks:
                hooks.remove(entry)

    def clear_context(self) -> None:
        self.ctx.clear()

    def _checked(self, fn: HookFn, x: torch.Tensor, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"hook {getattr(fn, '__name__', fn)!r} at {self.name!r} returned "
                            f"{type(out).__name__}; return a tensor or None")
        if out.shape != x.shape:
            raise HookShapeError(
                f"hook {getattr(fn, '__name__', fn)!r} at {self.name!r} returned shape {tuple(out.shape)}, "
                f"but the activation has shape {tuple(x.shape)}; a hook must return a tensor of the same shape "
                f"(or None to keep the activation)")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _run_hooks_outside_graph(self, x)
        return self.run_hooks(x)

    def run_hooks(self, x: torch.Tensor) -> torch.Tensor:
        for entry in self.fwd_hooks:
            out = entry.fn(x, hook=self)
            if out is not None:
                x = self._checked(entry.fn, x, out)
        bwd = self.bwd_hooks
        if bwd and x.requires_grad:
            x = _BackwardHookCall.apply(x, self, bwd)
        return x


@torch.compiler.disable
def _run_hooks_outside_graph(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """In a compiled graph, a hooked point is a graph break: its hooks run as plain Python.

    The compiled code then depends on which points are hooked (the graph variant), never on the hook
    functions themselves: new hook functions at the same points reuse the compiled code, a hook may do
    anything Python can, and adding or removing hooks is seen on the next call.
    """
    return point.run_hooks(x)


class _BackwardHookCall(torch.autograd.Function):
    """Identity whose backward runs the point's bwd hooks on the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, point: HookPoint, hooks: tuple[HookEntry, ...]) -> torch.Tensor:
        ctx.point, ctx.hooks = point, hooks  # the hooks of the forward's context, whichever thread runs backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        point: HookPoint = ctx.point
        for entry in ctx.hooks:
            out = entry.fn(grad, hook=point)
            if out is not None:
                grad = point._checked(entry.fn, grad, out)
        return grad, None, None
