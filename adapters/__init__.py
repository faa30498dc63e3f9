"""Per-architecture adapters: data describing where each family keeps its parts, and `find_adapter`,
which picks the adapter for a HF model.

This package sits just above the schema (`fxhook.adapter`): it imports only the schema,
`fxhook.weights`, `fxhook.infer_adapter` and `fxhook.core`, never capture or runtime code.
"""
from __future__ import annotations

from torch import nn

from fxhook.adapter import Adapter
from fxhook.infer_adapter import infer_adapter

from adapters.bloom import REFUSED
from adapters.gemma import GEMMA
from adapters.gemma2 import GEMMA2
from adapters.gpt2 import GPT2
from adapters.gptj import GPTJ
from adapters.llama import LLAMA
from adapters.mixtral import MIXTRAL
from adapters.neox import NEOX
from adapters.olmo2 import OLMO2
from adapters.opt import OPT
from adapters.phi import PHI
from adapters.qwen3 import QWEN3
from adapters.tl_native import TL_NATIVE

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA)
ADAPTERS += (GEMMA, GEMMA2, QWEN3, OLMO2, MIXTRAL)
ADAPTERS += (NEOX, GPTJ, OPT, PHI)
ADAPTERS += (TL_NATIVE,)  # TransformerLens's own architectures (fxhook/native/)

BY_ARCHITECTURE: dict[str, Adapter] = {arch: a for a in ADAPTERS for arch in a.architectures}


def find_adapter(hf_model: nn.Module) -> Adapter:
    """The adapter for `hf_model`'s class (specialised to its config); inferred from the module tree
    when no adapter names the class; refused architectures raise NotImplementedError with their reason."""
    name = type(hf_model).__name__
    if name in REFUSED:
        raise NotImplementedError(f"{name} has no fxhook adapter, by design: {REFUSED[name]}")
    if name not in BY_ARCHITECTURE:
        return infer_adapter(hf_model, supported=sorted(BY_ARCHITECTURE))
    return BY_ARCHITECTURE[name].specialised(hf_model.config)
