"""Property-based tests of readers and preprocessing on random sparse counts with empty cells and genes.

- an .h5ad written as CSR, CSC or dense streams the same blocks as the matrix in memory, for any block size,
  also when split by a batch column;
- ``compute_stats`` and ``prepare`` equal a dense in-memory computation of rliger's normalisation and scaling;
- prepared blocks do not depend on the block size.
"""

import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onlinemf.preprocess import compute_stats, prepare
from onlinemf.readers import H5adSource, MemorySource, open_sources

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def counts(draw, max_cells=40, max_genes=25):
    """A float32 count matrix (cells x genes) with some all-zero cells and genes, and a block size."""
    n = draw(st.integers(1, max_cells))
    m = draw(st.integers(1, max_genes))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(n, m)).astype(np.float32) * (rng.random((n, m)) < density)
    if draw(st.booleans()):  # non-integer values (e.g. corrected counts) too
        X *= rng.random((n, m)).astype(np.float32) * 2
    X[rng.random(n) < 0.2] = 0  # empty cells
    X[:, rng.random(m) < 0.2] = 0  # empty genes
    block = draw(st.integers(1, n + 3))
    return X, block


def write(folder: Path, X: np.ndarray, encoding: str, batches=None) -> Path:
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[encoding](X)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    if batches is not None:
        obs["batch"] = pd.Categorical(batches)
    var = pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])
    path = folder / f"x_{encoding}.h5ad"
    ad.AnnData(X=matrix, obs=obs, var=var).write_h5ad(path)
    return path


def blocks(source, block_size: int) -> sp.csr_matrix:
    parts = []
    for start, stop, block in source.iter_blocks(block_size):
        assert block.shape == (stop - start, source.n_genes)
        assert block.dtype == np.float32 and block.has_canonical_format
        parts.append(block)
    return sp.vstack(parts, format="csr")


def dense_reference(X: np.ndarray, genes: np.ndarray):
    """rliger's normalisation and scaling in dense float64: what ``prepare`` must produce."""
    X = X.astype(np.float64)
    lib = X.sum(axis=1)
    used = lib > 0
    Xn = np.divide(X, lib[:, None], out=np.zeros_like(X), where=used[:, None])
    n_used = int(used.sum())
    scale = np.sqrt((Xn**2).sum(axis=0) / max(n_used - 1, 1))
    out = np.divide(Xn, scale, out=np.zeros_like(Xn), where=scale > 0)
    return {"lib": lib, "used": used, "Xn": Xn, "prepared": out[:, genes], "scale": scale[genes]}


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
@SETTINGS
@given(data=counts())
def test_h5ad_blocks_equal_memory(encoding, data):
    X, block = data
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write(folder, X, encoding)
        (folder / "conv").mkdir()
        with H5adSource(path, tmp_dir=folder / "conv") as source:
            assert (source.n_cells, source.n_genes) == X.shape
            np.testing.assert_array_equal(blocks(source, block).toarray(), X)
            np.testing.assert_array_equal(blocks(source, block).toarray(), blocks(MemorySource(X), block).toarray())
        assert list((folder / "conv").iterdir()) == []  # the CSC conversion is removed on close


@SETTINGS
@given(data=counts(), encoding=st.sampled_from(["csr", "csc", "dense"]), seed=st.integers(0, 1000))
def test_batch_split_equals_memory_rows(data, encoding, seed):
    X, block = data
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    assume(n >= 2)  # a split needs two categories with cells
    batches = rng.choice(["a", "b", "c"], size=n)
    batches[:2] = ["a", "b"]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), X, encoding, batches=batches)
        sources = open_sources(path, batch_key="batch", tmp_dir=tmp)
        try:
            for source in sources:
                rows = np.flatnonzero(batches == source.name)
                np.testing.assert_array_equal(blocks(source, block).toarray(), X[rows])
                np.testing.assert_array_equal(source.obs_names, [f"c{i}" for i in rows])
        finally:
            for source in sources:
                source.close()


@SETTINGS
@given(data=counts())
def test_stats_equal_dense_computation(data):
    X, block = data
    ref = dense_reference(X, np.arange(X.shape[1]))
    stats = compute_stats(MemorySource(X), block_size=block)
    np.testing.assert_allclose(stats.lib_size, ref["lib"], rtol=1e-12)
    assert stats.n_empty_cells == int((~ref["used"]).sum())
    np.testing.assert_allclose(stats.gene_sum, ref["Xn"].sum(axis=0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats.gene_sumsq, (ref["Xn"] ** 2).sum(axis=0), rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(stats.gene_nnz, (X != 0).sum(axis=0))
    used = ref["Xn"][ref["used"]]
    if len(used):
        np.testing.assert_allclose(stats.gene_mean, used.mean(axis=0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(stats.nu, np.mean(1 / ref["lib"][ref["used"]]), rtol=1e-12)
    if len(used) >= 2:
        np.testing.assert_allclose(stats.gene_var, used.var(axis=0, ddof=1), rtol=1e-8, atol=1e-14)


@SETTINGS
@given(data=counts(), seed=st.integers(0, 1000), other_block=st.integers(1, 50))
def test_prepare_equals_dense_and_ignores_block_size(data, seed, other_block):
    X, block = data
    rng = np.random.default_rng(seed)
    m = X.shape[1]
    genes = np.sort(rng.choice(m, size=rng.integers(1, m + 1), replace=False))
    names = np.array([f"g{j}" for j in range(m)])
    ref = dense_reference(X, genes)
    results = []
    for block_size in (block, other_block):
        with prepare([MemorySource(X, var_names=names)], genes=names[genes], block_size=block_size) as prepared:
            np.testing.assert_allclose(prepared.scales["dataset"], ref["scale"], rtol=1e-12)
            results.append(blocks(prepared.sources[0], block_size))
    np.testing.assert_allclose(results[0].toarray(), ref["prepared"], rtol=2e-6, atol=1e-30)
    # Each prepared row depends only on its raw row: the block size changes nothing, bit for bit.
    np.testing.assert_array_equal(results[0].toarray(), results[1].toarray())
    assert np.isfinite(results[0].data).all() and (results[0].data > 0).all()


@SETTINGS
@given(data=counts(max_cells=30), encoding=st.sampled_from(["csr", "csc", "dense"]))
def test_prepare_from_h5ad_equals_prepare_from_memory(data, encoding):
    X, block = data
    names = np.array([f"g{j}" for j in range(X.shape[1])])
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), X, encoding)
        with H5adSource(path, tmp_dir=tmp, name="dataset") as disk:
            with prepare([disk], genes=names, block_size=block) as from_disk:
                on_disk = blocks(from_disk.sources[0], block)
        with prepare([MemorySource(X, var_names=names)], genes=names, block_size=block) as in_memory:
            np.testing.assert_array_equal(on_disk.toarray(), blocks(in_memory.sources[0], block).toarray())
