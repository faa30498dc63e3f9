"""ActivationCache: the activations of one run, by hook name, with TransformerLens shorthand."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from fxhook.analysis.cache_analysis import CacheAnalysisMixin
from fxhook.core.hook_names import get_act_name


class ActivationCache(CacheAnalysisMixin):
    """A mapping hook name -> activation. `cache["pattern", 0]` expands like get_act_name.

    The analysis methods (accumulated_resid, decompose_resid, stack_head_results,
    logit_attrs, ...) come from fxhook.analysis, with TransformerLens 3.9's semantics.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple):
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:  # cache["pattern", -1]: last layer
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            if len(key) == 2:
                return get_act_name(key[0], key[1])
            if len(key) == 3:
                return get_act_name(key[0], key[1], key[2])
        raise KeyError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, got {key!r}")

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            from fxhook.runtime.hooks import UnknownHookError, unknown_hook_message

            raise UnknownHookError(unknown_hook_message(name, self.cache_dict) +
                                   " (this cache holds only what run_with_cache kept)")
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except (KeyError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def to(self, device, *, move_model: bool = False) -> "ActivationCache":
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        if move_model:
            self.model.to(device, False)
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        torch.set_grad_enabled(mode)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (written under a temporary name, then renamed);
        `ActivationCache.load(path, model=...)` reads it back exactly."""
        from safetensors.torch import save_file

        from fxhook.runtime.saving import config_hash

        tensors, storages = {}, set()
        for name, value in self.cache_dict.items():
            value = value.detach().to("cpu").contiguous()
            key = (value.untyped_storage().data_ptr(), value.device.type)
            tensors[name] = value.clone() if key in storages else value  # safetensors refuses shared storage
            storages.add(key)
        metadata = {"fxhook": "ActivationCache", "has_batch_dim": json.dumps(self.has_batch_dim),
                    "names": json.dumps(list(tensors)),  # the cache's order (the file sorts its keys)
                    "config_hash": config_hash(self.model.cfg) if self.model is not None else "",
                    "model_name": str(getattr(getattr(self.model, "cfg", None), "model_name", ""))}
        path = os.fspath(path)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model, device: torch.device | str | None = None) -> "ActivationCache":
        """A cache written by `save`, for `model` (the one it was made with: a model with another config
        is refused, since the analysis methods read its weights). `device`: where the tensors go (default:
        the model's device)."""
        from safetensors import safe_open

        from fxhook.runtime.saving import config_hash

        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("fxhook") != "ActivationCache":
                raise ValueError(f"{os.fspath(path)!r} is not an ActivationCache written by cache.save(path)")
            if metadata["config_hash"] != config_hash(model.cfg):
                raise ValueError(f"{os.fspath(path)!r} was saved from a model ({metadata['model_name']}) whose config "
                                 f"differs from this model's ({model.cfg.model_name}): load it with the model "
                                 "that made it")
            target = device if device is not None else model.cfg.device
            cache_dict = {name: f.get_tensor(name).to(target) for name in json.loads(metadata["names"])}
        return cls(cache_dict, model, has_batch_dim=json.loads(metadata["has_batch_dim"]))

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension of a batch-1 cache (in place, as TransformerLens)."""
        if not self.has_batch_dim:
            return self
        for name, value in self.cache_dict.items():
            if value.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, but {name} has batch {value.shape[0]}")
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # ---------------------------------------------------------------- state-space models (refused)
    def compute_ssm_effective_attention(self, layer: int | None = None, include_dt_scaling: bool = False,
                                        per_state_coord: bool = False):
        raise NotImplementedError(_NO_SSM)

    def compute_ssm_state(self, layer: int | None = None, time_step: int | None = None):
        raise NotImplementedError(_NO_SSM)

    def ssm_layers(self, mixer_type=None) -> list[int]:
        raise NotImplementedError(_NO_SSM)


_NO_SSM = ("state-space (Mamba-style) analysis: fxhook wraps transformer causal LMs, whose caches hold no SSM "
           "states to analyse")
