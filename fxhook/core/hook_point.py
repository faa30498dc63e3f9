"""HookPoint: an identity module at a named activation, running user hooks.

Hooks live in plain lists on the module rather than as nn.Module hooks, so
nothing depends on torch.compile's nn.Module-hook guards: under compilation a
hooked point runs its hooks outside the graph (see `_run_hooks_outside_graph`),
and which points are hooked selects the graph variant that runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

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


class HookPoint(nn.Module):
    """Identity at activation `name`; `fn(activation, hook=self)` may return a replacement."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fwd_hooks: list[HookEntry] = []
        self.bwd_hooks: list[HookEntry] = []
        self.ctx: dict = {}

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
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        hooks.insert(0, entry) if prepend else hooks.append(entry)
        return entry

    def remove_hooks(self, dir: Direction | Literal["both"] = "fwd", including_permanent: bool = False) -> None:
        def keep(entry: HookEntry) -> bool:
            return entry.permanent and not including_permanent
        if dir in ("fwd", "both"):
            self.fwd_hooks[:] = [e for e in self.fwd_hooks if keep(e)]
        if dir in ("bwd", "both"):
            self.bwd_hooks[:] = [e for e in self.bwd_hooks if keep(e)]

    def remove_entry(self, entry: HookEntry) -> None:
        for hooks in (self.fwd_hooks, self.bwd_hooks):
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
        if self.bwd_hooks and x.requires_grad:
            x = _BackwardHookCall.apply(x, self)
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
    def forward(ctx, x: torch.Tensor, point: HookPoint) -> torch.Tensor:
        ctx.point = point
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        point: HookPoint = ctx.point
        for entry in list(point.bwd_hooks):
            out = entry.fn(grad, hook=point)
            if out is not None:
                grad = point._checked(entry.fn, grad, out)
        return grad, None
