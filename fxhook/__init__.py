"""fxhook: TransformerLens's HookedTransformer interface for any HF causal LM, by graph rewriting."""
from fxhook import utils
from fxhook.config import HookedTransformerConfig
from fxhook.analysis.cache import ActivationCache
from fxhook.core.hook_point import HookPoint
from fxhook.model import HookedTransformer

__all__ = ["HookedTransformer", "HookedTransformerConfig", "ActivationCache", "HookPoint", "utils"]
