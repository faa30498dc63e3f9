"""FactoredMatrix: every operation checked against the dense product computed independently
(einsum), and against TransformerLens 3.9's own FactoredMatrix on the same factors."""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformer_lens.FactoredMatrix import FactoredMatrix as TLFactoredMatrix

from fxhook.factored_matrix import FactoredMatrix, get_corner

F64 = torch.float64


def dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B with batch broadcasting, computed without torch.matmul."""
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    return torch.einsum("...lm,...mr->...lr", A.expand(batch + A.shape[-2:]), B.expand(batch + B.shape[-2:]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    """Equal shapes and max error within rtol of the expected tensor's scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


def assert_same_multiset(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """Two 1-D complex sets equal up to order: greedily pair each value with its nearest partner."""
    assert a.shape == b.shape, (a.shape, b.shape)
    left = list(b)
    for x in a:
        dist = torch.stack([(x - y).abs() for y in left])
        j = int(dist.argmin())
        assert dist[j] <= tol, f"{x} has no partner in {b} (nearest {left[j]})"
        left.pop(j)


@dataclass
class Case:
    A: torch.Tensor
    B: torch.Tensor
    batch: Tuple[int, ...]
    l: int
    m: int
    r: int

    @property
    def fm(self) -> FactoredMatrix:
        return FactoredMatrix(self.A, self.B)

    @property
    def M(self) -> torch.Tensor:
        return dense(self.A, self.B)

    @property
    def k(self) -> int:
        return min(self.l, self.m, self.r)


def randn(seed: int, *shape: int, dtype=F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def cases(draw, min_batch: int = 0, max_batch: int = 2, square: bool = False, dtype=F64) -> Case:
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=min_batch, max_size=max_batch)))
    l = draw(st.integers(1, 7))
    # The middle dim below, equal to, or above the outer dims: the low-rank and the over-complete regime.
    m = draw(st.one_of(st.integers(1, l), st.integers(l, l + 4)))
    r = l if square else draw(st.integers(1, 7))

    def own_batch() -> Tuple[int, ...]:
        # Each factor gets the batch with some leading dims dropped and some set to 1, to test broadcasting.
        drop = draw(st.integers(0, len(batch)))
        return tuple(1 if draw(st.booleans()) else d for d in batch[drop:])

    seed = draw(st.integers(0, 2**31 - 1))
    a_batch, b_batch = own_batch(), own_batch()
    # The broadcast of the two must still be `batch`: pin one factor to the full batch if not.
    if torch.broadcast_shapes(a_batch, b_batch) != batch:
        a_batch = batch
    return Case(randn(seed, *a_batch, l, m, dtype=dtype), randn(seed + 1, *b_batch, m, r, dtype=dtype),
                batch, l, m, r)


# ---- construction, products, transpose ---------------------------------------------------------------


@settings(max_examples=40)
@given(case=cases())
def test_shape_dims_and_pair(case: Case):
    fm = case.fm
    assert fm.shape == torch.Size(case.batch + (case.l, case.r))
    assert (fm.ldim, fm.mdim, fm.rdim, fm.ndim) == (case.l, case.m, case.r, len(case.batch) + 2)
    assert fm.has_leading_dims == bool(case.batch)
    A, B = fm.pair
    assert A.shape == case.batch + (case.l, case.m) and B.shape == case.batch + (case.m, case.r)
    assert repr(fm) == f"FactoredMatrix: Shape({fm.shape}), Hidden Dim({case.m})"


@settings(max_examples=40)
@given(case=cases())
def test_AB_T_and_BA(case: Case):
    fm = case.fm
    assert_close(fm.AB, case.M)
    assert fm.T.shape == case.batch + (case.r, case.l)
    assert_close(fm.T.AB, case.M.mT)
    assert_close(fm.T.T.AB, case.M)
    if case.l == case.r:
        assert_close(fm.BA, dense(case.B, case.A))
    else:
        with pytest.raises(ValueError, match="ldim == rdim"):
            fm.BA


@settings(max_examples=40)
@given(case=cases(), n=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), batched=st.booleans())
def test_matmul_with_tensors(case: Case, n: int, seed: int, batched: bool):
    fm, M = case.fm, case.M
    lead = case.batch if batched else ()
    v, u = randn(seed, case.r), randn(seed + 1, case.l)
    assert_close(fm @ v, torch.einsum("...lr,r->...l", M, v))
    assert_close(u @ fm, torch.einsum("l,...lr->...r", u, M))

    right, left = randn(seed + 2, *lead, case.r, n), randn(seed + 3, *lead, n, case.l)
    out = fm @ right
    assert isinstance(out, FactoredMatrix) and out.mdim <= min(case.m, case.r)
    assert_close(out.AB, dense(M, right))
    out = left @ fm
    assert isinstance(out, FactoredMatrix) and out.mdim <= min(case.m, case.l)
    assert_close(out.AB, dense(left, M))

    with pytest.raises(ValueError):
        fm @ randn(seed, case.r + 1, 2)
    with pytest.raises(ValueError):
        randn(seed, 2, case.l + 1) @ fm


@settings(max_examples=40)
@given(case=cases(), other=cases(max_batch=0), seed=st.integers(0, 2**31 - 1))
def test_matmul_with_factored_matrices(case: Case, other: Case, seed: int):
    fm, M = case.fm, case.M
    # Reshape `other` to chain on each side of `case`: [r, x] on the right and [x, l] on the left.
    right = FactoredMatrix(randn(seed, case.r, other.m), other.B)
    out = fm @ right
    assert isinstance(out, FactoredMatrix) and out.mdim <= min(case.m, case.r, other.m)
    assert_close(out.AB, dense(M, dense(right.A, right.B)))
    left = FactoredMatrix(other.A.mT, randn(seed + 1, other.l, case.l))
    out = left @ fm
    assert isinstance(out, FactoredMatrix)
    assert_close(out.AB, dense(dense(left.A, left.B), M))


@settings(max_examples=20)
@given(case=cases(), c=st.floats(-3, 3, allow_nan=False))
def test_scalar_multiplication(case: Case, c: float):
    for out in (case.fm * c, c * case.fm, case.fm * torch.tensor(c, dtype=F64), torch.tensor(c, dtype=F64) * case.fm):
        assert isinstance(out, FactoredMatrix)
        assert_close(out.AB, c * case.M)
    with pytest.raises(ValueError, match="scalar"):
        case.fm * torch.ones(2, dtype=F64)


# ---- indexing ------------------------------------------------------------------------------------


@st.composite
def index_into(draw, shape: torch.Size):
    """An index of ints (incl. negative) and slices, at most one entry per dim of `shape`."""
    parts = []
    for size in shape[: draw(st.integers(1, len(shape)))]:
        parts.append(draw(st.one_of(
            st.integers(-size, size - 1),
            st.builds(slice, st.none() | st.integers(-size, size), st.none() | st.integers(-size, size),
                      st.none() | st.integers(1, 2)))))
    return tuple(parts)


def _as_slice(i, size):
    return slice(i % size, i % size + 1) if isinstance(i, int) else i


@settings(max_examples=60)
@given(data=st.data(), case=cases(min_batch=1))
def test_indexing_matches_dense_and_transformer_lens(data, case: Case):
    fm, M = case.fm, case.M
    idx = data.draw(index_into(fm.shape))
    n_batch = len(case.batch)
    dense_idx = idx[:n_batch] + tuple(_as_slice(i, s) for i, s in zip(idx[n_batch:], fm.shape[n_batch:]))
    expected = M[dense_idx]
    out = fm[idx if len(idx) > 1 else idx[0]]
    assert isinstance(out, FactoredMatrix)
    assert_close(out.AB, expected)
    assert out.shape == expected.shape
    # TL 3.9 gives the same matrix for this kind of index.
    assert_close(TLFactoredMatrix(case.A, case.B)[idx].AB, expected)


@settings(max_examples=30)
@given(case=cases(min_batch=1), seed=st.integers(0, 2**31 - 1))
def test_indexing_with_ellipsis_none_and_tensors(case: Case, seed: int):
    fm, M = case.fm, case.M
    assert_close(fm[..., -1].AB, M[..., -1:])
    assert_close(fm[..., 0, :].AB, M[..., :1, :])
    assert_close(fm[0, ...].AB, M[0])
    assert_close(fm[None].AB, M[None])
    assert_close(fm[0, None].AB, M[0, None])
    rows = torch.randint(0, case.l, (3,), generator=torch.Generator().manual_seed(seed))
    picks = torch.randint(0, case.batch[0], (2,), generator=torch.Generator().manual_seed(seed + 1))
    assert_close(fm[picks].AB, M[picks])
    full = (slice(None),) * (len(case.batch) - 1)
    assert_close(fm[(picks,) + full + (rows,)].AB, M[picks][..., rows, :])  # rows index their own dim
    row = 1 % case.l  # a 0-d tensor index counts as an int: kept as a length-1 slice
    assert_close(fm[(0,) + full + (torch.tensor(row), -1)].AB, M[(0,) + full + (slice(row, row + 1), slice(-1, None))])
    with pytest.raises(IndexError):
        fm[(0,) * (fm.ndim + 1)]
    with pytest.raises(IndexError):
        fm[(slice(None),) * (fm.ndim - 1) + (None, 0)]
    with pytest.raises(IndexError):
        fm[..., case.r]
    with pytest.raises(IndexError):
        fm[..., 0, ...]


@settings(max_examples=20)
@given(case=cases())
def test_unsqueeze(case: Case):
    fm, M = case.fm, case.M
    n_batch = len(case.batch)
    for k in range(n_batch + 1):
        assert_close(fm.unsqueeze(k).AB, M.unsqueeze(k))
        assert_close(fm.unsqueeze(k - n_batch - 3).AB, M.unsqueeze(k - n_batch - 3))
    for bad in (n_batch + 1, n_batch + 2, -1, -2):
        with pytest.raises(IndexError):
            fm.unsqueeze(bad)


# ---- spectral quantities -----------------------------------------------------------------------------


def _eye(k: int) -> torch.Tensor:
    return torch.eye(k, dtype=F64)


@settings(max_examples=40)
@given(case=cases())
def test_svd_reconstructs_and_matches_dense_singular_values(case: Case):
    fm, M, k = case.fm, case.M, case.k
    U, S, V = fm.svd()
    assert U.shape == case.batch + (case.l, k) and S.shape == case.batch + (k,) and V.shape == case.batch + (case.r, k)
    assert fm.U is U and fm.S is S and fm.V is V and fm.svd()[0] is U  # cached
    assert_close(dense(U * S.unsqueeze(-2), V.mT), M)
    assert_close(S, torch.linalg.svdvals(M)[..., :k])
    assert bool((S >= 0).all()) and bool((S[..., :-1] >= S[..., 1:]).all())
    assert_close(U.mT @ U, _eye(k).expand(case.batch + (k, k)))
    assert_close(V.mT @ V, _eye(k).expand(case.batch + (k, k)))
    with pytest.warns(DeprecationWarning, match="returns V"):
        assert fm.Vh is V  # TL 3.9's alias: it has always been V


def test_svd_never_forms_the_product(monkeypatch):
    """A 60x60 rank-3 matrix: every SVD must be of a factor or the small core, never 60x60."""
    shapes = []
    real_svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        shapes.append(tuple(x.shape[-2:]))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    fm = FactoredMatrix(randn(0, 2, 60, 3), randn(1, 2, 3, 60))
    assert_close(fm.norm(), torch.linalg.matrix_norm(fm.AB))
    assert shapes and all(min(s) <= 3 for s in shapes), shapes


@settings(max_examples=40)
@given(case=cases(square=True))
def test_eigenvalues(case: Case):
    fm, M = case.fm, case.M
    eig = fm.eigenvalues
    assert eig.shape == case.batch + (case.m,) and eig.is_complex()
    BA = dense(case.B, case.A)
    # AB [l, l] and BA [m, m] share their nonzero eigenvalues; pad both with zeros to compare.
    n = max(case.l, case.m)
    for i in itertools.product(*map(range, case.batch)):
        ours = eig[i]
        assert_same_multiset(ours, torch.linalg.eigvals(BA[i]), tol=1e-8 * max(1.0, ours.abs().max().item()))
        pad = lambda e: torch.cat([e, torch.zeros(n - e.numel(), dtype=e.dtype)])  # noqa: E731
        ref = torch.linalg.eigvals(M[i])
        assert_same_multiset(pad(ours), pad(ref), tol=1e-6 * max(1.0, ref.abs().max().item()))


@settings(max_examples=40)
@given(case=cases())
def test_norm(case: Case):
    assert_close(case.fm.norm(), torch.linalg.matrix_norm(case.M, "fro"))
    assert case.fm.norm().shape == case.batch


@settings(max_examples=40)
@given(case=cases())
def test_collapse_l_and_r(case: Case):
    fm, M, k = case.fm, case.M, case.k
    L, R = fm.collapse_l(), fm.collapse_r()
    assert L.shape == case.batch + (k, case.r) and R.shape == case.batch + (case.l, k)
    assert_close(L, fm.U.mT @ M)  # U^T AB = S V^T
    assert_close(R, M @ fm.V)  # AB V = U S
    assert_close(dense(fm.U, L), M)
    assert_close(dense(R, fm.V.mT), M)


@settings(max_examples=40)
@given(case=cases())
def test_make_even(case: Case):
    fm, M, k = case.fm, case.M, case.k
    even = fm.make_even()
    assert even.mdim == k
    assert_close(even.AB, M)
    root = fm.S.sqrt()
    assert_close(torch.linalg.svdvals(even.A), root)
    assert_close(torch.linalg.svdvals(even.B), root)
    # Balanced: A^T A = B B^T = diag(S).
    assert_close(even.A.mT @ even.A, torch.diag_embed(fm.S))
    assert_close(even.B @ even.B.mT, torch.diag_embed(fm.S))


@settings(max_examples=20)
@given(case=cases(), k=st.integers(1, 4))
def test_get_corner(case: Case, k: int):
    assert_close(case.fm.get_corner(k), case.M[tuple(slice(k) for _ in range(case.M.ndim))])
    assert_close(get_corner(case.M, k), case.M[tuple(slice(k) for _ in range(case.M.ndim))])


def test_bad_factors_are_rejected():
    with pytest.raises(ValueError, match="inner dim"):
        FactoredMatrix(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(torch.zeros(2, 3, 4), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="2-D"):
        FactoredMatrix(torch.zeros(4), torch.zeros(4, 3))


def test_low_precision_factors():
    """16-bit factors: SVD and eig run in float32 (LAPACK has no 16-bit kernels)."""
    A, B = randn(0, 2, 6, 3, dtype=torch.float32), randn(1, 2, 3, 6, dtype=torch.float32)
    ref = FactoredMatrix(A, B)
    half = FactoredMatrix(A.bfloat16(), B.bfloat16())
    assert half.S.dtype == torch.bfloat16 and half.U.dtype == torch.bfloat16
    assert_close(half.S.float(), ref.S, rtol=5e-2)
    assert half.eigenvalues.dtype == torch.complex64
    assert_close(half.norm().float(), ref.norm(), rtol=5e-2)


# ---- against TransformerLens 3.9 ----------------------------------------------------------------------


def _sorted_eigs(e: torch.Tensor) -> torch.Tensor:
    key = e.real * 1e6 + e.imag  # rounded real part first, then imaginary
    return torch.gather(e, -1, key.argsort(-1))


@settings(max_examples=40)
@given(case=cases())
def test_matches_transformer_lens(case: Case):
    ours, tl = case.fm, TLFactoredMatrix(case.A, case.B)
    assert ours.shape == tl.shape and repr(ours) == repr(tl)
    assert_close(ours.AB, tl.AB, rtol=1e-4)
    assert_close(ours.S, tl.S, rtol=1e-4)
    assert_close(ours.norm(), tl.norm(), rtol=1e-4)
    assert_close(dense(ours.U * ours.S.unsqueeze(-2), ours.V.mT), dense(tl.U * tl.S.unsqueeze(-2), tl.V.mT), rtol=1e-4)
    if _distinct(ours.S):  # then singular vectors agree up to a sign per pair
        sign = torch.sign((ours.V * tl.V).sum(-2))
        assert_close(ours.collapse_l() * sign.unsqueeze(-1), tl.collapse_l(), rtol=1e-4)
        assert_close(ours.collapse_r() * sign.unsqueeze(-2), tl.collapse_r(), rtol=1e-4)
    assert_close(ours.make_even().AB, tl.make_even().AB, rtol=1e-4)
    assert_close(ours.get_corner(2), tl.get_corner(2), rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert ours.Vh.shape == tl.Vh.shape  # both are V, [..., rdim, k]
    if case.l == case.r:
        for i in itertools.product(*map(range, case.batch)):
            ref = tl.eigenvalues[i]
            assert_same_multiset(ours.eigenvalues[i], ref, tol=1e-4 * max(1.0, ref.abs().max().item()))
            assert_close(torch.view_as_real(_sorted_eigs(ours.eigenvalues[i])),
                         torch.view_as_real(_sorted_eigs(ref)), rtol=1e-4)


def _distinct(S: torch.Tensor) -> bool:
    """Singular vectors are only unique (up to sign) for well-separated singular values."""
    gaps = (S[..., :-1] - S[..., 1:]).abs()
    return bool((gaps > 1e-3 * S.max().clamp(min=1)).all()) and bool((S > 1e-6).all())


def test_the_package_exports_the_class_as_transformer_lens_does():
    """`from transformer_lens import FactoredMatrix` gives the class; a notebook switched to fxhook needs the same."""
    import transformer_lens

    import fxhook

    assert isinstance(transformer_lens.FactoredMatrix, type)
    assert fxhook.FactoredMatrix is FactoredMatrix
    a, b = torch.randn(5, 3), torch.randn(3, 4)
    torch.testing.assert_close(fxhook.FactoredMatrix(a, b).AB, transformer_lens.FactoredMatrix(a, b).AB)
