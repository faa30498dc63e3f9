"""Loading HF checkpoints into a HookedTransformer."""
from __future__ import annotations

import torch

from fxhook.config import config_from_hf


def find_adapter(hf_model):
    from adapters import BY_ARCHITECTURE

    name = type(hf_model).__name__
    if name not in BY_ARCHITECTURE:
        raise NotImplementedError(
            f"fxhook has no adapter for {name}. Supported: {sorted(BY_ARCHITECTURE)}. "
            f"Add an Adapter (module paths of embed, blocks, norms, attention and MLP) in adapters/.")
    return BY_ARCHITECTURE[name]


class LoadingMixin:
    @classmethod
    def from_pretrained_no_processing(cls, model_name_or_path=None, *, hf_model=None, tokenizer=None,
                                      **kwargs):
        if hf_model is None:
            raise NotImplementedError("loading by name or path is not implemented yet; pass hf_model=")
        adapter = find_adapter(hf_model)
        cfg = config_from_hf(hf_model.config, adapter, model_name=model_name_or_path or "custom")
        param = next(hf_model.parameters())
        cfg.device, cfg.dtype = str(param.device), param.dtype
        return cls(cfg, hf_model=hf_model, tokenizer=tokenizer, adapter=adapter)

    @classmethod
    def from_pretrained(cls, model_name_or_path=None, **kwargs):
        return cls.from_pretrained_no_processing(model_name_or_path, **kwargs)
