"""TransformerLens's `patching` module under its own path (`from fxhook import patching`): activation patching
sweeps that reuse the corrupted run's prefix, attribution patching and path patching (fxhook/analysis/)."""
from fxhook.analysis.patching import (
    layer_patch_setter, layer_pos_patch_setter,
    layer_pos_head_vector_patch_setter, layer_head_vector_patch_setter, layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter, layer_head_dest_src_pos_pattern_patch_setter,
    generic_activation_patch, get_act_patch_resid_pre, get_act_patch_resid_mid, get_act_patch_attn_out,
    get_act_patch_mlp_out, get_act_patch_resid_pre_all_pos, get_act_patch_attn_out_all_pos,
    get_act_patch_mlp_out_all_pos, get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos, get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos, get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_pattern_all_pos, get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every, get_act_patch_block_every, make_df_from_ranges, attribution_patch,
    get_path_patch_head_to_receivers, path_patch,
)

__all__ = [
    "layer_patch_setter", "layer_pos_patch_setter",
    "layer_pos_head_vector_patch_setter", "layer_head_vector_patch_setter", "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter", "layer_head_dest_src_pos_pattern_patch_setter",
    "generic_activation_patch", "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out",
    "get_act_patch_mlp_out", "get_act_patch_resid_pre_all_pos", "get_act_patch_attn_out_all_pos",
    "get_act_patch_mlp_out_all_pos", "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every", "make_df_from_ranges",
    "attribution_patch", "get_path_patch_head_to_receivers", "path_patch",
]
