"""The pipeline: capture once, then build graph variants with the passes.

The captured graph keeps the opaque attention op and the hook markers. Each
variant (which flag-gated hooks exist, which layers run) is built from it by
pure passes; HookPoints are shared between variants through `make_point`, so
a hook attached by name is live in whichever variant runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx, nn

from fxhook.adapter import Adapter
from fxhook.capture.export import capture
from fxhook.config import HookedTransformerConfig
from fxhook.core.graph import copy_graph_module, plain_codegen
from fxhook.passes.insert_hook_points import insert_hook_points, prune_hook_points
from fxhook.passes.expose_activations import expose_activations
from fxhook.passes.lower_attention import attention_modes, lower_attention
from fxhook.passes.slice_layers import slice_layers
from fxhook.core.hook_point import HookPoint


@dataclass(frozen=True)
class GraphSpec:
    """What one graph variant computes."""

    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    ungroup_grouped_query_attention: bool = False
    start_at_layer: int | None = None
    stop_at_layer: int | None = None
    live_hooks: frozenset[str] | None = None  # keep only these hook points (None: keep all)
    outputs: frozenset[str] = frozenset()  # activations returned as extra outputs (needs live_hooks)

    @classmethod
    def from_cfg(cls, cfg: HookedTransformerConfig, start: int | None = None, stop: int | None = None,
                 live_hooks: frozenset[str] | None = None, outputs: frozenset[str] = frozenset()
                 ) -> "GraphSpec":
        return cls(cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_attn_in, cfg.use_hook_mlp_in,
                   cfg.ungroup_grouped_query_attention, start, stop, live_hooks, outputs)

    @property
    def wanted_hooks(self) -> frozenset[str] | None:
        """Every hook point this graph must expose (None: all of them)."""
        return None if self.live_hooks is None else self.live_hooks | self.outputs


def capture_graph(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                  n_kv_heads: int | None = None) -> fx.GraphModule:
    """HF model -> GraphModule(input_ids [b, p], attention_mask [b, p]) -> logits, with markers."""
    return plain_codegen(capture(hf_model, adapter, cfg.n_heads, n_kv_heads or cfg.n_kv_heads))


def build_variant(captured: fx.GraphModule, spec: GraphSpec, cfg: HookedTransformerConfig, adapter: Adapter,
                  make_point: Callable[[str], HookPoint] = HookPoint) -> fx.GraphModule:
    """The runnable hooked graph for `spec`.

    With spec.live_hooks None: a HookPoint at every contract site, attention materialised everywhere.
    Otherwise only the points in live_hooks stay; attention is fused (SDPA) in every layer whose scores
    or pattern nobody reads; spec.outputs are returned as extra outputs (`expose_activations`).
    """
    from fxhook.passes.flag_hooks import apply_flag_passes

    if spec.outputs and spec.live_hooks is None:
        raise ValueError("GraphSpec.outputs needs live_hooks (the points that keep their hooks)")
    gm = copy_graph_module(captured)
    gm = lower_attention(gm, attention_modes(spec.wanted_hooks))
    gm = apply_flag_passes(gm, spec, cfg, adapter)
    gm = insert_hook_points(gm, make_point)
    if spec.start_at_layer is not None or spec.stop_at_layer is not None:
        gm = slice_layers(gm, cfg.n_layers, spec.start_at_layer, spec.stop_at_layer)
    if spec.live_hooks is not None:
        gm = prune_hook_points(gm, spec.wanted_hooks)
    if spec.outputs:
        gm = expose_activations(gm, spec.outputs, spec.live_hooks)
    return gm


def pruned_variant(full: fx.GraphModule, live_hooks: frozenset[str]) -> fx.GraphModule:
    """A copy of a full hooked graph keeping only the hook points in `live_hooks` (cheap: one pass)."""
    return prune_hook_points(copy_graph_module(full), live_hooks)


def capture_decode_graph(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                         n_kv_heads: int | None = None) -> fx.GraphModule:
    """HF model -> the decode-step GraphModule (see fxhook/capture/kv.py), with markers:
    (input_ids [b, q], attention_mask [b, past+q], *past_keys, *past_values) -> (logits, *keys, *values)."""
    from fxhook.capture.kv import capture_decode

    return capture_decode(hf_model, adapter, cfg.n_layers, cfg.n_heads, n_kv_heads or cfg.n_kv_heads, cfg.d_head)
