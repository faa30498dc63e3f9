"""Helpers on FactoredMatrix with TransformerLens's names."""
from __future__ import annotations

import torch

from fxhook.factored_matrix import FactoredMatrix, composition_scores
from fxhook.utils.tensors import get_corner


def get_matrix_corner(matrix: FactoredMatrix, n: int = 3) -> torch.Tensor:
    """The top-left n x n corner of every matrix in `matrix` (and the first n of each batch dim), dense."""
    return get_corner(matrix, n)


__all__ = ["composition_scores", "get_matrix_corner"]
