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
from fxhook.passes.graph_utils import copy_graph_module, plain_codegen
from fxhook.passes.insert_hook_points import insert_hook_points, prune_hook_points
from fxhook.passes.lower_attention import lower_attention
from fxhook.passes.slice_layers import slice_layers
from fxhook.runtime.hook_point import HookPoint


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

    @classmethod
    def from_cfg(cls, cfg: HookedTransformerConfig, start: int | None = None, stop: int | None = None,
                 live_hooks: frozenset[str] | None = None) -> "GraphSpec":
        return cls(cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_attn_in, cfg.use_hook_mlp_in,
                   cfg.ungroup_grouped_query_attention, start, stop, live_hooks)


def capture_graph(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig,
                  n_kv_heads: int | None = None) -> fx.GraphModule:
    """HF model -> GraphModule(input_ids [b, p], attention_mask [b, p]) -> logits, with markers."""
    return plain_codegen(capture(hf_model, adapter, cfg.n_heads, n_kv_heads or cfg.n_kv_heads))


def build_variant(captured: fx.GraphModule, spec: GraphSpec, cfg: HookedTransformerConfig, adapter: Adapter,
                  make_point: Callable[[str], HookPoint] = HookPoint) -> fx.GraphModule:
    """The runnable hooked graph for `spec`: HookPoint modules at every contract site
    (spec.live_hooks is applied by `pruned_variant` on the result)."""
    from fxhook.passes.flag_hooks import apply_flag_passes

    gm = copy_graph_module(captured)
    gm = lower_attention(gm)
    gm = apply_flag_passes(gm, spec, cfg, adapter)
    gm = insert_hook_points(gm, make_point)
    if spec.start_at_layer is not None or spec.stop_at_layer is not None:
        gm = slice_layers(gm, cfg.n_layers, spec.start_at_layer, spec.stop_at_layer)
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
