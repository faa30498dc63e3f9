"""Passes for TransformerLens's flag-gated hooks (use_hook_mlp_in, use_attn_result, ...)."""
from __future__ import annotations

from torch import fx

from fxhook.config import HookedTransformerConfig
from fxhook.passes.graph_utils import hook_markers


def drop_markers(gm: fx.GraphModule, suffix: str) -> fx.GraphModule:
    """Remove the markers whose name ends with `suffix` (their hook does not exist)."""
    for marker in hook_markers(gm.graph):
        if marker.args[1].endswith(suffix):
            marker.replace_all_uses_with(marker.args[0])
            gm.graph.erase_node(marker)
    return gm


def apply_flag_passes(gm: fx.GraphModule, spec, cfg: HookedTransformerConfig) -> fx.GraphModule:
    if not spec.use_hook_mlp_in:
        gm = drop_markers(gm, ".hook_mlp_in")
    for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention"):
        if getattr(spec, flag):
            raise NotImplementedError(f"{flag} is not implemented yet")
    return gm
