"""Adapter inference for decoder classes with no adapter (filled in below)."""
from __future__ import annotations

from fxhook.adapter import Adapter


def infer_adapter(hf_model, supported: list[str]) -> Adapter:
    name = type(hf_model).__name__
    raise NotImplementedError(
        f"fxhook has no adapter for {name}. Supported: {supported}. "
        f"Add an Adapter (module paths of embed, blocks, norms, attention and MLP) in adapters/.")
