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


def refuse_level(level: int | None) -> None:
    """TransformerLens's hook `level` (nested hook contexts) has no meaning here: refused, not ignored."""
    if level is not None:
        raise ValueError(f"level={level!r} is not supported: fxhook's hooks() blocks nest by themselves (each "
                         f"block removes exactly its own hooks); call without level")


def _check_direction(dir: str) -> None:
    if dir not in ("fwd", "bwd", "both"):
        raise ValueError(f"hook direction must be 'fwd', 'bwd' or 'both', got {dir!r}")


class _AliasedPoint:
    """What a hook added with alias_names sees: the point under another name."""

    def __init__(self, name: str, point: "HookPoint"):
        self.name, self._point = name, point

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._point, attribute)

    def layer(self) -> int:
        layer = layer_of(self.name)
        if layer is None:
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return layer


def _aliased(hook: HookFn, point: "HookPoint", alias_names: list[str]) -> HookFn:
    """A hook that runs `hook` once per alias name, each call seeing the previous one's replacement."""
    views = [_AliasedPoint(name, point) for name in alias_names]

    def run_under_aliases(x: torch.Tensor, hook: Any = None) -> torch.Tensor | None:
        changed = False
        for view in views:
            out = run_under_aliases.inner(x, hook=view)
            if out is not None:
                x, changed = out, True
        return x if changed else None
    run_under_aliases.inner = hook
    run_under_aliases.__name__ = getattr(hook, "__name__", "hook")
    return run_under_aliases


class HookPoint(nn.Module):
    """Identity at activation `name`; `fn(activation, hook=self)` may return a replacement."""

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name  # None until a model names it (TransformerLens's HookPoint() is made unnamed)
        self._fwd: list[HookEntry] = []  # model-wide hooks
        self._bwd: list[HookEntry] = []
        self.ctx: dict = {}
        self.hook_conversion: Any = None  # enable_reshape: hooks see convert(x), return values pass revert()

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

    def add_hook(self, hook: HookFn, dir: Direction = "fwd", is_permanent: bool = False, level: int | None = None,
                 prepend: bool = False, alias_names: list[str] | None = None) -> HookEntry:
        """Run `hook(activation, hook=point)` at this point in every call until removed; a returned
        tensor replaces the activation. With alias_names, the hook runs once per alias and sees a point
        of that name. `level` (TransformerLens's nested hook contexts) is refused: hooks() blocks nest
        by themselves here."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        refuse_level(level)
        if alias_names is not None:
            hook = _aliased(hook, self, list(alias_names))
        entry = HookEntry(hook, is_permanent)
        hooks = self._fwd if dir == "fwd" else self._bwd
        hooks.insert(0, entry) if prepend else hooks.append(entry)
        return entry

    def add_perma_hook(self, hook: HookFn, dir: Direction = "fwd") -> HookEntry:
        """A hook that `remove_hooks` / `reset_hooks` keep unless told including_permanent=True."""
        return self.add_hook(hook, dir=dir, is_permanent=True)

    def has_hooks(self, dir: Direction | Literal["both"] = "both", including_permanent: bool = True,
                  level: int | None = None) -> bool:
        """Whether hooks run here in this context (model-wide ones and this call's)."""
        _check_direction(dir)
        refuse_level(level)
        entries = (self.fwd_hooks if dir in ("fwd", "both") else ()) + (self.bwd_hooks if dir in ("bwd", "both") else ())
        return any(including_permanent or not entry.permanent for entry in entries)

    def remove_hooks(self, dir: Direction | Literal["both"] = "fwd", including_permanent: bool = False,
                     level: int | None = None) -> None:
        """Remove this point's model-wide hooks of that direction (permanent ones only when asked)."""
        _check_direction(dir)
        refuse_level(level)

        def keep(entry: HookEntry) -> bool:
            return entry.permanent and not including_permanent
        if dir in ("fwd", "both"):
            self._fwd[:] = [e for e in self._fwd if keep(e)]
        if dir in ("bwd", "both"):
            self._bwd[:] = [e for e in self._bwd if keep(e)]

    def enable_reshape(self, hook_conversion: Any = None) -> None:
        """Show hooks `hook_conversion.convert(x)` instead of x, and turn what they return back with
        `hook_conversion.revert(...)` (None switches it off). Applies to forward and backward hooks."""
        if hook_conversion is not None and not (hasattr(hook_conversion, "convert") and hasattr(hook_conversion, "revert")):
            raise TypeError(f"a hook_conversion must have convert() and revert() methods, got {type(hook_conversion).__name__}")
        self.hook_conversion = hook_conversion

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

    def _call(self, fn: HookFn, x: torch.Tensor) -> Any:
        """fn's result on x, through the reshape conversion when one is enabled."""
        conversion = self.hook_conversion
        if conversion is None:
            return fn(x, hook=self)
        out = fn(conversion.convert(x), hook=self)
        return None if out is None else conversion.revert(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _run_hooks_outside_graph(self, x)
        return self.run_hooks(x)

    def run_hooks(self, x: torch.Tensor) -> torch.Tensor:
        for entry in self.fwd_hooks:
            out = self._call(entry.fn, x)
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
            out = point._call(entry.fn, grad)
            if out is not None:
                grad = point._checked(entry.fn, grad, out)
        return grad, None, None
