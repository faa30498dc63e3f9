"""Analysis on top of the hooks: residual-stream decomposition and attribution (as
ActivationCache methods), activation patching, and pictures.

    from fxhook.analysis import patching, plots
"""
from fxhook.analysis.slicing import Slice

__all__ = ["Slice"]
