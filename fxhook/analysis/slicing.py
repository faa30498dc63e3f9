"""Position / batch / neuron selections as TransformerLens's analysis methods accept them.

`pos_slice=-1` keeps the last position and drops the axis; `(start, stop[, step])`
is `slice(start, stop, step)`; a list, array or tensor selects those indices;
None selects everything. TransformerLens's own `Slice` objects are accepted too.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from fxhook.core.hook_names import position_axis

SliceInput = Union[None, int, slice, tuple, list, np.ndarray, torch.Tensor, Any]


class Slice:
    """One selection along one axis; `apply(tensor, dim)` indexes that axis."""

    def __init__(self, selection: SliceInput = None):
        if isinstance(selection, Slice):
            self.selection, self.mode = selection.selection, selection.mode
        elif selection is None:
            self.selection, self.mode = slice(None), "identity"
        elif isinstance(selection, bool):
            raise TypeError("a slice cannot be a bool: pass an int position, a (start, stop) tuple or a list")
        elif isinstance(selection, (int, np.integer)):
            self.selection, self.mode = int(selection), "int"
        elif isinstance(selection, tuple):
            self.selection, self.mode = slice(*selection), "slice"
        elif isinstance(selection, slice):
            self.selection, self.mode = selection, "slice"
        elif isinstance(selection, (list, np.ndarray, torch.Tensor)):
            array = selection.detach().cpu().numpy() if isinstance(selection, torch.Tensor) else np.asarray(selection)
            if array.ndim == 0:
                self.selection, self.mode = int(array), "int"
            else:
                self.selection, self.mode = torch.as_tensor(array.astype(np.int64)), "array"
        elif hasattr(selection, "slice") and hasattr(selection, "mode"):  # TransformerLens's Slice
            inner = selection.slice
            self.__init__(inner if selection.mode != "identity" else None)
        else:
            raise TypeError(f"cannot slice with {selection!r}: pass None, an int, a (start, stop[, step]) "
                            "tuple, a slice, or a list/array/tensor of indices")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        index: list[Any] = [slice(None)] * tensor.ndim
        selection = self.selection
        if self.mode == "array":
            selection = selection.to(tensor.device)
        index[dim] = selection
        return tensor[tuple(index)]

    def indices(self, length: int) -> list[int]:
        """The indices this selection keeps out of an axis of `length`."""
        return torch.arange(length)[self.selection].reshape(-1).tolist()

    def __repr__(self) -> str:
        return f"Slice({self.selection!r}, mode={self.mode!r})"


def as_slice(selection: SliceInput) -> Slice:
    return selection if isinstance(selection, Slice) else Slice(selection)


def position_selection(pos_slice: SliceInput) -> Slice:
    """A cache's pos_slice, as TransformerLens reads it: an int keeps its axis, of length 1."""
    single = isinstance(pos_slice, (int, np.integer)) and not isinstance(pos_slice, bool)
    return as_slice([int(pos_slice)] if single else pos_slice)


def slice_positions(name: str, value: torch.Tensor, selection: Slice, batch_axes: int = 1) -> torch.Tensor:
    """The selected positions of activation `name` (query positions for patterns and scores; "_grad" names as
    their activation); unchanged when it has no position axis. batch_axes 0: the batch axis was removed."""
    axis = position_axis(name.removesuffix("_grad"))
    if axis is None:
        return value
    axis -= 1 - batch_axes
    return value if value.dim() <= axis else selection.apply(value, dim=axis)
