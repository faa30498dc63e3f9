"""TransformerLens's `utils`, under the same names: `from fxhook import utils` works where a notebook had
`from transformer_lens import utils`. Grouped by concern in small modules; everything is importable from here."""
from fxhook.analysis.slicing import Slice, SliceInput
from fxhook.core.hook_names import get_act_name
from fxhook.utils.activations import apply_softcap, gelu_fast, gelu_new, softcap_enabled, solu
from fxhook.utils.devices import (ActivationFunction, ModelWithCfg, NonlinearityType, TypedModuleList,
                                  calculate_available_device_cuda_memory, count_unique_devices,
                                  determine_available_memory_for_available_devices, find_embedding_device,
                                  get_best_available_cuda_device, get_best_available_device,
                                  get_device_for_block_index, get_rotary_pct_from_config, move_to_and_update_config,
                                  resolve_device_map, sort_devices_based_on_available_memory)
from fxhook.utils.environment import (LocallyOverridenDefaults, calc_fan_in_and_fan_out, clear_huggingface_cache,
                                      download_file_from_hf, get_device, init_kaiming_normal_, init_kaiming_uniform_,
                                      init_xavier_normal_, init_xavier_uniform_, is_library_available,
                                      override_or_use_default_value, print_gpu_mem, select_compatible_kwargs,
                                      warn_if_mps)
from fxhook.utils.lm import logits_to_df, lm_accuracy, lm_cross_entropy_loss, sample_logits
from fxhook.utils.matrix import composition_scores, get_matrix_corner
from fxhook.utils.prompts import test_prompt
from fxhook.utils.tensors import (check_structure, filter_dict_by_prefix, get_corner, get_cumsum_along_dim,
                                  get_nested_attr, get_offset_position_ids, is_lower_triangular, is_square,
                                  remove_batch_dim, repeat_along_head_dimension, set_nested_attr,
                                  temporarily_swap_parameter, to_numpy, transpose)
from fxhook.utils.tokenize import (get_attention_mask, get_dataset, get_input_with_manually_prepended_bos,
                                   get_tokenizer_with_bos, get_tokens_with_bos_removed, keep_single_column,
                                   tokenize_and_concatenate)

__all__ = [
    "ActivationFunction", "ModelWithCfg", "NonlinearityType", "TypedModuleList",
    "calculate_available_device_cuda_memory", "count_unique_devices", "determine_available_memory_for_available_devices",
    "find_embedding_device", "get_best_available_cuda_device", "get_best_available_device", "get_device_for_block_index",
    "get_rotary_pct_from_config", "move_to_and_update_config", "resolve_device_map",
    "sort_devices_based_on_available_memory",
    "Slice", "SliceInput", "get_act_name", "test_prompt",
    "apply_softcap", "gelu_fast", "gelu_new", "softcap_enabled", "solu",
    "LocallyOverridenDefaults", "calc_fan_in_and_fan_out", "clear_huggingface_cache", "download_file_from_hf",
    "get_device", "init_kaiming_normal_", "init_kaiming_uniform_", "init_xavier_normal_", "init_xavier_uniform_",
    "is_library_available", "override_or_use_default_value", "print_gpu_mem", "select_compatible_kwargs",
    "warn_if_mps",
    "logits_to_df", "lm_accuracy", "lm_cross_entropy_loss", "sample_logits",
    "composition_scores", "get_matrix_corner",
    "check_structure", "filter_dict_by_prefix", "get_corner", "get_cumsum_along_dim", "get_nested_attr",
    "get_offset_position_ids", "is_lower_triangular", "is_square", "remove_batch_dim",
    "repeat_along_head_dimension", "set_nested_attr", "temporarily_swap_parameter", "to_numpy", "transpose",
    "get_attention_mask", "get_dataset", "get_input_with_manually_prepended_bos", "get_tokenizer_with_bos",
    "get_tokens_with_bos_removed", "keep_single_column", "tokenize_and_concatenate",
]
