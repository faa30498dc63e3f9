"""A matrix kept as the product ``A @ B`` of its two factors, with TransformerLens 3.9's
``FactoredMatrix`` interface.

Circuit matrices such as ``W_Q @ W_K.T`` (QK) or ``W_V @ W_O`` (OV) are ``d_model x d_model`` but
have rank at most ``d_head``. Keeping the factors means products, SVDs, eigenvalues and norms can be
done in the small ``d_head`` ("middle") space instead of on the big product. Leading batch dims
(e.g. ``[n_layers, n_heads]``) broadcast between the factors like ``torch.matmul``.
"""
from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any, Tuple, Union

import torch

Scalar = Union[int, float, torch.Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def get_corner(tensor: torch.Tensor, n: int = 3) -> torch.Tensor:
    """The first ``n`` entries along every dim: a cheap peek at a big tensor (TL's ``get_corner``)."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def _for_linalg(x: torch.Tensor) -> torch.Tensor:
    """LAPACK has no 16-bit SVD/eig, so run those in float32."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _keep_dim(index: Any, size: int) -> Any:
    """Turn an int row/column index into a length-1 slice, so indexing keeps a matrix a matrix."""
    if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.is_floating_point():
        index = int(index)
    if isinstance(index, int) and not isinstance(index, bool):
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a dim of size {size}")
        index %= size
        return slice(index, index + 1)
    return index


class FactoredMatrix:
    """``A @ B`` for ``A: [..., ldim, mdim]`` and ``B: [..., mdim, rdim]``, never formed unless asked."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors must be at least 2-D, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"factors must match on the inner dim, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(f"leading dims of {tuple(A.shape)} and {tuple(B.shape)} do not broadcast") from e
        # Broadcast views (no copies) so both factors index identically over the batch dims.
        self.A: torch.Tensor = A.broadcast_to(batch + A.shape[-2:])
        self.B: torch.Tensor = B.broadcast_to(batch + B.shape[-2:])
        self.ldim: int = A.shape[-2]
        self.mdim: int = A.shape[-1]
        self.rdim: int = B.shape[-1]
        self.shape: torch.Size = batch + (self.ldim, self.rdim)
        self.has_leading_dims: bool = len(batch) > 0

    # ---- products -------------------------------------------------------------------------------

    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[..., ldim, rdim]``: the expensive thing this class exists to avoid."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product ``[..., mdim, mdim]``; only defined for square matrices."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim, but the shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, ``(AB)^T = B^T A^T``, still factored."""
        return FactoredMatrix(self.B.mT, self.A.mT)

    @property
    def pair(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (broadcast) factors ``(A, B)``."""
        return self.A, self.B

    def __matmul__(self, other: Union[torch.Tensor, FactoredMatrix]) -> Union[FactoredMatrix, torch.Tensor]:
        """``self @ other``. A vector gives a vector; a matrix stays factored through the smaller
        of ``mdim`` and ``rdim``, so the hidden dim never grows."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim == 1:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply {tuple(self.shape)} by {tuple(other.shape)}")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> Union[FactoredMatrix, torch.Tensor]:
        """``other @ self``; the mirror image of ``__matmul__``."""
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by {tuple(self.shape)}")
        if other.ndim == 1:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Scalar) -> FactoredMatrix:
        """Scalar multiple; scaling one factor scales the product."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for matmul")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ---- spectral quantities, all computed in the middle space -----------------------------------

    @cached_property
    def _svd(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # With A = Ua Sa Vha and B = Ub Sb Vhb, AB = Ua (Sa Vha Ub Sb) Vhb. Ua and Vhb^T have
        # orthonormal columns, so an SVD of the small bracketed core (at most mdim x mdim) gives
        # AB's: U = Ua Uc, V = Vhb^T Vhc^T. No ldim x rdim matrix is ever formed.
        Ua, Sa, Vha = torch.linalg.svd(_for_linalg(self.A), full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(_for_linalg(self.B), full_matrices=False)
        core = Sa.unsqueeze(-1) * (Vha @ Ub) * Sb.unsqueeze(-2)
        Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
        U, V = Ua @ Uc, (Vhc @ Vhb).mT
        if self.A.dtype in _LOW_PRECISION:
            U, S, V = (t.to(self.A.dtype) for t in (U, S, V))
        return U, S, V

    def svd(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD ``(U, S, V)`` with ``AB == U @ diag(S) @ V.mT``. As in TL, the third item is ``V``
        ``[..., rdim, k]``, not ``Vh``; ``k = min(ldim, mdim, rdim)``. Cached."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors ``[..., ldim, k]``."""
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        """Singular values ``[..., k]``, descending."""
        return self._svd[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors ``[..., rdim, k]``."""
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        """Deprecated TL alias that has always returned ``V`` (not its transpose); kept so TL code
        ported here computes the same thing."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (right singular vectors), not V's transpose, as in "
            "TransformerLens; use .V, or .V.mT for the actual Vh.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._svd[2]

    @cached_property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues ``[..., mdim]`` (complex) of BA. They are AB's nonzero eigenvalues: if
        ``BAv = kv`` then ``AB(Av) = k(Av)``; AB's others are zeros."""
        return torch.linalg.eigvals(_for_linalg(self.BA))

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``[...]``: the root sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix refactored as ``(U sqrt(S), sqrt(S) V^T)``: both halves carry equal
        singular values, with orthogonal columns / rows."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root.unsqueeze(-2), root.unsqueeze(-1) * self.V.mT)

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) V^T`` ``[..., k, rdim]``: AB with its orthogonal left factor U dropped."""
        return self.S.unsqueeze(-1) * self.V.mT

    def collapse_r(self) -> torch.Tensor:
        """``U diag(S)`` ``[..., ldim, k]``: AB with its orthogonal right factor V dropped."""
        return self.U * self.S.unsqueeze(-2)

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k`` corner of AB (and of each batch dim), forming only that corner."""
        return get_corner(self.A[..., :k, :] @ self.B[..., :, :k], k)

    # ---- shape manipulation ------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index like the dense tensor. Leading entries index the batch dims of both factors; the
        next two, if given, pick rows of A and columns of B, an int there kept as a length-1 slice
        (as in TL) so the result is still a matrix. ``...`` and ``None`` (batch dims only) work."""
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        dots = [p for p, i in enumerate(idx) if i is Ellipsis]  # `is`: tensors don't compare to ...
        if len(dots) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if dots:
            used = sum(i is not None and i is not Ellipsis for i in idx)
            idx[dots[0]: dots[0] + 1] = [slice(None)] * (self.ndim - used)
        n_batch, taken, split = self.ndim - 2, 0, 0
        while split < len(idx) and (taken < n_batch or idx[split] is None):
            taken += idx[split] is not None
            split += 1
        batch, matrix = tuple(idx[:split]), idx[split:]
        if len(matrix) > 2 or any(i is None for i in matrix):
            raise IndexError(f"index {tuple(idx)} does not fit a FactoredMatrix of shape {tuple(self.shape)}")
        A, B = self.A[batch], self.B[batch]
        if matrix:
            A = A[..., _keep_dim(matrix[0], self.ldim), :]
        if len(matrix) == 2:
            B = B[..., _keep_dim(matrix[1], self.rdim)]
        return FactoredMatrix(A, B)

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """Insert a size-1 batch dim at position ``k`` of ``shape`` (negative counts from the end,
        as for tensors); it must land among the batch dims, not inside the matrix."""
        pos = k if k >= 0 else k + self.ndim + 1
        if not 0 <= pos <= self.ndim - 2:
            raise IndexError(f"unsqueeze({k}) would not be a batch dim of shape {tuple(self.shape)}")
        return FactoredMatrix(self.A.unsqueeze(pos), self.B.unsqueeze(pos))

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> torch.Tensor:
    """||L R|| / (||L|| ||R||) (Frobenius norms) of each pair of matrices (Elhage et al. 2021's
    composition score). With broadcast_dims, every leading index of `left` meets every leading index
    of `right`: [*left_batch, *right_batch]; without, their batch dims broadcast against each other."""
    if broadcast_dims:
        n_left, n_right = left.ndim - 2, right.ndim - 2
        for i in range(n_left):
            right = right.unsqueeze(i)
        for i in range(n_right):
            left = left.unsqueeze(i + n_left)
    if left.rdim != right.ldim:
        raise ValueError(f"composition needs left's columns to match right's rows: left {tuple(left.shape)}, "
                         f"right {tuple(right.shape)}")
    left_core, right_core = left.collapse_l(), right.collapse_r()  # the orthogonal outer factors drop out
    norm = lambda m: torch.linalg.matrix_norm(m)  # noqa: E731
    return norm(left_core @ right_core) / norm(right_core) / norm(left_core)
