"""Readers: every bad input raises one clear InputError line, and nothing is left behind."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from onlinemf._errors import InputError
from onlinemf.readers import (
    H5adSource,
    MemorySource,
    TenxH5Source,
    as_source,
    describe,
    open_source,
    open_sources,
    shared_genes,
)


def write_h5ad(path, X=None, *, var_names=None, batches=None, **kwargs):
    X = sp.csr_matrix(np.arange(24, dtype=np.float32).reshape(6, 4)) if X is None else X
    n, m = X.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    obs["batch"] = pd.Categorical(batches if batches is not None else ["a", "b"] * (n // 2))
    var = pd.DataFrame(index=var_names if var_names is not None else [f"g{j}" for j in range(m)])
    ad.AnnData(X=X, obs=obs, var=var, **kwargs).write_h5ad(path)
    return path


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothere.h5ad: file not found") as e:
        open_source(tmp_path / "nothere.h5ad")
    one_line(e)


def test_not_hdf5(tmp_path):
    path = tmp_path / "counts.h5ad"
    path.write_text("gene,cell\n")
    with pytest.raises(InputError, match="counts.h5ad: expected an HDF5 file .* without an HDF5 signature"):
        open_source(path)


def test_directory(tmp_path):
    with pytest.raises(InputError, match="found a directory"):
        open_source(tmp_path)


def test_truncated_hdf5(tmp_path):
    path = write_h5ad(tmp_path / "full.h5ad")
    data = path.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.h5ad: the HDF5 file is truncated") as e:
        open_source(cut)
    one_line(e)


def test_hdf5_neither_h5ad_nor_tenx(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["foo"] = np.arange(3)
    with pytest.raises(InputError, match="expected an AnnData .h5ad or a 10x Genomics .h5, found .* keys: foo"):
        open_source(path)


def test_h5ad_without_x(tmp_path):
    path = tmp_path / "nox.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g"])).write_h5ad(path)
    with pytest.raises(InputError, match="nox.h5ad: expected a matrix X, found none"):
        H5adSource(path)


def test_unknown_layer_lists_layers(tmp_path):
    X = sp.csr_matrix(np.ones((4, 3), dtype=np.float32))
    path = write_h5ad(tmp_path / "d.h5ad", X, layers={"counts": X, "spliced": X})
    with pytest.raises(InputError, match="unknown layer 'count'; layers are: counts, spliced"):
        open_source(path, layer="count")


def test_no_raw(tmp_path):
    with pytest.raises(InputError, match="expected a raw/X matrix"):
        H5adSource(write_h5ad(tmp_path / "d.h5ad"), use_raw=True)


def test_unknown_batch_key_lists_columns(tmp_path):
    with pytest.raises(InputError, match="unknown batch key 'sample'; obs columns are: batch"):
        open_sources(write_h5ad(tmp_path / "d.h5ad"), batch_key="sample")


def test_batch_key_with_one_category(tmp_path):
    path = write_h5ad(tmp_path / "d.h5ad", batches=["a"] * 6)
    with pytest.raises(InputError, match="'batch' to have at least 2 categories with cells, found one \\(a\\)"):
        open_sources(path, batch_key="batch")


def test_batch_key_on_tenx(shared_data):
    with pytest.raises(InputError, match="batch_key= needs an .h5ad"):
        open_sources(shared_data / "tenx" / "kang_ctrl_300.h5", batch_key="batch")


def test_non_numeric_x(tmp_path):
    path = write_h5ad(tmp_path / "d.h5ad")
    with h5py.File(path, "r+") as h5:
        n = h5["X/data"].shape[0]
        del h5["X/data"]
        h5["X/data"] = np.array([b"x"] * n)
    with pytest.raises(InputError, match=r"d.h5ad \(X\): expected numeric counts, found dtype \|S1"):
        H5adSource(path)


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
@pytest.mark.parametrize(("bad", "message"), [(-1.0, "non-negative counts, found a minimum of -1"), (np.nan, "finite counts"), (np.inf, "finite counts")])
def test_bad_values_found_in_block(tmp_path, encoding, bad, message):
    dense = np.ones((6, 4), dtype=np.float32)
    dense[4, 2] = bad
    X = {"csr": sp.csr_matrix(dense), "csc": sp.csc_matrix(dense), "dense": dense}[encoding]
    path = write_h5ad(tmp_path / "bad.h5ad", X)
    (tmp_path / "tmp").mkdir()
    with H5adSource(path, tmp_dir=tmp_path / "tmp") as source:
        assert source.read_block(0, 4).shape == (4, 4)  # the bad value is further down
        with pytest.raises(InputError, match=rf"bad.h5ad \(X\): expected {message}"):
            source.read_block(2, 6)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_dataset(tmp_path, shape):
    path = tmp_path / "empty.h5ad"
    ad.AnnData(X=sp.csr_matrix(shape, dtype=np.float32)).write_h5ad(path)
    with pytest.raises(InputError, match=rf"expected a non-empty matrix, found shape {shape[0]} cells x {shape[1]} genes"):
        open_source(path)


def test_duplicate_gene_names_h5ad(tmp_path):
    with pytest.warns(UserWarning):
        path = write_h5ad(tmp_path / "d.h5ad", var_names=["A", "B", "A", "B"])
    with pytest.raises(InputError, match="expected unique gene names, found duplicates such as A, B"):
        open_source(path)


def test_h5ad_to_tenx_reader_and_back(tmp_path, shared_data):
    with pytest.raises(InputError, match="expected a 10x Genomics .h5, found an AnnData .h5ad"):
        TenxH5Source(write_h5ad(tmp_path / "d.h5ad"))
    with pytest.raises(InputError, match="expected an AnnData .h5ad, found a 10x Genomics .h5"):
        H5adSource(shared_data / "tenx" / "kang_ctrl_300.h5")
    with pytest.raises(InputError, match="layer= and use_raw= apply to .h5ad files"):
        open_source(shared_data / "tenx" / "kang_ctrl_300.h5", layer="counts")


def _write_v2(path, genomes):
    with h5py.File(path, "w") as h5:
        for genome in genomes:
            g = h5.create_group(genome)
            g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 1]), np.array([0, 1, 2])
            g["shape"] = np.array([2, 2])
            g["barcodes"] = np.array([b"A", b"B"])
            g["gene_names"] = np.array([b"x", b"y"])


def test_several_genomes_v2(tmp_path):
    path = tmp_path / "two.h5"
    _write_v2(path, ["hg19", "mm10"])
    with pytest.raises(InputError, match=r"found several genomes \(hg19, mm10\); pick one with genome="):
        open_source(path)
    with pytest.raises(InputError, match="unknown genome 'GRCh38'; genomes are: hg19, mm10"):
        open_source(path, genome="GRCh38")
    assert open_source(path, genome="hg19").genome == "hg19"


def test_several_genomes_v3(tmp_path):
    path = tmp_path / "v3.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = np.ones(2), np.array([0, 1]), np.array([0, 1, 2])
        g["shape"] = np.array([2, 2])
        g["barcodes"] = np.array([b"A", b"B"])
        g["features/name"] = np.array([b"x", b"y"])
        g["features/genome"] = np.array([b"hg19", b"mm10"])
    with pytest.raises(InputError, match=r"found several genomes \(hg19, mm10\)"):
        TenxH5Source(path)
    with TenxH5Source(path, genome="mm10") as source:
        assert list(source.var_names) == ["y"]
        np.testing.assert_array_equal(source.read_block(0, 2).toarray(), [[0], [1]])
    assert describe(path)["genomes"] == ["hg19", "mm10"]


def test_rows_out_of_range(tmp_path):
    path = write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(InputError, match="rows= strictly increasing within 0:6"):
        H5adSource(path, rows=np.array([2, 9]))
    with pytest.raises(InputError, match="rows= strictly increasing"):
        H5adSource(path, rows=np.array([3, 1]))


def test_block_outside_source(tmp_path):
    with H5adSource(write_h5ad(tmp_path / "d.h5ad")) as source, pytest.raises(IndexError, match="block 2:9 is outside 0:6"):
        source.read_block(2, 9)


def test_no_shared_genes_names_datasets():
    a = MemorySource(np.ones((2, 3)), name="a", var_names=["x", "y", "z"])
    b = MemorySource(np.ones((2, 2)), name="b", var_names=["u", "v"])
    with pytest.raises(InputError, match=r"no genes shared by the 2 datasets \(a: 3 genes, b: 2 genes\)"):
        shared_genes([a, b])


def test_as_source_bad_objects():
    with pytest.raises(InputError, match="m: expected an AnnData, scipy sparse matrix or numpy array, found list"):
        as_source([[1, 2]], name="m")
    with pytest.raises(InputError, match="m: expected an AnnData with X, found X = None"):
        as_source(ad.AnnData(obs=pd.DataFrame(index=["a"]), var=pd.DataFrame(index=["g"])), name="m")
    with pytest.raises(InputError, match="m: expected non-negative counts"):
        as_source(-np.ones((2, 2)), name="m")
    with pytest.raises(InputError, match="m: expected a non-empty matrix"):
        as_source(sp.csr_matrix((0, 3)), name="m")
    with pytest.raises(InputError, match="unknown layer 'x'; layers are: none"):
        as_source(ad.AnnData(np.ones((2, 2))), name="m", layer="x")


def test_open_sources_closes_on_error(tmp_path):
    good = write_h5ad(tmp_path / "good.h5ad")
    with pytest.raises(InputError, match="missing.h5ad: file not found"):
        open_sources([good, tmp_path / "missing.h5ad"])
    with h5py.File(good, "r+") as h5:  # opening for writing fails if a source was left open
        assert "X" in h5
