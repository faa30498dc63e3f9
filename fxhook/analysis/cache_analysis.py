"""The analysis methods of ActivationCache, gathered in one mixin (fxhook/runtime/cache.py uses it)."""
from __future__ import annotations

from fxhook.analysis.decomposition import DecompositionMixin
from fxhook.analysis.heads import HeadsMixin
from fxhook.analysis.neurons import NeuronsMixin
from fxhook.analysis.resid import ResidualMixin
from fxhook.analysis.slicing import SliceInput, as_slice


class CacheAnalysisMixin(ResidualMixin, HeadsMixin, NeuronsMixin, DecompositionMixin):
    """TransformerLens 3.9's ActivationCache analysis: needs `cache_dict`, `model`, `has_batch_dim`
    and `self[...]` lookups with TransformerLens shorthand."""

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput):
        """A new cache holding only the selected batch items (an int drops the batch axis)."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch axis (remove_batch_dim was applied)")
        selection = as_slice(batch_slice)
        sliced = {name: selection.apply(value, dim=0) for name, value in self.cache_dict.items()}
        return type(self)(sliced, self.model, has_batch_dim=selection.mode != "int")
