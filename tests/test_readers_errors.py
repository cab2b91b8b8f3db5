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


# ----------------------------------------------------------------------------- structure, checked at open
def _edit(path, name, make):
    """Replace dataset ``name`` of ``path`` by ``make(old values)``."""
    with h5py.File(path, "r+") as h5:
        values = h5[name][()]
        del h5[name]
        h5[name] = make(values)
    return path


def _set(index, value):
    def make(values):
        values = values.copy()
        values[index] = value
        return values

    return make


# The 6 x 4 test matrix has 23 stored values (its first entry, 0, is not stored).
@pytest.mark.parametrize(("name", "make", "message"), [
    ("X/indptr", lambda v: v[:-1], r"expected X/indptr of length 7 \(6 cells \+ 1\), found 6"),
    ("X/indptr", _set(0, 1), r"expected X/indptr to start at 0, found 1"),
    ("X/indptr", _set(3, 1), r"expected X/indptr non-decreasing, found \d+ then 1 at position 2"),
    ("X/indptr", _set(-1, 22), r"expected X/indptr to end at the 23 stored values, found 22"),
    ("X/indptr", lambda v: v.astype(np.float64), r"expected a 1-D integer array X/indptr, found dtype float64"),
    ("X/indices", lambda v: v[:-1], r"expected X/data and X/indices of the same length, found 23 and 22"),
    ("X/indices", lambda v: np.array([b"1"] * len(v)), r"expected a 1-D integer array X/indices, found dtype \|S1"),
    ("X/data", lambda v: v.reshape(1, -1), r"expected a 1-D numeric array X/data, found 2 dimension\(s\) \(1, 23\)"),
    ("obs/_index", lambda v: v[:1], r"\(X\): expected 6 cell names in obs \(one per row\), found 1"),
    ("var/_index", lambda v: v[:3], r"\(X\): expected 4 var names, found 3"),
])
def test_structure_refused_at_open(tmp_path, name, make, message):
    path = _edit(write_h5ad(tmp_path / "d.h5ad"), name, make)
    with pytest.raises(InputError, match=message) as e:
        H5adSource(path)
    one_line(e)


def test_missing_arrays_and_groups_named(tmp_path):
    for name, message in [("X/indptr", "expected a 1-D integer array X/indptr, found none"),
                          ("X/data", "expected a 1-D numeric array X/data, found none"),
                          ("obs", "expected a dataframe obs .*, found none"),
                          ("var", "expected a dataframe var .*, found none")]:
        path = write_h5ad(tmp_path / f"{name.replace('/', '_')}.h5ad")
        with h5py.File(path, "r+") as h5:
            del h5[name]
        with pytest.raises(InputError, match=message):
            H5adSource(path)


@pytest.mark.parametrize(("value", "message"), [
    ((7, 4), r"expected 7 cell names in obs \(one per row\), found 6"),
    ((6, 9), r"expected 9 var names, found 4"),
    ("bogus", r"expected the shape attribute of X to be two non-negative integers \(a 2-D shape\), found 'bogus'"),
])
def test_lying_shape_attribute(tmp_path, value, message):
    path = write_h5ad(tmp_path / "d.h5ad")
    with h5py.File(path, "r+") as h5:
        h5["X"].attrs["shape"] = value
    with pytest.raises(InputError, match=message):
        H5adSource(path)


def test_csc_marked_as_csr(tmp_path):
    path = write_h5ad(tmp_path / "d.h5ad")
    with h5py.File(path, "r+") as h5:
        h5["X"].attrs["encoding-type"] = "csc_matrix"
    with pytest.raises(InputError, match=r"expected X/indptr of length 5 \(4 genes \+ 1\), found 7"):
        H5adSource(path)


@pytest.mark.parametrize("bad", [4, -1])
def test_gene_index_out_of_range_refused_in_its_block(tmp_path, bad):
    path = _edit(write_h5ad(tmp_path / "d.h5ad"), "X/indices", _set(-1, bad))  # last stored value: cell 5
    with H5adSource(path) as source:  # the indices are read with the data, block by block
        assert source.read_block(0, 4).shape == (4, 4)
        with pytest.raises(InputError, match=rf"d.h5ad \(X\): expected gene indices within 0:4, found {bad} \(damaged file\?\)"):
            source.read_block(4, 6)


def test_cell_index_out_of_range_in_csc_refused_before_conversion(tmp_path):
    X = sp.csc_matrix(np.arange(1, 25, dtype=np.float32).reshape(6, 4))
    path = _edit(write_h5ad(tmp_path / "d.h5ad", X), "X/indices", _set(5, 6))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(InputError, match=r"d.h5ad \(X\): expected cell indices within 0:6, found 6"):
        H5adSource(path, tmp_dir=tmp_path / "tmp")
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary CSR copy is removed


@pytest.mark.parametrize(("make", "message"), [
    (_set(2, 2), r"expected the codes of obs/batch within -1:2 \(2 categories\), found 2"),
    (lambda v: v.astype(np.float64), r"expected the codes of obs/batch to be 1-D integers, found dtype float64"),
    (lambda v: v[:3], r"expected obs column 'batch' to hold 6 values \(one per name in obs\), found shape \(3,\)"),
])
def test_batch_column_checked(tmp_path, make, message):
    path = _edit(write_h5ad(tmp_path / "d.h5ad"), "obs/batch/codes", make)
    with pytest.raises(InputError, match=message) as e:
        open_sources(path, batch_key="batch")
    one_line(e)


def test_unreadable_obs_column_left_out_with_a_warning(tmp_path, caplog):
    from onlinemf.readers import batch_rows, read_obs

    X = sp.csr_matrix(np.arange(24, dtype=np.float32).reshape(6, 4))
    path = write_h5ad(tmp_path / "d.h5ad", X)
    with h5py.File(path, "r+") as h5:  # a second categorical column whose codes lie outside its categories
        h5.copy(h5["obs/batch"], h5["obs"], "label")
        h5["obs"].attrs["column-order"] = np.array(["batch", "label"], dtype=object)
        codes = h5["obs/label/codes"][()]
        codes[0] = 7
        del h5["obs/label/codes"]
        h5["obs/label/codes"] = codes
    with caplog.at_level("WARNING"):
        obs = read_obs(path)
    assert list(obs.columns) == ["batch"] and len(obs) == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "obs column 'label'" in warnings[0] and "left out of the results" in warnings[0]
    assert "\n" not in warnings[0]
    assert "label" not in describe(path)["obs_columns"]
    assert [name for name, _ in batch_rows(path, "batch")] == ["a", "b"]


def _write_v3(path, n_cells=3, n_genes=2):
    X = sp.csc_matrix(np.arange(1, n_genes * n_cells + 1, dtype=np.int32).reshape(n_genes, n_cells))
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        g["shape"] = np.array(X.shape)
        g["barcodes"] = np.array([f"C{i}".encode() for i in range(n_cells)])
        g["features/name"] = np.array([f"g{j}".encode() for j in range(n_genes)])
        g["features/id"] = np.array([f"E{j}".encode() for j in range(n_genes)])
    return path


@pytest.mark.parametrize(("name", "make", "message"), [
    ("matrix/barcodes", lambda v: v[:1], r"expected 3 barcodes \(the shape's second value\) in matrix/barcodes, found 1"),
    ("matrix/features/name", lambda v: v[:1], r"expected 1 features \(the shape's first value\) in matrix/shape, found 2|expected 1 values"),
    ("matrix/features/id", lambda v: v[:1], r"expected 2 values \(one per feature\) in matrix/features/id, found 1"),
    ("matrix/shape", lambda v: v * 2, r"expected 4 features \(the shape's first value\) in matrix/shape, found 2"),
    ("matrix/indptr", lambda v: v[:-1], r"expected matrix/indptr of length 4 \(3 cells \+ 1\), found 3"),
    ("matrix/data", lambda v: np.array([b"1"] * len(v)), r"\(/matrix\): expected numeric counts, found dtype \|S1"),
])
def test_tenx_structure_refused_at_open(tmp_path, name, make, message):
    path = _edit(_write_v3(tmp_path / "v3.h5"), name, make)
    with pytest.raises(InputError, match=message) as e:
        TenxH5Source(path)
    one_line(e)


@pytest.mark.parametrize("name", ["matrix/barcodes", "matrix/features", "matrix/features/name", "matrix/data", "matrix/indices", "matrix/shape"])
def test_tenx_missing_piece_named(tmp_path, name):
    path = _write_v3(tmp_path / "v3.h5")
    with h5py.File(path, "r+") as h5:
        del h5[name]
    with pytest.raises(InputError, match=rf"v3.h5: expected a (group|1-D [\w ]+ array) {name}, found none"):
        TenxH5Source(path)


def test_tenx_gene_index_out_of_range_refused_in_its_block(tmp_path):
    path = _edit(_write_v3(tmp_path / "v3.h5"), "matrix/indices", _set(-1, 2))
    with TenxH5Source(path) as source, pytest.raises(InputError, match=r"expected gene indices within 0:2, found 2"):
        source.read_block(0, 3)


def test_uint64_indices_past_2_to_the_32_are_refused_not_wrapped():
    """A uint64 index of 2**32 + i must not become the valid index i on its way to scipy's signed indices."""
    import scipy.sparse as sp

    from onlinemf._source import check_indices
    from onlinemf.readers._rows import CsrRows

    X = sp.random(5, 10, density=0.5, format="csr", random_state=0, dtype=np.float32)
    indices = X.indices.astype(np.uint64)
    indices[3] += np.uint64(2**32)
    block = CsrRows(X.data, indices, X.indptr, X.shape).read(0, 5)
    with pytest.raises(InputError, match=r"indices within 0:10"):
        check_indices(block.indices, 10, "x")
