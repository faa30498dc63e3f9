"""TransformerLens's device helpers: which device a block runs on, the best free GPU, the devices a HF model
spans, and the typing aliases its utils export."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

ActivationFunction = Callable[..., torch.Tensor]
NonlinearityType = str  # a torch.nn.init.calculate_gain nonlinearity name
AvailableDeviceMemory = list[tuple[int, int]]  # (cuda index, free bytes)


class ModelWithCfg(Protocol):
    """Anything with a TransformerLens-style `cfg` (HookedTransformer, ...)."""

    cfg: Any


class TypedModuleList(nn.ModuleList):
    """nn.ModuleList, typed by what it holds (`TypedModuleList[Block]`)."""

    def __init__(self, modules: Iterable[nn.Module] | None = None) -> None:
        super().__init__(modules)

    def __class_getitem__(cls, item: Any) -> type:
        return cls


def get_device_for_block_index(index: int, cfg: Any, device: torch.device | str | None = None) -> torch.device:
    """The device block `index` runs on when cfg.n_devices split the blocks evenly (TransformerLens's
    assignment), counted from `device` (default cfg.device)."""
    base = torch.device(device if device is not None else cfg.device or "cpu")
    if base.type == "cpu":
        return base
    if not 0 <= index < cfg.n_layers:
        raise ValueError(f"block {index} does not exist: the model has blocks 0..{cfg.n_layers - 1}")
    # the formula of fxhook.passes.placement.placement_from_n_devices, which checks the devices exist
    return torch.device(base.type, (base.index or 0) + index * cfg.n_devices // cfg.n_layers)


def calculate_available_device_cuda_memory(i: int) -> int:
    """Free bytes on cuda:i (total minus what torch has allocated there)."""
    return torch.cuda.get_device_properties(i).total_memory - torch.cuda.memory_allocated(i)


def determine_available_memory_for_available_devices(max_devices: int) -> AvailableDeviceMemory:
    """(index, free bytes) of the first max_devices GPUs."""
    return [(i, calculate_available_device_cuda_memory(i)) for i in range(min(max_devices, torch.cuda.device_count()))]


def sort_devices_based_on_available_memory(devices: AvailableDeviceMemory) -> AvailableDeviceMemory:
    """Most free memory first."""
    return sorted(devices, key=lambda device: device[1], reverse=True)


def get_best_available_cuda_device(max_devices: int | None = None) -> torch.device:
    """The GPU with the most free memory among the first max_devices (all by default)."""
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("no CUDA device is visible")
    devices = sort_devices_based_on_available_memory(
        determine_available_memory_for_available_devices(max_devices or count))
    return torch.device("cuda", devices[0][0])


def get_best_available_device(cfg: Any) -> torch.device:
    """cfg.device, or the freest GPU when the model is split over several."""
    if cfg.device is None:
        raise ValueError("cfg.device is not set")
    device = torch.device(cfg.device)
    return get_best_available_cuda_device(cfg.n_devices) if device.type == "cuda" and cfg.n_devices > 1 else device


def count_unique_devices(hf_model: nn.Module) -> int:
    """How many devices the model's parameters live on."""
    return len({p.device for p in hf_model.parameters()})


def find_embedding_device(hf_model: nn.Module) -> torch.device | None:
    """Where the input embedding lives (None when the model has no get_input_embeddings)."""
    get = getattr(hf_model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return None if embedding is None else embedding.weight.device


def move_to_and_update_config(model: Any, device_or_dtype: torch.device | str | torch.dtype,
                              print_details: bool = True) -> Any:
    """model.to(device_or_dtype), with cfg.device / cfg.dtype kept in step (fxhook's `to` does both)."""
    return model.to(device_or_dtype, print_details)


def resolve_device_map(n_devices: int | None, device_map: Any, device: torch.device | str | None,
                       max_memory: Any = None) -> tuple[Any, Any]:
    """(device_map, max_memory) for HF loading. fxhook splits blocks itself (from_pretrained's n_devices /
    device_map), so HF is never asked to place modules: an explicit map passes through, else None."""
    if n_devices not in (None, 1) and device_map is not None:
        raise ValueError("pass n_devices or device_map, not both")
    return device_map, max_memory


def get_rotary_pct_from_config(config: Any) -> float:
    """The fraction of each head's dimensions that rotary embeddings turn (1.0 when not partial)."""
    if config is None:
        return 1.0
    if getattr(config, "rotary_pct", None) is not None:
        return float(config.rotary_pct)
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    return 1.0 if factor is None else float(factor)


__all__ = ["ActivationFunction", "NonlinearityType", "ModelWithCfg", "TypedModuleList", "get_device_for_block_index",
           "calculate_available_device_cuda_memory", "determine_available_memory_for_available_devices",
           "sort_devices_based_on_available_memory", "get_best_available_cuda_device", "get_best_available_device",
           "count_unique_devices", "find_embedding_device", "move_to_and_update_config", "resolve_device_map",
           "get_rotary_pct_from_config"]
