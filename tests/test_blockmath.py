"""Per-block kernels equal, bit for bit, the straightforward numpy formulation they replace."""

import numpy as np
import pytest
import scipy.sparse as sp

from onlinemf import _blockmath
from onlinemf._blockmath import block_statistics, prepare_block, scale_rows


def reference_statistics(X):
    """The bincount formulation of the statistics pass (as it was before the kernels)."""
    n, m = X.shape
    rows = np.repeat(np.arange(n), np.diff(X.indptr))
    lib = np.bincount(rows, weights=X.data.astype(np.float64), minlength=n).astype(np.float64)
    inv = np.zeros_like(lib)
    np.divide(1.0, lib, out=inv, where=lib > 0)
    values = X.data * np.repeat(inv, np.diff(X.indptr))
    gene_sum = np.bincount(X.indices, weights=values, minlength=m).astype(np.float64)
    gene_sumsq = np.bincount(X.indices, weights=values * values, minlength=m).astype(np.float64)
    gene_nnz = np.bincount(X.indices[X.data != 0], minlength=m)
    return lib, gene_sum, gene_sumsq, gene_nnz


def reference_prepare(raw, col_map, divisor, n_out):
    """The masked formulation of the preparation (as it was before the kernels)."""
    n = raw.shape[0]
    lib = np.bincount(np.repeat(np.arange(n), np.diff(raw.indptr)), weights=raw.data.astype(np.float64), minlength=n)
    inv = np.zeros(n)
    np.divide(1.0, lib, out=inv, where=lib > 0)
    inv_lib = np.repeat(inv, np.diff(raw.indptr))
    cols = col_map[raw.indices]
    keep = cols >= 0
    cols = cols[keep]
    values = ((raw.data[keep] * inv_lib[keep]) / divisor[cols]).astype(np.float32)
    nonzero = values != 0
    rows = np.repeat(np.arange(n), np.diff(raw.indptr))[keep][nonzero]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    out = sp.csr_matrix((values[nonzero], cols[nonzero], indptr), shape=(n, n_out))
    out.sort_indices()
    return out


def raw_block(seed, n=120, m=70, with_zeros=False):
    """A canonical CSR float32 block with empty rows and, optionally, stored zeros."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=0.3, format="csr", random_state=rng, data_rvs=lambda k: rng.gamma(0.7, 40, k))
    keep = np.ones(n)
    keep[10:14] = 0  # empty rows
    X = sp.csr_matrix(sp.diags(keep) @ X, dtype=np.float32)
    X.eliminate_zeros()
    X.sort_indices()
    if with_zeros:
        X.data[:5] = 0  # stored zeros count for nothing
    assert X.has_canonical_format
    return X


@pytest.fixture(params=["scipy kernel", "numpy fallback"])
def kernel(request, monkeypatch):
    if request.param == "numpy fallback":
        monkeypatch.setattr(_blockmath, "csr_scale_rows", None)
    return request.param


@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_statistics_equal_bincount_formulation(kernel, seed, with_zeros):
    X = raw_block(seed, with_zeros=with_zeros)
    for got, expected in zip(block_statistics(X), reference_statistics(X), strict=True):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_prepare_block_equals_masked_formulation(kernel, seed, order):
    X = raw_block(seed, with_zeros=True)
    rng = np.random.default_rng(seed)
    genes = np.sort(rng.choice(X.shape[1], 25, replace=False))
    if order == "shuffled":
        rng.shuffle(genes)
    scale = rng.uniform(0.5, 2, genes.size)
    scale[3] = 0  # a gene all zero in this dataset: its values become 0 and are dropped
    divisor = np.where(scale > 0, scale, np.inf)
    for map_dtype in (np.int64, np.int32):
        col_map = np.full(X.shape[1], -1, dtype=map_dtype)
        col_map[genes] = np.arange(genes.size)
        expected = reference_prepare(X, col_map.astype(np.int64), divisor, genes.size)
        lib = block_statistics(X)[0]
        for given in (None, lib):
            got = prepare_block(X, col_map, divisor, genes.size, given)
            assert got.has_canonical_format and got.dtype == np.float32
            np.testing.assert_array_equal(got.indptr, expected.indptr)
            np.testing.assert_array_equal(got.indices, expected.indices)
            np.testing.assert_array_equal(got.data, expected.data)


def test_scale_rows_kernel_matches_repeat():
    values = np.arange(1.0, 8.0)
    indptr = np.array([0, 3, 3, 7])
    factors = np.array([2.0, 5.0, 0.25])
    scale_rows(values, indptr, factors)
    np.testing.assert_array_equal(values, np.arange(1.0, 8.0) * np.repeat(factors, [3, 0, 4]))


def test_empty_blocks():
    X = sp.csr_matrix((4, 6), dtype=np.float32)
    lib, s, sq, nnz = block_statistics(X)
    assert lib.shape == (4,) and s.shape == sq.shape == nnz.shape == (6,)
    assert not lib.any() and not s.any() and not nnz.any()
    out = prepare_block(X, np.arange(6), np.ones(6), 6)
    assert out.shape == (4, 6) and out.nnz == 0


@pytest.mark.parametrize("n_pieces", [1, 2, 3, 7, 500])
def test_prepare_in_pieces_equals_one_piece(n_pieces):
    from concurrent.futures import ThreadPoolExecutor

    from onlinemf._blockmath import prepare_parts, row_pieces, stack_parts

    X = raw_block(4, with_zeros=True)
    col_map = np.full(X.shape[1], -1, dtype=np.int32)
    genes = np.arange(0, X.shape[1], 3)[::-1]  # decreasing: every row needs sorting
    col_map[genes] = np.arange(genes.size)
    divisor = np.linspace(0.5, 3, genes.size)
    whole = prepare_block(X, col_map, divisor, genes.size)
    pieces = row_pieces(X.indptr, n_pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == X.shape[0] and len(pieces) <= n_pieces
    with ThreadPoolExecutor(2) as pool:
        parts = prepare_parts(X, col_map, divisor, genes.size, None, n_pieces, pool.map)
    assert len(parts) == len(pieces)
    split = stack_parts(parts)
    assert split.has_canonical_format
    for key in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(split, key), getattr(whole, key))
