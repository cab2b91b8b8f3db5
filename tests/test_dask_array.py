"""An AnnData (or a matrix) whose X is a dask array is read block by block, never computed whole, and fits as the
same matrix in memory, to the bit (the blocks hold the same float32 values, read in the same ranges)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
ad = pytest.importorskip("anndata")
from dask.callbacks import Callback

from onlinemf import InputError, OnlineINMF
from onlinemf._daskarray import DaskArraySource, is_dask_array
from onlinemf.tl import integrate

N_CELLS, N_GENES, CHUNK = 600, 120, 50


class LargestResult(Callback):
    """Records the most rows any dask task returned, and how many tasks ran."""

    def __init__(self):
        super().__init__()
        self.rows, self.tasks = 0, 0

    def _posttask(self, key, result, dsk, state, id):
        self.tasks += 1
        shape = getattr(result, "shape", None)
        if shape is not None and len(shape) == 2:
            self.rows = max(self.rows, shape[0])


def _counts(dense: bool = False):
    X = sp.random(N_CELLS, N_GENES, density=0.15, format="csr", random_state=3, dtype=np.float32)
    X.data = np.round(X.data * 20) + 1
    return X.toarray() if dense else X


def _adata(X):
    obs = pd.DataFrame({"batch": pd.Categorical(np.where(np.arange(N_CELLS) % 3 == 0, "a", "b"))},
                       index=[f"c{i}" for i in range(N_CELLS)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


@pytest.mark.parametrize("dense", [False, True])
def test_integrate_dask_x_equals_in_memory_and_never_computes_all(dense):
    X = _counts(dense)
    lazy = da.from_array(X, chunks=(CHUNK, -1), asarray=False)
    kwargs = {"batch_key": "batch", "k": 4, "epochs": 2, "batch_size": 100, "n_genes": 60, "cluster": False, "copy": True}
    expected = integrate(_adata(X), **kwargs)
    with LargestResult() as seen:
        got = integrate(_adata(lazy), **kwargs)
    assert seen.tasks > 0
    # The largest batch (400 cells) was read whole at most; the 600-cell array never was.
    assert 0 < seen.rows <= 400 < N_CELLS
    for slot in ("X_inmf", "X_inmf_norm"):
        np.testing.assert_array_equal(got.obsm[slot], expected.obsm[slot])
    np.testing.assert_array_equal(got.varm["W_inmf"], expected.varm["W_inmf"])
    assert got.uns["inmf"]["objective"] == expected.uns["inmf"]["objective"]


def test_fit_on_dask_array_reads_minibatches_only():
    X = _counts()
    lazy = da.from_array(X, chunks=(CHUNK, -1), asarray=False)
    params = {"n_components": 4, "batch_size": 100, "max_epochs": 2, "random_state": 0}
    expected = OnlineINMF(**params).fit({"a": X[:300], "b": X[300:]})
    with LargestResult() as seen:
        got = OnlineINMF(**params).fit({"a": lazy[:300], "b": lazy[300:]})
    assert 0 < seen.rows <= 100  # one mini-batch range at most
    np.testing.assert_array_equal(got.W_, expected.W_)
    for name in ("a", "b"):
        np.testing.assert_array_equal(got.V_[name], expected.V_[name])


def test_single_dask_array_is_one_dataset():
    lazy = da.from_array(_counts(), chunks=(CHUNK, -1), asarray=False)
    from onlinemf._training import as_sources

    (source,) = as_sources(lazy)
    assert isinstance(source, DaskArraySource) and source.n_cells == N_CELLS
    assert is_dask_array(lazy) and not is_dask_array(_counts())


def test_blocks_are_canonical_csr_float32_and_checked():
    X = _counts().astype(np.int64)
    source = DaskArraySource(da.from_array(X, chunks=(CHUNK, -1), asarray=False), name="lazy")
    block = source.read_block(40, 130)  # spans three chunks
    assert block.dtype == np.float32 and block.has_canonical_format and block.shape == (90, N_GENES)
    np.testing.assert_array_equal(block.toarray(), X[40:130].toarray())
    bad = _counts(dense=True)
    bad[200, 5] = -1
    source = DaskArraySource(da.from_array(bad, chunks=(CHUNK, -1)), name="lazy")
    source.read_block(0, 150)  # the bad row is not read
    with pytest.raises(InputError, match="lazy: expected non-negative counts"):
        source.read_block(150, 250)
    with pytest.raises(InputError, match="expected numeric values"):
        DaskArraySource(da.from_array(np.array([["a"]]), chunks=1), name="lazy")
    with pytest.raises(InputError, match="2-D"):
        DaskArraySource(da.ones(5), name="lazy")


def test_integrate_counts_read_lazily_from_a_zarr_store(tmp_path):
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    zarr = pytest.importorskip("zarr")
    _adata(_counts()).write_zarr(tmp_path / "in.zarr")
    group = zarr.open(tmp_path / "in.zarr", mode="r")
    lazy = ad.AnnData(X=read_elem_lazy(group["X"], chunks=(CHUNK, -1)), obs=read_elem(group["obs"]),
                      var=read_elem(group["var"]))
    assert is_dask_array(lazy.X)
    kwargs = {"batch_key": "batch", "k": 3, "epochs": 1, "batch_size": 100, "n_genes": 60, "cluster": False, "copy": True}
    expected = integrate(ad.read_zarr(tmp_path / "in.zarr"), **kwargs)
    got = integrate(lazy, **kwargs)
    np.testing.assert_array_equal(got.obsm["X_inmf"], expected.obsm["X_inmf"])
    np.testing.assert_array_equal(got.varm["W_inmf"], expected.varm["W_inmf"])
