"""GraphStore: every graph of one model, its compiled code, its hook points and their eviction.

The pipeline builds graphs (fxhook/pipeline); this store decides which to keep. Captures and the
graphs of each flag combination are kept until the weights are replaced; graphs for one hook set
(`GraphSpec.live_hooks` set) are kept for the `max_variants` most recently used sets and dropped
beyond that, with their compiled code. HookPoints are shared by name across every graph, so a hook
attached by name is live in whichever graph runs.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import linecache
from typing import Iterable, Iterator

import torch
from torch import fx, nn
from torch.fx import graph_module as _fx_graph_module  # its source cache: the one handle fx gives on it

from fxhook import pipeline
from fxhook.adapter import Adapter, get_module
from fxhook.config import HookedTransformerConfig
from fxhook.core.graph import hook_point_nodes
from fxhook.core.hook_point import HookPoint, call_hooked_points
from fxhook.passes.neutral_ops import neutral_guard
from fxhook.passes.placement import Placement, place_tensors_, single, untie_split_embeddings_
from fxhook.pipeline import DecodeKind, GraphSpec
from fxhook.runtime.regional import RegionCache, RegionalProgram

DEFAULT_MAX_VARIANTS = 16
# set by `GraphStore.eager()` for the calls of one thread or task: run eagerly on a compiled model
_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("fxhook_eager", default=False)


def _source_key(gm: fx.GraphModule) -> str:
    """The fx source-cache key of `gm`'s generated forward."""
    return type(gm).forward.__code__.co_filename


def _fx_sources() -> dict[str, str]:
    return _fx_graph_module._loader.eval_cache


@contextlib.contextmanager
def _sources_made() -> Iterator[list[str]]:
    """The keys of the fx source-cache entries made in the block (every recompile makes one)."""
    before = set(_fx_sources())
    made: list[str] = []
    try:
        yield made
    finally:
        made.extend(k for k in list(_fx_sources()) if k not in before)


def _release_sources(keys: Iterable[str]) -> None:
    """Forget generated sources: fx keeps every graph's source (and linecache an entry) for ever
    otherwise, which grows without bound as hook sets come and go."""
    sources = _fx_sources()
    for key in keys:
        sources.pop(key, None)
        linecache.cache.pop(key, None)


def _resumed(key: tuple) -> bool:
    """A graph key of a forward resumed from hook points (GraphSpec.resume_from)."""
    return len(key) > 1 and isinstance(key[1], GraphSpec) and bool(key[1].resume_from)


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool | None = True
    regional: bool = True  # forward graphs: each distinct region compiled once (runtime/regional.py)


@dataclass(eq=False)
class GraphEntry:
    """A built graph and what is made from it on demand: its hook points by name, compiled code."""

    gm: fx.GraphModule
    _hook_dict: dict[str, HookPoint] | None = None
    compiled: dict[CompileOptions, Callable] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    precompiled: Any = None  # runtime/precompiled.PrecompiledStep for hook-free static decode graphs
    regions: RegionCache | None = None  # the model's compiled regions, for graphs compiled region by region

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        if self._hook_dict is None:
            self._hook_dict = {name: self.gm.get_submodule(name) for name in hook_point_nodes(self.gm)}
        return self._hook_dict

    def compiled_with(self, options: CompileOptions) -> Callable:
        """torch.compile of this graph under `options`, made once: region by region, sharing the model's
        compiled regions, when the graph has them and options.regional; else of the whole graph."""
        with self._lock:
            if options not in self.compiled and options.regional and self.regions is not None:
                self.compiled[options] = RegionalProgram(self.gm, self.regions, options)
            elif options not in self.compiled:
                self.compiled[options] = torch.compile(self.gm, backend=options.backend, mode=options.mode,
                                                       dynamic=options.dynamic)
            return self.compiled[options]


class GraphStore:
    """The graphs of one HF model under one adapter and config."""

    def __init__(self, hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                 max_variants: int = DEFAULT_MAX_VARIANTS):
        self.hf_model = hf_model
        self.adapter = adapter
        self.cfg = cfg
        self.max_variants = max_variants
        self.points: dict[str, HookPoint] = {}
        self._captured: dict[bool, fx.GraphModule] = {}  # ungrouped? -> captured forward graph
        self._decode_captured: dict[bool, fx.GraphModule] = {}
        self._decode_steps: dict[tuple[bool, DecodeKind], fx.GraphModule] = {}
        self._kept: dict[tuple, GraphEntry] = {}  # graphs of whole flag combinations
        self._recent: collections.OrderedDict[tuple, GraphEntry] = collections.OrderedDict()  # per hook set
        self.built = 0  # graphs built since creation (tests and benchmarks read it)
        self.stale_rebuilds = 0  # graphs dropped because a parameter they assumed neutral changed
        self._lock = threading.RLock()  # graphs are built and evicted by one thread at a time
        self.compile_options: CompileOptions | None = None  # None: graphs run eagerly
        self.placement: Placement | None = None  # blocks split across devices (set_placement); None: one device
        self.regions: RegionCache | None = None  # compiled regions shared by the forward graphs (runtime/regional.py)
        self._gather_depth = 0

    # ------------------------------------------------------------------ hook points
    def make_point(self, name: str) -> HookPoint:
        """The model's one HookPoint of this name (made on first use, shared by every graph)."""
        with self._lock:
            if name not in self.points:
                self.points[name] = HookPoint(name)
            return self.points[name]

    def live_hooks(self) -> frozenset[str]:
        """Names of the hook points that have a hook now: the graph that runs keeps only these."""
        live = {name for name, p in tuple(self.points.items()) if p.has_model_wide_hooks()}  # a snapshot
        live.update(p.name for p in call_hooked_points() if self.points.get(p.name) is p)
        return frozenset(live)

    # ------------------------------------------------------------------ captures
    def _ungrouped(self, spec: GraphSpec) -> bool:
        return spec.ungroup_grouped_query_attention and self.cfg.n_kv_heads != self.cfg.n_heads

    def captured(self, ungrouped: bool = False) -> fx.GraphModule:
        """The captured forward graph (markers, opaque attention), captured once."""
        with self._lock:
            if ungrouped not in self._captured:
                with self._gathered():
                    self._captured[ungrouped] = pipeline.capture_forward(self.hf_model, self.adapter, self.cfg,
                                                                         ungrouped)
            return self._captured[ungrouped]

    def decode_step(self, ungrouped: bool, kind: DecodeKind) -> fx.GraphModule:
        """The decode step with its cache lowered and verified, before hook points."""
        with self._lock:
            key = (ungrouped, kind)
            if key not in self._decode_steps:
                with self._gathered():
                    self._build_decode_step(key, ungrouped, kind)
            return self._decode_steps[key]

    def _build_decode_step(self, key: tuple, ungrouped: bool, kind: DecodeKind) -> None:
        if ungrouped not in self._decode_captured:
            self._decode_captured[ungrouped] = pipeline.capture_decode(self.hf_model, self.adapter, self.cfg,
                                                                       ungrouped)
        embed = self.embed_tokens if kind.embeds else None
        self._decode_steps[key] = pipeline.build_decode_step(
            self._decode_captured[ungrouped], kind, self.captured(ungrouped), self.cfg, ungrouped, embed)

    # ------------------------------------------------------------------ devices
    def _placed_modules(self) -> list[nn.Module]:
        """The HF model and every capture (each holds buffers of its own under `hf.`)."""
        return [self.hf_model, *self._captured.values(), *self._decode_captured.values()]

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """On a split model, the HF model and captures sit on the CPU inside the block: torch.export runs the
        HF code, which cannot cross devices, and the decode self-check runs unsplit graphs. Afterwards every
        tensor goes back to its block's device (the Parameter objects stay the same)."""
        if self.placement is None or self._gather_depth:
            yield
            return
        self._gather_depth += 1
        try:
            for module in self._placed_modules():
                place_tensors_(module, single("cpu", self.cfg.n_layers), self.adapter)
            yield
        finally:
            self._gather_depth -= 1
            for module in self._placed_modules():
                place_tensors_(module, self.placement, self.adapter)

    def set_placement(self, placement: Placement | None) -> bool:
        """Split the model's blocks across devices as `placement` says (None: leave the tensors where they are
        and stop splitting graphs). Returns whether the forward graph must be captured again (a tied
        embedding was untied because its two ends sit on different devices)."""
        with self._lock:
            untied = placement is not None and untie_split_embeddings_(self.hf_model, placement, self.adapter)
            self.placement = placement
            if placement is not None:
                for module in self._placed_modules():
                    place_tensors_(module, placement, self.adapter)
            self.clear(keep_capture=not untied)
            return untied

    def input_device(self) -> torch.device:
        """Where tokens, masks and embeddings go in: the embedding's device."""
        if self.placement is not None:
            return self.placement.first
        return next(self.hf_model.parameters()).device

    def layer_devices(self) -> list[torch.device] | None:
        """Each block's device on a split model (its KV cache lives there); None on one device."""
        return None if self.placement is None else list(self.placement.blocks)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [b, p, d_model] as hook_embed sees them (before positional embeddings)."""
        return get_module(self.hf_model, self.adapter.embed)(tokens)

    # ------------------------------------------------------------------ graphs
    def _entry(self, key: tuple, pruned: bool, build: Callable[[], fx.GraphModule]) -> GraphEntry:
        with self._lock:
            self._drop_if_stale(key)
            if key in self._kept:
                return self._kept[key]
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
            with _sources_made() as made:
                entry = GraphEntry(build(), regions=self._regions_for(key))
            self.built += 1
            if not pruned:
                self._kept[key] = entry
            else:
                self._recent[key] = entry
                self._evict()
            _release_sources(set(made) - self._live_sources())  # the passes' intermediate sources
            return entry

    def _drop_if_stale(self, key: tuple) -> None:
        """Forget the graph of `key` when a parameter its passes assumed neutral changed since it was built
        (`model.blocks[0].ln1.w.data += 1` after fold_ln: passes/neutral_ops.py). Checked at every lookup,
        so it is built again, with that parameter's op kept, before it runs."""
        entry = self._kept.get(key) or self._recent.get(key)
        guard = None if entry is None else neutral_guard(entry.gm)
        if guard is not None and not guard.holds():
            self._kept.pop(key, None)
            self._recent.pop(key, None)
            self.stale_rebuilds += 1
            _release_sources([_source_key(entry.gm)])

    def _regions_for(self, key: tuple) -> RegionCache | None:
        """Forward graphs on one device compile region by region; decode graphs (their caches are mutated in
        place) and graphs split across devices compile whole."""
        if key[0] != "forward" or self.placement is not None:
            return None
        if self.regions is None:
            self.regions = RegionCache(self.adapter, self.cfg.n_layers)
        return self.regions

    def resize(self, max_variants: int) -> None:
        """Keep the graphs of at most `max_variants` hook sets (the least recently used go first)."""
        with self._lock:
            self.max_variants = max_variants
            self._evict()

    def _evict(self) -> None:
        # graphs resumed from a hook point (one per patched hook of a sweep, and per packed span of layers of a
        # by-position sweep: analysis/patch_runs.py) have their own allowance, one sweep over every layer, so a
        # patching sweep neither evicts the hook sets' graphs nor its own
        for resumed, limit in ((False, self.max_variants), (True, max(self.max_variants, 2 * self.cfg.n_layers + 2))):
            keys = [key for key in self._recent if _resumed(key) == resumed]
            for key in keys[:max(0, len(keys) - limit)]:
                _release_sources([_source_key(self._recent.pop(key).gm)])

    def _live_sources(self) -> set[str]:
        graphs = [*self._captured.values(), *self._decode_captured.values(), *self._decode_steps.values(),
                  *(e.gm for e in self._kept.values()), *(e.gm for e in self._recent.values())]
        return {_source_key(gm) for gm in graphs}

    def forward(self, spec: GraphSpec) -> GraphEntry:
        """The hooked forward graph for `spec`."""
        return self._entry(("forward", spec), spec.pruned, lambda: pipeline.build_forward(
            self.captured(self._ungrouped(spec)), spec, self.cfg, self.adapter, self.make_point, self.placement))

    def decode(self, spec: GraphSpec, kind: DecodeKind = DecodeKind()) -> GraphEntry:
        """The hooked decode-step graph for `spec` (no layer slicing)."""
        def build() -> fx.GraphModule:
            step = self.decode_step(self._ungrouped(spec), kind)
            return pipeline.build_decode(step, spec, kind, self.cfg, self.adapter, self.make_point, self.placement)
        return self._entry(("decode", spec, kind), spec.pruned, build)

    def run(self, entry: GraphEntry, *args: torch.Tensor) -> Any:
        """The graph on `args`, through torch.compile when the model is compiled."""
        if self.compile_options is None or _EAGER.get():
            return entry.gm(*args)
        return entry.compiled_with(self.compile_options)(*args)

    @contextlib.contextmanager
    def eager(self):
        """Within the block, this thread's or task's calls run eagerly even on a compiled model (sweeps that
        hook a new point per call would compile each time); other threads are not affected."""
        token = _EAGER.set(True)
        try:
            yield
        finally:
            _EAGER.reset(token)

    def clear(self, keep_capture: bool = False) -> None:
        """Forget every graph (the weights were replaced or moved): the next request captures again,
        or with `keep_capture` builds again from the (moved) forward capture. Hook points, and the hooks
        on them, stay."""
        with self._lock:
            before = self._live_sources()
            kept = {False: self._captured[False]} if keep_capture and False in self._captured else {}
            self._captured.clear()
            self._captured.update(kept)
            self._decode_captured.clear()
            self._decode_steps.clear()
            self._kept.clear()
            self._recent.clear()
            _release_sources(before - self._live_sources())

    def __len__(self) -> int:
        return len(self._kept) + len(self._recent)
