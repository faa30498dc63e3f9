"""Per-architecture adapters: data describing where each family keeps its parts."""
from __future__ import annotations

from fxhook.adapter import Adapter

from adapters.gpt2 import GPT2
from adapters.llama import LLAMA
from adapters.neox import NEOX
from adapters.gptj import GPTJ
from adapters.opt import OPT
from adapters.phi import PHI
from adapters.bloom import REFUSED

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA)
ADAPTERS += (NEOX, GPTJ, OPT, PHI)

BY_ARCHITECTURE: dict[str, Adapter] = {arch: a for a in ADAPTERS for arch in a.architectures}
