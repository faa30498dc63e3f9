"""The pass lists of every graph kind, in one place.

- forward: captured graph -> `forward_passes(spec)` -> full graph (spec.live_hooks None) or a variant
  for one hook set (pruned to the hooked points, fused attention where no pattern is read, cached
  activations as extra outputs, sliced to the layers that run);
- decode step: captured decode graph -> simplify (once) -> `cache_passes(kind)` (growing or static
  KV cache, optionally fed with embeddings) -> the decode self-check against the forward graph;
- decode: decode step -> `decode_passes(spec, kind)` -> the hooked graph generation runs.

Every list runs through `run_passes`, which checks each pass's contract (contracts.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from fxhook.adapter import Adapter
from fxhook.capture.export import capture
from fxhook.capture.kv import capture_decode as capture_decode_step
from fxhook.capture.ungroup import ungrouped_twin
from fxhook.config import HookedTransformerConfig
from fxhook.core.graph import copy_graph_module, hook_point_nodes, plain_codegen
from fxhook.core.hook_point import HookPoint
from fxhook.passes.expose_activations import expose_activations
from fxhook.passes.flag_hooks import drop_markers
from fxhook.passes.insert_hook_points import insert_hook_points, prune_hook_points
from fxhook.passes.kv_cache import embeds_input, logits_only, lower_growing_cache, lower_static_cache, ungrouped_sdpa
from fxhook.passes.last_position import last_position_logits
from fxhook.passes.lower_attention import attention_modes, lower_attention
from fxhook.passes.neutral_ops import folded_norm_params, no_neutral_op_left, remove_neutral_ops
from fxhook.passes.per_head import split_attn_result, split_qkv_input
from fxhook.passes.placement import Placement, place_on_devices
from fxhook.passes.regions import split_regions
from fxhook.passes.resume_from import downstream_nodes, resume_from
from fxhook.passes.simplify import flat_attributes, simplify
from fxhook.passes.slice_layers import slice_layers
from fxhook.pipeline.contracts import ATTENTION, HOOK_POINT, KV_OP, MARKER, Pass, run_passes
from fxhook.pipeline.specs import DecodeKind, GraphSpec
from fxhook.pipeline.verify import verify_decode

MakePoint = Callable[[str], HookPoint]
_BEFORE_HOOK_POINTS = frozenset({MARKER, ATTENTION, KV_OP})  # the captured forms
_MARKED = frozenset({MARKER, KV_OP})  # attention lowered, markers not yet hook points
_HOOKED = frozenset({HOOK_POINT, KV_OP})  # hook points inserted


def _kv_heads(cfg: HookedTransformerConfig, ungrouped: bool) -> int:
    return cfg.n_heads if ungrouped else cfg.n_kv_heads


def _source_model(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig, ungrouped: bool
                  ) -> nn.Module:
    """The HF model to capture: itself, or its twin with k/v repeated per query head."""
    if not ungrouped:
        return hf_model
    return ungrouped_twin(hf_model, adapter, cfg.n_heads, cfg.n_kv_heads)


# ------------------------------------------------------------------ capture
def capture_forward(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                    ungrouped: bool = False) -> fx.GraphModule:
    """HF model -> GraphModule(input_ids [b, p], attention_mask [b, p]) -> logits, with markers and
    opaque attention (form: marker, attention)."""
    source = _source_model(hf_model, adapter, cfg, ungrouped)
    return plain_codegen(capture(source, adapter, cfg.n_heads, _kv_heads(cfg, ungrouped)))


def capture_decode(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                   ungrouped: bool = False) -> fx.GraphModule:
    """HF model -> the decode-step GraphModule, simplified (form: marker, attention, kv_op):
    (input_ids [b, q], position_ids [b, q], attention_mask [b, past+q], *past_keys, *past_values)
    -> (logits, *keys, *values)."""
    source = _source_model(hf_model, adapter, cfg, ungrouped)
    raw = capture_decode_step(source, adapter, cfg.n_layers, cfg.n_heads, _kv_heads(cfg, ungrouped), cfg.d_head)
    return run_passes(raw, [Pass("simplify", simplify)], "decode capture")


# ------------------------------------------------------------------ forward graphs
def _only_wanted_points(wanted: frozenset[str]) -> Callable[[fx.GraphModule], str | None]:
    def check(gm: fx.GraphModule) -> str | None:
        extra = set(hook_point_nodes(gm)) - wanted
        return f"hook points {sorted(extra)[:3]} were not asked for" if extra else None
    return check


def _only_downstream_points(starts: frozenset[str]) -> Callable[[fx.GraphModule], str | None]:
    def check(gm: fx.GraphModule) -> str | None:
        nodes = hook_point_nodes(gm)
        kept = downstream_nodes([nodes[name] for name in starts if name in nodes])
        upstream = [name for name, node in nodes.items() if node not in kept]
        return f"hook points {upstream[:3]} do not depend on {sorted(starts)}" if upstream else None
    return check


def _placement_pass(placement: Placement, cfg: HookedTransformerConfig, adapter: Adapter) -> Pass:
    """Split the graph across devices (passes/placement.py); runs last, on any form."""
    return Pass("place_on_devices", lambda gm: place_on_devices(gm, placement, adapter, cfg.n_layers))


def forward_passes(spec: GraphSpec, cfg: HookedTransformerConfig, adapter: Adapter, make_point: MakePoint,
                   slicing: bool = True, placement: Placement | None = None) -> list[Pass]:
    """The passes from a captured graph to the graph `spec` describes (split across devices last, when the
    model has a `placement`)."""
    if spec.outputs and spec.live_hooks is None:
        raise ValueError("GraphSpec.outputs needs live_hooks (the points that keep their hooks)")
    passes = [Pass("lower_attention", lambda gm: lower_attention(gm, attention_modes(spec.wanted_hooks)),
                   accepts=_BEFORE_HOOK_POINTS, removes=frozenset({ATTENTION}))]
    if not spec.use_hook_mlp_in:
        passes.append(Pass("drop hook_mlp_in markers", lambda gm: drop_markers(gm, "hook_mlp_in"), accepts=_MARKED))
    if not spec.use_hook_tokens:
        passes.append(Pass("drop hook_tokens markers", lambda gm: drop_markers(gm, "hook_tokens"), accepts=_MARKED))
    if spec.use_split_qkv_input or spec.use_attn_in:
        passes.append(Pass("split_qkv_input", lambda gm: split_qkv_input(
            gm, adapter, cfg, split=spec.use_split_qkv_input, attn_in=spec.use_attn_in,
            ungrouped=spec.ungroup_grouped_query_attention), accepts=_MARKED))
    if spec.use_attn_result:
        passes.append(Pass("split_attn_result", lambda gm: split_attn_result(gm, adapter, cfg), accepts=_MARKED))
    passes.append(Pass("insert_hook_points", lambda gm: insert_hook_points(gm, make_point), accepts=_MARKED,
                       removes=frozenset({MARKER})))
    if spec.resume_from:
        if spec.start_at_layer is not None or spec.stop_at_layer is not None:
            raise ValueError("GraphSpec.resume_from cannot be combined with start_at_layer / stop_at_layer")
        passes.append(Pass("resume_from", lambda gm: resume_from(gm, spec.resume_from), accepts=_HOOKED,
                           ensures=_only_downstream_points(spec.resume_from)))
    if slicing and (spec.start_at_layer is not None or spec.stop_at_layer is not None):
        passes.append(Pass("slice_layers", lambda gm: slice_layers(gm, cfg.n_layers, spec.start_at_layer,
                                                                   spec.stop_at_layer), accepts=_HOOKED))
    if spec.live_hooks is not None:
        wanted = spec.wanted_hooks
        passes.append(Pass("prune_hook_points", lambda gm: prune_hook_points(gm, wanted), accepts=_HOOKED,
                           ensures=_only_wanted_points(wanted)))
    if spec.outputs:
        passes.append(Pass("expose_activations", lambda gm: expose_activations(gm, spec.outputs, spec.live_hooks),
                           accepts=_HOOKED, ensures=_only_wanted_points(spec.live_hooks)))
    if getattr(cfg, "layer_norm_folding", False):  # processed: fold_ln made the norms' weights ones, biases zeros
        neutral = folded_norm_params(adapter, cfg)
        passes.append(Pass("remove_neutral_ops", lambda gm: remove_neutral_ops(gm, neutral), accepts=_HOOKED,
                           ensures=no_neutral_op_left(neutral)))
    if placement is not None:
        passes.append(_placement_pass(placement, cfg, adapter))
    return passes


def build_forward(captured: fx.GraphModule, spec: GraphSpec, cfg: HookedTransformerConfig, adapter: Adapter,
                  make_point: MakePoint = HookPoint, placement: Placement | None = None) -> fx.GraphModule:
    """The runnable hooked forward graph for `spec` (the captured graph is copied, never changed).

    With spec.live_hooks None: a HookPoint at every contract site, attention materialised everywhere.
    Otherwise only the points in live_hooks stay; attention is fused (SDPA) in every layer whose scores
    or pattern nobody reads; spec.outputs are returned as extra outputs (`expose_activations`).
    """
    return run_passes(copy_graph_module(captured), forward_passes(spec, cfg, adapter, make_point, placement=placement),
                      "forward graph")


def build_regions(forward: fx.GraphModule, adapter: Adapter, n_layers: int) -> fx.GraphModule:
    """A built forward graph split into regions for regional compilation (passes/regions.py): one submodule
    per region, tensors lifted to inputs; the graph itself is not changed."""
    return run_passes(forward, [Pass("split_regions", lambda gm: split_regions(gm, adapter, n_layers),
                                     accepts=frozenset({HOOK_POINT}))], "regional forward graph")


# ------------------------------------------------------------------ decode graphs
def cache_passes(kind: DecodeKind) -> list[Pass]:
    """The passes that choose how a captured decode step keeps its KV cache."""
    passes = [Pass("embeds_input", embeds_input, accepts=_BEFORE_HOOK_POINTS)] if kind.embeds else []
    lower = lower_static_cache if kind.static else lower_growing_cache
    passes.append(Pass(lower.__name__, lower, accepts=_BEFORE_HOOK_POINTS, removes=frozenset({KV_OP})))
    return passes


def build_decode_step(captured_decode: fx.GraphModule, kind: DecodeKind, captured_forward: fx.GraphModule,
                      cfg: HookedTransformerConfig, ungrouped: bool = False,
                      embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> fx.GraphModule:
    """The decode step with its cache lowered, checked against the forward graph on a tiny input before
    it is used (`verify_decode`: a model whose HF code derives positions or masks elsewhere fails here)."""
    gm = run_passes(copy_graph_module(captured_decode), cache_passes(kind), "decode step")
    verify_decode(gm, captured_forward, cfg.n_layers, _kv_heads(cfg, ungrouped), cfg.d_head, cfg.d_vocab,
                  static=kind.static, embed=embed)
    return run_passes(gm, logits_passes(kind), "decode step")


def logits_passes(kind: DecodeKind) -> list[Pass]:
    """The passes that choose which positions' logits a verified decode step returns: every position, or
    (kind.last_position, a prompt's step) the last one only. They run after `verify_decode`, whose check
    reads every position; tests/test_last_position.py checks the sliced step against HF family by family."""
    if not kind.last_position:
        return []
    return [Pass("last_position_logits", last_position_logits, accepts=_BEFORE_HOOK_POINTS)]


def decode_passes(spec: GraphSpec, kind: DecodeKind, cfg: HookedTransformerConfig, adapter: Adapter,
                  make_point: MakePoint, placement: Placement | None = None) -> list[Pass]:
    """The passes from a decode step to the hooked decode graph: the forward passes (no layer slicing),
    then simplification, then the runner's form: compiled static graphs keep grouped-query attention
    without copying the cache per head; eager graphs read parameters as flat attributes.
    A graph resumed from hook points (spec.resume_from: a patched suffix of positions) returns its logits only."""
    passes = []
    if spec.resume_from:
        if kind.static:
            raise ValueError("a decode graph resumed from hook points keeps a growing cache, not a static one")
        passes.append(Pass("logits_only", logits_only, accepts=_BEFORE_HOOK_POINTS))
    passes += forward_passes(spec, cfg, adapter, make_point, slicing=False)
    passes.append(Pass("simplify", simplify))
    if placement is not None:  # after simplify: its sharing of masks across layers must not cross devices
        passes.append(_placement_pass(placement, cfg, adapter))
    if kind.static:
        passes.append(Pass("ungrouped_sdpa", ungrouped_sdpa, accepts=frozenset({HOOK_POINT})))
    else:
        passes.append(Pass("flat_attributes", flat_attributes, accepts=frozenset({HOOK_POINT})))
    return passes


def build_decode(decode_step: fx.GraphModule, spec: GraphSpec, kind: DecodeKind, cfg: HookedTransformerConfig,
                 adapter: Adapter, make_point: MakePoint = HookPoint, placement: Placement | None = None
                 ) -> fx.GraphModule:
    """The hooked decode-step graph for `spec` (no layer slicing), split across devices by `placement`."""
    return run_passes(copy_graph_module(decode_step), decode_passes(spec, kind, cfg, adapter, make_point, placement),
                      "decode graph")
