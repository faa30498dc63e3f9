"""Per-architecture adapters: data describing where each family keeps its parts."""
from __future__ import annotations

from fxhook.adapter import Adapter

from adapters.gpt2 import GPT2
from adapters.llama import LLAMA
from adapters.gemma import GEMMA
from adapters.gemma2 import GEMMA2
from adapters.qwen3 import QWEN3
from adapters.olmo2 import OLMO2
from adapters.mixtral import MIXTRAL
from adapters.neox import NEOX
from adapters.gptj import GPTJ
from adapters.opt import OPT
from adapters.phi import PHI
from adapters.bloom import REFUSED

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA)
ADAPTERS += (GEMMA, GEMMA2, QWEN3, OLMO2, MIXTRAL)
ADAPTERS += (NEOX, GPTJ, OPT, PHI)

BY_ARCHITECTURE: dict[str, Adapter] = {arch: a for a in ADAPTERS for arch in a.architectures}
