"""Per-architecture adapters: data describing where each family keeps its parts."""
from __future__ import annotations

from fxhook.adapter import Adapter

from adapters.gpt2 import GPT2
from adapters.llama import LLAMA

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA)

BY_ARCHITECTURE: dict[str, Adapter] = {arch: a for a in ADAPTERS for arch in a.architectures}
