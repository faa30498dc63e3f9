"""Apply the passes for TransformerLens's flag-gated hooks to one graph variant."""
from __future__ import annotations

from torch import fx

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.core.hook_names import key_of
from fxhook.core.graph import hook_markers
from fxhook.passes.per_head import split_attn_result, split_qkv_input


def drop_markers(gm: fx.GraphModule, key: str) -> fx.GraphModule:
    """Remove the markers of hook kind `key` ("hook_mlp_in" in every block): their hook does not exist."""
    for marker in hook_markers(gm.graph):
        if key_of(marker.args[1]) == key:
            marker.replace_all_uses_with(marker.args[0])
            gm.graph.erase_node(marker)
    return gm


def apply_flag_passes(gm: fx.GraphModule, spec, cfg: HookedTransformerConfig, adapter: Adapter) -> fx.GraphModule:
    if not spec.use_hook_mlp_in:
        gm = drop_markers(gm, "hook_mlp_in")
    if spec.use_split_qkv_input or spec.use_attn_in:
        gm = split_qkv_input(gm, adapter, cfg, split=spec.use_split_qkv_input, attn_in=spec.use_attn_in,
                             ungrouped=spec.ungroup_grouped_query_attention)
    if spec.use_attn_result:
        gm = split_attn_result(gm, adapter, cfg)
    return gm
