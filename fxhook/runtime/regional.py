"""Regional compilation: each distinct region of a forward graph compiled once, for every layer and hook set.

torch.compile of the whole flat graph traces, lowers and schedules every layer anew (a 24-layer model
compiled slower than HF's own torch.compile of it). Here the graph is split into regions
(passes/regions.py: the embedding side, each block, the final side, a live hook point on its own),
with every tensor lifted to an input, so the blocks of a model are one graph called with different
weights. `RegionCache` holds one torch.compile'd callable per region signature, shared by every graph
of the model: a layer compiles once for all layers, and a new hook set compiles only the regions it
changed (the block split at a newly hooked point), reusing the rest.

Across processes: the compiled code of each region goes through PyTorch's own caches (inductor's FX
graph cache and the AOTAutograd cache, in TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER), whose keys cover the torch version, the region's graph (which includes the
hook points it is cut at and the activations it returns), the input dtypes, shapes and devices, and the
compile configuration. A second process traces the few distinct regions and loads their code: it does
not run inductor again. Point TORCHINDUCTOR_CACHE_DIR at a lasting folder to keep it across reboots.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from fxhook import pipeline
from fxhook.adapter import Adapter
from fxhook.passes.regions import LIFTED, region_signature, regions_of
from fxhook.runtime.persisted_regions import PersistedRegion, persistable, static_view


@dataclass
class RegionCache:
    """The compiled code of each distinct region (signature and compile settings) of one model.

    stats["compiled"]: distinct regions given compiled code (one per signature and settings);
    stats["reused"]: regions served from code compiled for another layer or graph;
    stats["loaded"] / ["saved"] / ["stale"]: artifacts loaded from / saved for other processes, or
    dropped because the code they traced changed (runtime/persisted_regions.py)."""

    adapter: Adapter
    n_layers: int
    _compiled: dict[tuple[str, Any], Callable] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stats: collections.Counter = field(default_factory=collections.Counter)

    def compiled(self, signature: str, region: fx.GraphModule, options: Any) -> Callable:
        """torch.compile of `region` under `options` (runtime/graphs.CompileOptions: backend, mode, dynamic),
        made once per signature and options; regions of the same signature reuse it."""
        key = (signature, options)
        with self._lock:
            if key in self._compiled:
                self.stats["reused"] += 1
            else:
                if persistable(options):  # saved for later processes (runtime/persisted_regions.py)
                    self._compiled[key] = PersistedRegion(region, signature, options, self.stats)
                else:
                    self._compiled[key] = torch.compile(region, backend=options.backend, mode=options.mode,
                                                        dynamic=options.dynamic)
                self.stats["compiled"] += 1
            return self._compiled[key]


def _holders(root: nn.Module, paths: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """For each tensor path of `root` (a parameter, buffer or tensor attribute), its module and name there."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in root.named_modules(remove_duplicate=False):
        tensors = [*module._parameters, *module._buffers,
                   *(k for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
        for name in tensors:
            found.setdefault(f"{prefix}.{name}" if prefix else name, (module, name))
    missing = [path for path in paths if path not in found]
    if missing:
        raise AssertionError(f"the graph reads tensors its module does not hold: {missing[:3]}")
    return [found[path] for path in paths]


class RegionalProgram:
    """A forward graph run region by region: each region through its model-wide compiled code, each hook
    point region as plain Python (its hooks run there, as under torch.compile of the whole graph).

    The tensors each region reads are looked up by attribute at every call, so an in-place edit or a
    `p.data = ...` replacement is seen, as it is by the graph itself."""

    def __init__(self, gm: fx.GraphModule, cache: RegionCache, options: Any):
        split = pipeline.build_regions(gm, cache.adapter, cache.n_layers)
        for name, region in regions_of(split):
            setattr(split, name, cache.compiled(region_signature(region), region, options))
        self.split = split
        self._holders = _holders(gm, split.meta[LIFTED])
        self._persisted = persistable(options)  # its regions mark their static tensors themselves

    def __call__(self, *args: torch.Tensor) -> Any:
        tensors = [getattr(module, name) for module, name in self._holders]
        if not self._persisted:  # buffers, constants: fixed sizes, as parameters are to dynamo
            tensors = [static_view(t) for t in tensors]  # (a dynamic rotary table took the length's size)
        return self.split(*args, *tensors)
