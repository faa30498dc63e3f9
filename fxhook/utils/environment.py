"""Devices, initialisation and calling conventions, with TransformerLens's names."""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import warnings
from typing import Any, Callable

import torch
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn


def get_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (MPS only when TRANSFORMERLENS_ALLOW_MPS=1 says so, as in
    TransformerLens: some of its kernels are known to be wrong)."""
    import os

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1":
        return "mps"
    return "cpu"


def warn_if_mps(device: str | torch.device) -> None:
    """Warn that MPS may compute wrong results, unless TRANSFORMERLENS_ALLOW_MPS=1."""
    import os

    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "mps" and os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") != "1":
        warnings.warn("the MPS backend may give silently wrong results; set TRANSFORMERLENS_ALLOW_MPS=1 to "
                      "silence this warning", UserWarning, stacklevel=2)


def print_gpu_mem(step_name: str = "") -> None:
    """Print the GPU memory torch has allocated, in GiB."""
    allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    print(f"{step_name} ~ {allocated / 2 ** 30:.2f} GiB allocated on GPU.")


def calc_fan_in_and_fan_out(tensor: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) in TransformerLens's weight layout: [d_in, d_out] matrices and
    [n_heads, d_model, d_head] attention weights (torch's own convention is [d_out, d_in])."""
    shape = tensor.shape
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(f"fan in and fan out are defined for 1-, 2- and 3-axis weights, not shape {tuple(shape)}")


def init_xavier_uniform_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    bound = gain * math.sqrt(6.0 / sum(calc_fan_in_and_fan_out(param)))
    return nn.init.uniform_(param, -bound, bound)


def init_xavier_normal_(param: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    std = gain * math.sqrt(2.0 / sum(calc_fan_in_and_fan_out(param)))
    return nn.init.normal_(param, mean=0.0, std=std)


def _kaiming_scale(param: torch.Tensor, a: float, nonlinearity: str, gain: float, mode: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    fan = fan_in if mode == "fan_in" else fan_out
    return gain * nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)


def init_kaiming_uniform_(param: torch.Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0,
                          mode: str = "fan_in") -> torch.Tensor:
    """Uniform with std gain * calculate_gain(nonlinearity, a) / sqrt(fan), fans in TL's layout."""
    bound = math.sqrt(3.0) * _kaiming_scale(param, a, nonlinearity, gain, mode)
    return nn.init.uniform_(param, -bound, bound)


def init_kaiming_normal_(param: torch.Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0,
                         mode: str = "fan_in") -> torch.Tensor:
    """Normal with std gain * calculate_gain(nonlinearity, a) / sqrt(fan), fans in TL's layout."""
    return nn.init.normal_(param, mean=0.0, std=_kaiming_scale(param, a, nonlinearity, gain, mode))


def is_library_available(name: str) -> bool:
    """Whether a package can be imported, without importing it."""
    return name in sys.modules or importlib.util.find_spec(name) is not None


def override_or_use_default_value(default_flag: Any, override: Any = None) -> Any:
    """`override` unless it is None, else `default_flag`."""
    return default_flag if override is None else override


def select_compatible_kwargs(kwargs_dict: dict[str, Any], callable: Callable) -> dict[str, Any]:
    """The entries of kwargs_dict that name a parameter of `callable`."""
    parameters = inspect.signature(callable).parameters
    return {key: value for key, value in kwargs_dict.items() if key in parameters}


class LocallyOverridenDefaults:
    """Inside the block, `model.cfg.default_prepend_bos` and the tokenizer's padding side take the given
    values (prepend_bos=..., padding_side=...); the previous ones come back afterwards, even on an
    exception. None keeps a default as it is."""

    _VALID = {"prepend_bos": (None, True, False), "padding_side": (None, "left", "right")}

    def __init__(self, model: Any, **overrides: Any):
        unknown = sorted(set(overrides) - set(self._VALID))
        if unknown:
            raise ValueError(f"cannot override {unknown}: only {sorted(self._VALID)} can be overridden")
        for key, value in overrides.items():
            if value not in self._VALID[key]:
                raise ValueError(f"{key}={value!r} is not one of {self._VALID[key]}")
        self.model, self.overrides = model, overrides
        self._saved: dict[str, Any] = {}

    def _target(self, key: str) -> tuple[Any, str] | None:
        if key == "prepend_bos":
            return self.model.cfg, "default_prepend_bos"
        tokenizer = self.model.tokenizer
        return None if tokenizer is None else (tokenizer, "padding_side")

    def __enter__(self) -> "LocallyOverridenDefaults":
        for key, value in self.overrides.items():
            target = self._target(key)
            if value is None or target is None:
                continue
            self._saved[key] = getattr(*target)
            setattr(*target, value)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for key, value in self._saved.items():
            setattr(*self._target(key), value)
        self._saved.clear()


def download_file_from_hf(repo_name: str, file_name: str, subfolder: str = ".", cache_dir: str | None = HF_HUB_CACHE,
                          force_is_torch: bool = False, **kwargs: Any) -> Any:
    """A file of a hub repository through huggingface_hub (from the local cache when offline), read as
    JSON for .json files, with torch.load for .pth/.pt (or force_is_torch), else its local path."""
    import json

    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id=repo_name, filename=file_name, subfolder=None if subfolder == "." else subfolder,
                           cache_dir=cache_dir, **kwargs)
    if file_name.endswith((".pth", ".pt")) or force_is_torch:
        return torch.load(path, map_location="cpu", weights_only=True)
    if file_name.endswith(".json"):
        with open(path) as handle:
            return json.load(handle)
    return path


def clear_huggingface_cache() -> None:
    """Delete every revision in the local hub cache (huggingface_hub's cache manager)."""
    from huggingface_hub import scan_cache_dir

    cache = scan_cache_dir()
    revisions = [revision.commit_hash for repo in cache.repos for revision in repo.revisions]
    cache.delete_revisions(*revisions).execute()


__all__ = ["get_device", "warn_if_mps", "print_gpu_mem", "calc_fan_in_and_fan_out", "init_xavier_uniform_",
           "init_xavier_normal_", "init_kaiming_uniform_", "init_kaiming_normal_", "is_library_available",
           "override_or_use_default_value", "select_compatible_kwargs", "LocallyOverridenDefaults",
           "download_file_from_hf", "clear_huggingface_cache"]
