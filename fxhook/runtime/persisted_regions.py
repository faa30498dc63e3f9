"""Compiled regions a later process loads instead of tracing them again (PyTorch's AOT precompile).

torch.compile's own caches (inductor's FX graph cache, the AOTAutograd cache) spare a second process
the lowering but not dynamo: it still traced every distinct region, and that was most of a warm start.
So for inference calls (no grad) of regions compiled by inductor in its default mode, each region's
code is made by `torch.compile(...).aot_compile` (dynamo's trace and guards with inductor's code, in
one bundle) and saved with `save_compiled_function`; a later process loads it with
`torch.compiler.load_compiled_function` and calls it while its guards hold (dtypes, devices, the
static sizes of weights and buffers, the constraints on the dynamic sizes, grad mode). No tracing, no
lowering. Inputs whose guards fail compile one more artifact (as dynamo recompiles), at most
`MAX_ARTIFACTS` a region; calls with grad enabled, and other backends or modes, use torch.compile.

Keyed safely: a file's name hashes the region signature (its op graph, passes/regions.py), the
source of any Python function the graph calls, the compile options, the Python and torch versions
(PyTorch checks them again on load) and the configuration of inductor, AOTAutograd and dynamo.
The sources PyTorch records as traced are also checked on load, as its own package loader does; an
artifact that fails that check is deleted and compiled anew. Files live in the inductor cache folder
(TORCHINDUCTOR_CACHE_DIR), under fxhook_regions/.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import inspect
import platform
import threading
import types
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from fxhook.passes.regions import LIFTED_PREFIX

MAX_ARTIFACTS = 8  # compiled variants (guard sets) of one region, as dynamo's recompile limit
FOLDER = "fxhook_regions"


def persistable(options: Any) -> bool:
    """Whether regions compiled under `options` (runtime/graphs.CompileOptions) go through saved
    artifacts: inductor in its default mode with dynamic sizes (other backends' code cannot be saved;
    CUDA-graph modes keep their own state; an artifact never turns dynamic as dynamo's automatic
    dynamic shapes do, so static or automatic sizes keep torch.compile)."""
    return options.backend == "inductor" and options.mode is None and options.dynamic is True


def static_view(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it is a Parameter (dynamo keeps their sizes static), else an alias of it marked
    static for dynamo (buffers, constants: a dynamic rotary table took the length's size, then
    recompiled). An alias, so the model's own tensor carries no mark: torch 2.13 saves no dimension
    marks with a precompiled function's guards, and a loaded function refuses a marked tensor. A
    detached alias where no gradient flows (a view would have dynamo guard on its base)."""
    if type(tensor) is nn.Parameter:
        return tensor
    alias = tensor.view_as(tensor) if tensor.requires_grad else tensor.detach()
    torch._dynamo.mark_static(alias)
    return alias


def _stable(value: Any) -> str:
    """repr with sets in sorted order (their repr follows the process's string hashing)."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_stable(v) for v in value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_stable(k)}: {_stable(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ", ".join(_stable(v) for v in value) + ")"
    return repr(value)


def python_sources(region: fx.GraphModule) -> list[str]:
    """The source of every module defining a Python function `region` calls (the signature names such a
    function, not its code; fxhook's graphs call torch ops and builtins only, so this is usually empty)."""
    modules = {inspect.getmodule(node.target) for node in region.graph.nodes
               if node.op == "call_function" and isinstance(node.target, types.FunctionType)}
    return [inspect.getsource(module) for module in sorted(filter(None, modules), key=lambda m: m.__name__)]


def artifact_key(signature: str, options: Any, sources: list[str] = ()) -> str:
    """The file-name key of a region's artifacts: what the guards do not check (see the module docstring);
    `sources`: python_sources of the region."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    parts = [signature, repr((options.backend, options.mode, options.dynamic)), platform.python_version(),
             torch.__version__, str(torch.version.git_version), *sources]
    parts += [_stable(config.save_config_portable()) for config in (inductor_config, functorch_config, dynamo_config)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _sources_unchanged(compiled: Any) -> bool:
    """Whether every source the artifact's trace went through is as it was (PyTorch's own check)."""
    from torch._dynamo.package import _hash_sourcelines

    for code in compiled.source_info().inlined_sources:
        try:
            module = importlib.import_module(code.module)
            if _hash_sourcelines(module, code.firstlineno, code.lastlineno) != code.checksum:
                return False
        except (ImportError, OSError, TypeError):
            return False
    return True


class _Guarded:
    """A precompiled function whose guards the caller checks once (`accepts`) before running it (`run`).

    `AOTCompiledFunction.guard_check` binds the arguments with inspect.Signature.bind (10-25 us a region,
    a quarter of a small region's run); dynamo's guard manager is given them by name directly instead,
    as guard_check does when the function has no closure (a region's forward has none)."""

    def __init__(self, compiled: Any):
        compiled.disable_guard_check()  # checked by accepts, once a call
        self.compiled = compiled
        artifacts = compiled._artifacts
        direct = not artifacts.runtime_env.closure and all(
            p.kind is p.POSITIONAL_OR_KEYWORD for p in artifacts.signature.parameters.values())
        self._names = tuple(artifacts.signature.parameters) if direct else None
        self._manager = artifacts.guard_manager

    def accepts(self, *args: Any) -> bool:
        if self._names is None or len(args) != len(self._names):
            return self.compiled.guard_check(*args)
        return self._manager.check(dict(zip(self._names, args)))

    def run(self, *args: Any) -> Any:
        return self.compiled(*args)


class PersistedRegion(nn.Module):
    """One region's compiled code for every layer that shares its signature: saved artifacts first
    (loaded on the first call), torch.compile for calls with grad enabled."""

    def __init__(self, region: fx.GraphModule, signature: str, options: Any, stats: collections.Counter):
        super().__init__()
        self.region = region
        self._options = options
        self._stats = stats
        self._folder = Path(_cache_dir()) / FOLDER
        self._key = artifact_key(signature, options, python_sources(region))
        self._static = frozenset(i for i, node in enumerate(n for n in region.graph.nodes if n.op == "placeholder")
                                 if node.name.startswith(LIFTED_PREFIX))  # its arguments that are model tensors
        self._artifacts: list[Any] | None = None  # loaded on first use
        self._dynamo: Callable | None = None
        self._unsaveable = False
        self._lock = threading.Lock()

    def forward(self, *args: Any) -> Any:
        if torch.is_grad_enabled() or self._unsaveable:
            return self._torch_compiled()(*self._marked(args))
        for artifact in self._artifacts if self._artifacts is not None else self._load():
            if artifact.accepts(self.region, *args):  # its signature is the unbound forward's
                return artifact.run(self.region, *args)
        return self._compile(args)

    def _marked(self, args: tuple) -> tuple:
        """`args` with the model's tensors as static views, for dynamo to trace (static_view)."""
        return tuple(static_view(a) if i in self._static else a for i, a in enumerate(args))

    def _torch_compiled(self) -> Callable:
        if self._dynamo is None:
            self._dynamo = torch.compile(self.region, backend=self._options.backend, mode=self._options.mode,
                                         dynamic=self._options.dynamic)
        return self._dynamo

    def _load(self) -> list[Any]:
        with self._lock:
            if self._artifacts is None:
                self._artifacts = [a for a in map(self._load_one, sorted(self._folder.glob(f"{self._key}-*.bin")))
                                   if a is not None]
            return self._artifacts

    def _load_one(self, path: Path) -> Any:
        try:
            with open(path, "rb") as file:
                artifact = torch.compiler.load_compiled_function(file, f_globals=self.region.forward.__globals__)
        except Exception as error:  # noqa: BLE001 - a file of another build or a torn write: compile anew
            warnings.warn(f"fxhook: ignoring compiled region {path.name} ({type(error).__name__}: {error})",
                          RuntimeWarning, stacklevel=4)
            return None
        if not _sources_unchanged(artifact):  # fxhook's code changed since: this artifact is stale for good
            path.unlink(missing_ok=True)
            self._stats["stale"] += 1
            return None
        self._stats["loaded"] += 1
        return _Guarded(artifact)

    def _compile(self, args: tuple) -> Any:
        """Run on inputs no artifact's guards accept: through a new artifact, saved for later processes."""
        with self._lock:  # one thread compiles; the others find its artifact
            artifacts = self._artifacts if self._artifacts is not None else []
            chosen = next((a for a in artifacts if a.accepts(self.region, *args)), None)
            if chosen is None and len(artifacts) < MAX_ARTIFACTS and not self._unsaveable:
                chosen = self._precompile(args)
                if chosen is not None:
                    self._artifacts = [*artifacts, chosen]
        if chosen is None:  # too many variants, or this region cannot be saved
            return self._torch_compiled()(*self._marked(args))
        return chosen.run(self.region, *args)

    def _precompile(self, args: tuple) -> Any:
        try:
            artifact = torch.compile(self.region.forward, backend=self._options.backend, fullgraph=True,
                                     dynamic=self._options.dynamic).aot_compile((self._marked(args), {}))
        except Exception as error:  # noqa: BLE001 - what dynamo cannot save torch.compile can still run
            warnings.warn(f"fxhook: this region cannot be precompiled ({type(error).__name__}: {error}); "
                          f"torch.compile runs it and nothing is kept across processes", RuntimeWarning, stacklevel=5)
            self._unsaveable = True
            return None
        if self._save(artifact):
            self._stats["saved"] += 1
        return _Guarded(artifact)

    def _save(self, artifact: Any) -> bool:
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            artifact.save_compiled_function(str(self._folder / f"{self._key}-{uuid.uuid4().hex[:12]}.bin"))
            return True
        except Exception as error:  # noqa: BLE001 - the code still runs in this process
            warnings.warn(f"fxhook: could not save a compiled region for later processes "
                          f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=6)
            return False


def _cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()
