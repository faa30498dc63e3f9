"""Compiled execution: every graph variant that runs goes through torch.compile.

A variant is specialised to a hook set (which points are hooked, which
activations are cached), so no hook machinery is left in it for points nobody
hooks. Hooked points run their hooks as Python between compiled regions
(`hook_point._run_hooks_outside_graph`). Variants are cached by hook set, and
each keeps its compiled code: switching between hook sets does not recompile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

_COMPILED = "_fxhook_compiled"  # gm.__dict__ key: (CompileOptions, compiled callable)


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool = True


class CompileMixin:
    """`model.compile()` and the one place graphs are run."""

    _compile_options: CompileOptions | None = None

    @property
    def is_compiled(self) -> bool:
        return self._compile_options is not None

    def compile(self, enabled: bool = True, *, backend: str = "inductor", mode: str | None = None,
                dynamic: bool = True):  # type: ignore[override]
        """Run forward, run_with_cache, run_with_hooks (and generation) through torch.compile.

        Each hook set compiles once, on its first call (tens of seconds on a CPU for a small model),
        then runs from the compiled code: with dynamic=True, new batch sizes and lengths do not
        recompile (batch size 1 is compiled apart, as torch specialises it). `compile(False)` turns
        compilation off again. `backend` and `mode` are torch.compile's. Returns the model.
        """
        self.__dict__["_compile_options"] = CompileOptions(backend, mode, dynamic) if enabled else None
        return self

    def run_graph(self, gm: fx.GraphModule, *args: torch.Tensor) -> Any:
        """gm(*args), compiled when the model is."""
        options = self._compile_options
        if options is None:
            return gm(*args)
        entry = gm.__dict__.get(_COMPILED)
        if entry is None or entry[0] != options:
            compiled = torch.compile(gm, backend=options.backend, mode=options.mode, dynamic=options.dynamic)
            entry = gm.__dict__[_COMPILED] = (options, compiled)
        return entry[1](*args)
