"""AnnData .zarr stores (CSR or dense X, batches in obs) stream the same blocks, to the bit, as the .h5ad."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from onlinemf._errors import InputError
from onlinemf.engine import OnlineINMF
from onlinemf.preprocess import prepare
from onlinemf.readers import ZarrSource, open_sources, open_zarr_sources

pytest.importorskip("zarr")


def write_zarr(adata: ad.AnnData, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notice about the zarr format version it writes
        adata.write_zarr(path)


@pytest.fixture(scope="module", params=["csr", "dense"])
def stores(request, demo_data, tmp_path_factory):
    h5ad = demo_data / "pbmc_demo.h5ad"
    adata = ad.read_h5ad(h5ad)
    if request.param == "dense":
        adata.X = adata.X.toarray()
    path = tmp_path_factory.mktemp("zarr") / f"demo_{request.param}.zarr"
    write_zarr(adata, path)
    return h5ad, path


def test_zarr_blocks_names_and_fit_equal_h5ad(stores):
    h5ad, store = stores
    h5 = open_sources([h5ad], batch_key="batch")
    zr = open_zarr_sources(store, batch_key="batch")
    assert [s.name for s in zr] == [s.name for s in h5]
    for a, b in zip(h5, zr, strict=True):
        np.testing.assert_array_equal(a.var_names, b.var_names)
        np.testing.assert_array_equal(a.obs_names, b.obs_names)
        for start, stop in [(0, a.n_cells), (17, 900), (1499, 1500)]:
            x, y = a.read_block(start, stop), b.read_block(start, stop)
            for attr in ("indptr", "indices", "data"):
                np.testing.assert_array_equal(getattr(x, attr), getattr(y, attr))
            assert x.dtype == y.dtype == np.float32
    ph, pz = prepare(h5, n_genes=300), prepare(zr, n_genes=300)
    np.testing.assert_array_equal(ph.genes, pz.genes)
    params = {"n_components": 6, "batch_size": 400, "max_epochs": 1, "n_threads": 1}
    m1, m2 = OnlineINMF(**params).fit(ph.sources), OnlineINMF(**params).fit(pz.sources)
    np.testing.assert_array_equal(m1.W_, m2.W_)
    assert m1.objective_ == m2.objective_
    for s in h5:
        s.close()


def test_zarr_errors(tmp_path):
    with pytest.raises(InputError, match="no such zarr store"):
        ZarrSource(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="expected an AnnData .zarr store"):
        ZarrSource(tmp_path / "empty.zarr")
    X = sp.random(20, 10, density=0.3, format="csc", dtype=np.float32, random_state=0)
    write_zarr(ad.AnnData(X), tmp_path / "csc.zarr")
    with pytest.raises(InputError, match="expected a CSR or dense matrix, found 'csc_matrix'"):
        ZarrSource(tmp_path / "csc.zarr")
    adata = ad.AnnData(sp.random(20, 10, density=0.3, format="csr", dtype=np.float32, random_state=0))
    adata.obs["batch"] = ["a"] * 10 + ["b"] * 10
    write_zarr(adata, tmp_path / "ok.zarr")
    with pytest.raises(InputError, match="unknown batch key 'sample'; obs columns are: batch"):
        open_zarr_sources(tmp_path / "ok.zarr", batch_key="sample")
    assert [s.n_cells for s in open_zarr_sources(tmp_path / "ok.zarr", batch_key="batch")] == [10, 10]
    adata.X.data[0] = -1.0
    write_zarr(adata, tmp_path / "negative.zarr")
    with pytest.raises(InputError, match="non-negative"):
        ZarrSource(tmp_path / "negative.zarr").read_block(0, 20)


def test_cli_fit_on_a_store_equals_fit_on_the_h5ad(stores, tmp_path):
    import h5py
    from click.testing import CliRunner
    from onlinemf.cli import main

    from onlinemf import _keys

    h5ad, store = stores
    args = ["--k", "6", "--epochs", "1", "--batch-size", "400", "--seed", "3", "--n-genes", "300", "--no-umap",
            "--no-cluster", "--quiet"]  # batch key guessed from obs, as for the .h5ad
    for name, path in (("h", h5ad), ("z", store)):
        res = CliRunner().invoke(main, ["fit", str(path), *args, "-o", str(tmp_path / f"{name}.h5ad"), "--model",
                                        str(tmp_path / f"{name}.h5")])
        assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "h.h5", "r") as a, h5py.File(tmp_path / "z.h5", "r") as b:
        np.testing.assert_array_equal(a["W"][()], b["W"][()])
    x, y = ad.read_h5ad(tmp_path / "h.h5ad"), ad.read_h5ad(tmp_path / "z.h5ad")
    np.testing.assert_array_equal(x.obs_names, y.obs_names)
    np.testing.assert_array_equal(x.obs[_keys.OBS_DATASET], y.obs[_keys.OBS_DATASET])
    np.testing.assert_array_equal(x.obsm[_keys.OBSM_H], y.obsm[_keys.OBSM_H])


def test_damaged_stores_are_refused_in_one_line_and_a_damaged_unused_column_left_out(tmp_path, caplog):
    import shutil

    import zarr

    from onlinemf.readers import read_obs

    adata = ad.AnnData(sp.random(20, 10, density=0.3, format="csr", dtype=np.float32, random_state=0))
    adata.obs["batch"] = pd.Categorical(["a"] * 10 + ["b"] * 10)
    adata.obs["label"] = pd.Categorical(["x", "y"] * 10)
    write_zarr(adata, tmp_path / "ok.zarr")

    def damaged(name, edit):
        path = tmp_path / f"{name}.zarr"
        shutil.copytree(tmp_path / "ok.zarr", path)
        edit(zarr.open_group(str(path), mode="r+"))
        zarr.consolidate_metadata(str(path))
        return path

    def set_codes(column, value):
        def edit(root):
            codes = root[f"obs/{column}/codes"]
            codes[0] = value
        return edit

    for name, edit, match in [
        ("no_indptr", lambda root: root["X"].__delitem__("indptr"), "expected a 1-D integer array X/indptr, found none"),
        ("no_shape", lambda root: root["X"].attrs.__delitem__("shape"), r"expected X@shape to be two non-negative"),
        ("short_indices", lambda root: root["X"].create_array("indices", data=np.zeros(1, np.int32), overwrite=True),
         "expected X/data and X/indices of the same length"),
        ("bad_batch", set_codes("batch", 5), r"could not read obs/batch: codes need to be between"),
    ]:
        with pytest.raises(InputError, match=match) as info:
            open_zarr_sources(damaged(name, edit), batch_key="batch")
        assert "\n" not in str(info.value)
    path = damaged("bad_label", set_codes("label", 5))
    assert [s.n_cells for s in open_zarr_sources(path, batch_key="batch")] == [10, 10]
    with caplog.at_level("WARNING"):
        obs = read_obs(path)
    assert list(obs.columns) == ["batch"]
    np.testing.assert_array_equal(obs.index, adata.obs_names)
    assert "obs/label" in caplog.text and "left out" in caplog.text


def test_cli_info_describes_a_store_as_it_describes_the_h5ad(stores, tmp_path):
    from click.testing import CliRunner
    from onlinemf.cli import main

    h5ad, store = stores
    outputs = {}
    for name, path in (("h", h5ad), ("z", store)):
        res = CliRunner().invoke(main, ["info", str(path), "--batch-key", "batch"])
        assert res.exit_code == 0, res.output
        outputs[name] = res.output.splitlines()
    # The same cells, genes, obs columns and batches; the file, the format and X's encoding (dense store) may differ.
    same = [[line for line in outputs[k] if not line.startswith(("file", "format", "X "))] for k in ("h", "z")]
    assert same[0] == same[1]
    assert "format    zarr" in outputs["z"]
    assert ("X         dense" if "dense" in store.name else "X         csr") in outputs["z"]
    assert any(line.startswith("batches of 'batch'") for line in outputs["z"])
    folder = tmp_path / "not_a_store"
    folder.mkdir()
    res = CliRunner().invoke(main, ["info", str(folder)])
    assert res.exit_code == 1
    assert "expected an .h5ad, a 10x .h5, a model file or an AnnData .zarr store, found a folder" in res.output
