"""fxhook: TransformerLens's HookedTransformer interface for any HF causal LM, by graph rewriting."""
from fxhook import utils
from fxhook.config import HookedTransformerConfig
from fxhook.factored_matrix import FactoredMatrix  # the class, as `from transformer_lens import FactoredMatrix`
from fxhook.analysis.cache import ActivationCache
from fxhook.core.hook_point import HookPoint
from fxhook.model import HookedTransformer
from fxhook import evals, head_detector, train  # TransformerLens's companion modules, as its package exposes them
from fxhook.SVDInterpreter import SVDInterpreter  # the class, as `transformer_lens.SVDInterpreter` is

__all__ = ["HookedTransformer", "HookedTransformerConfig", "ActivationCache", "FactoredMatrix", "HookPoint",
           "utils", "SVDInterpreter", "evals", "head_detector", "train"]
