"""TransformerLens's own model family as a plain-PyTorch causal LM that fxhook captures like any HF model.

`TLNativeConfig` holds a TransformerLens config (its field names); `TLNativeForCausalLM` computes what
TransformerLens's `HookedTransformer` computes for it, with a HF-style config and forward, its attention
core routed through transformers' attention registry. The adapter describing it is
`adapters/tl_native.py`; `fxhook/from_config.py` builds it for `HookedTransformer(cfg)`.
"""
from fxhook.native.config import TLNativeConfig
from fxhook.native.model import TLNativeForCausalLM

__all__ = ["TLNativeConfig", "TLNativeForCausalLM"]
