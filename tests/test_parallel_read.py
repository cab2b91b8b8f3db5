"""Threaded chunk decoding and prefetching: every read equals plain h5py's, bit for bit, for any thread count."""

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from onlinemf.readers import H5adSource, TenxH5Source, _decode
from onlinemf.readers._decode import decode_pipeline, read_range, set_read_threads

FILTERS = {
    "none": {},
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "gzip+shuffle": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "shuffle-only": {"shuffle": True},
    "lzf": {"compression": "lzf"},
}
RANGES = [(0, 0), (0, 1), (3, 4), (0, 997), (5, 512), (100, 101), (250, 700), (996, 997), (990, 2000)]


@pytest.fixture
def rng():
    return np.random.default_rng(3)


@pytest.fixture
def small_tasks(monkeypatch):
    """Several decode tasks per read even on tiny arrays."""
    monkeypatch.setattr(_decode, "TASK_BYTES", 64)


def counts(rng, n=301, m=53, density=0.2):
    X = sp.random(n, m, density=density, format="csr", random_state=rng, data_rvs=lambda k: rng.integers(1, 200, k))
    return sp.csr_matrix(X, dtype=np.float32)


@pytest.mark.parametrize("filters", sorted(FILTERS))
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i4", "<u4", "<f8", "<i8", "<u2", "|u1"])
def test_read_range_equals_h5py(tmp_path, rng, small_tasks, filters, dtype):
    values = rng.integers(0, 250, 997).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("v", data=values, chunks=(64,), **FILTERS[filters])
    with h5py.File(tmp_path / "a.h5", "r") as f:
        ds = f["v"]
        assert (decode_pipeline(ds) is not None) == filters.startswith("gzip")
        for lo, hi in RANGES:
            expected = ds[lo:hi]
            for threads in (1, 2, 3):
                got = read_range(ds, lo, hi, threads=threads)
                assert got.dtype == expected.dtype
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("filters", ["gzip", "gzip+shuffle", "lzf", "none"])
def test_two_dimensional_chunks_equal_h5py(tmp_path, rng, small_tasks, filters):
    values = rng.integers(0, 9, (157, 41)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("m", data=values, chunks=(16, 10), **FILTERS[filters])
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for lo, hi in [(0, 157), (3, 4), (15, 33), (150, 157)]:
            for threads in (1, 2):
                np.testing.assert_array_equal(read_range(f["m"], lo, hi, threads=threads), values[lo:hi])


def test_chunks_stored_without_their_filter_are_read(tmp_path, rng):
    """A filter mask bit says a chunk skipped that filter (HDF5 allows it per chunk)."""
    values = rng.integers(0, 100, 256).astype(np.int32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("v", (256,), np.int32, chunks=(64,), compression="gzip", shuffle=True)
        ds[:128] = values[:128]
        raw = values[128:192].tobytes()  # stored as is: both filters skipped
        ds.id.write_direct_chunk((128,), raw, filter_mask=0b11)
        shuffled = np.frombuffer(values[192:].tobytes(), np.uint8).reshape(-1, 4).T.tobytes()
        ds.id.write_direct_chunk((192,), shuffled, filter_mask=0b10)  # shuffled, deflate skipped
    with h5py.File(tmp_path / "a.h5", "r") as f:
        np.testing.assert_array_equal(f["v"][:], values)
        for threads in (1, 2):
            np.testing.assert_array_equal(read_range(f["v"], 0, 256, threads=threads), values)


def test_unwritten_chunks_read_as_fill_values(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("v", (100,), np.float32, chunks=(10,), compression="gzip", fillvalue=7)
        ds[:10] = 1
    with h5py.File(tmp_path / "a.h5", "r") as f:
        np.testing.assert_array_equal(read_range(f["v"], 5, 95), f["v"][5:95])


def test_a_damaged_chunk_is_an_oserror(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("v", (100,), np.float32, chunks=(50,), compression="gzip")
        ds[:] = np.arange(100)
        ds.id.write_direct_chunk((50,), b"not a gzip stream", filter_mask=0)
    with h5py.File(tmp_path / "a.h5", "r") as f, pytest.raises(OSError, match="gzip"):
        read_range(f["v"], 0, 100)


def test_default_threads_follow_the_setting():
    with set_read_threads(1):
        assert _decode.read_threads() == 1
        with set_read_threads(None):
            assert _decode.read_threads() >= 1
        assert _decode.read_threads() == 1


def write_h5ad(path, X, encoding, filters, chunk=37):
    """A minimal AnnData file whose X uses ``filters`` (h5py options) and small chunks."""
    import anndata as ad
    import pandas as pd

    n, m = X.shape
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=[f"g{j}" for j in range(m)]))
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        opts = FILTERS[filters]
        if encoding == "dense":
            f.create_dataset("X", data=X.toarray(), chunks=(chunk, 11), **opts)
            return
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array(X.shape)})
        for key in ("data", "indices", "indptr"):
            group.create_dataset(key, data=getattr(X, key), chunks=(chunk,), **opts)


@pytest.mark.parametrize("encoding", ["csr", "dense"])
@pytest.mark.parametrize("filters", ["gzip", "gzip+shuffle", "lzf", "none"])
def test_h5ad_blocks_equal_plain_h5py_for_one_and_two_threads(tmp_path, rng, small_tasks, encoding, filters):
    X = counts(rng)
    path = tmp_path / f"{encoding}-{filters}.h5ad"
    write_h5ad(path, X, encoding, filters)
    with h5py.File(path, "r") as f:  # what h5py alone reads
        element = f["X"]
        if encoding == "dense":
            expected = sp.csr_matrix(element[:])
        else:
            expected = sp.csr_matrix((element["data"][:], element["indices"][:], element["indptr"][:]), shape=X.shape)
    blocks = {}
    for threads in (1, 2):
        with set_read_threads(threads), H5adSource(path) as src:
            blocks[threads] = [src.read_block(a, b) for a, b in [(0, 301), (7, 180), (299, 301)]]
    for (a, b), one, two in zip([(0, 301), (7, 180), (299, 301)], blocks[1], blocks[2], strict=True):
        for block in (one, two):
            assert block.dtype == np.float32
            np.testing.assert_array_equal(block.toarray(), expected[a:b].toarray())
        np.testing.assert_array_equal(one.indices, two.indices)
        np.testing.assert_array_equal(one.data, two.data)


def test_tenx_blocks_equal_plain_h5py(shared_data, small_tasks):
    path = shared_data / "tenx" / "kang_ctrl_300.h5"
    with h5py.File(path, "r") as f:
        g = f["matrix"]
        n_genes, n_cells = g["shape"][()]
        expected = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_genes, n_cells)).T.tocsr()
    for threads in (1, 2):
        with set_read_threads(threads), TenxH5Source(path) as src:
            if src._kept is not None:
                expected = expected[:, src._kept]
            for a, b in [(0, src.n_cells), (11, 200)]:
                np.testing.assert_array_equal(src.read_block(a, b).toarray(), expected[a:b].toarray().astype(np.float32))


# ----------------------------------------------------------------------------- prefetch
def test_prefetch_keeps_order_and_stays_bounded():
    from onlinemf._prefetch import prefetch

    made = []

    def produce():
        for i in range(50):
            made.append(i)
            yield i

    seen = []
    for item in prefetch(produce(), depth=2):
        assert len(made) - len(seen) <= 2 + 2  # queued, being made, being handed over
        seen.append(item)
    assert seen == list(range(50))


def test_prefetch_raises_where_the_producer_failed():
    from onlinemf._prefetch import prefetch

    def produce():
        yield 1
        yield 2
        raise OSError("damaged block")

    seen = []
    with pytest.raises(OSError, match="damaged block"):
        for item in prefetch(produce()):  # the items before the failure are the point
            seen.append(item)  # noqa: PERF402
    assert seen == [1, 2]


def test_prefetch_stops_the_producer_when_abandoned():
    import threading

    from onlinemf._prefetch import prefetch

    closed = threading.Event()

    def produce():
        try:
            yield from range(10**6)
        finally:
            closed.set()

    items = prefetch(produce())
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.is_set()
    assert not any(t.name == "onlinemf-prefetch" for t in threading.enumerate())


def test_prefetch_passes_the_thread_setting_on():
    from onlinemf._prefetch import prefetch

    def produce():
        yield _decode.read_threads()

    with set_read_threads(1):
        assert list(prefetch(produce())) == [1]
    with set_read_threads(3):
        assert list(prefetch(produce())) == [3]


@pytest.mark.parametrize("filters", ["gzip", "lzf"])
def test_prepared_passes_do_not_depend_on_the_thread_count(tmp_path, rng, filters, monkeypatch):
    """Statistics, selection and the disk cache: identical arrays with 1 and 2 threads."""
    from onlinemf import _prepared
    from onlinemf.preprocess import prepare

    monkeypatch.setattr(_prepared, "PIECE_VALUES", 100)  # blocks prepared in pieces on the pool

    X = counts(rng, n=400, m=60, density=0.3)
    path = tmp_path / "x.h5ad"
    write_h5ad(path, X, "csr", filters, chunk=101)
    results = []
    for threads in (1, 2):
        with set_read_threads(threads), H5adSource(path) as src:
            prepared = prepare([src], n_genes=20, block_size=64, cache="disk", tmpdir=tmp_path)
            with prepared:
                block = prepared.sources[0].read_block(0, src.n_cells)
                results.append((prepared.stats[0], prepared.genes, block))
    (st1, g1, b1), (st2, g2, b2) = results
    np.testing.assert_array_equal(g1, g2)
    for key in ("lib_size", "gene_sum", "gene_sumsq", "gene_nnz"):
        np.testing.assert_array_equal(getattr(st1, key), getattr(st2, key))
    for key in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(b1, key), getattr(b2, key))


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_compressed_sources_are_decoded_once(tmp_path, rng, cache, monkeypatch):
    """The statistics pass keeps a plain copy of compressed rows; the cache pass reads it, not the file,
    gives the same prepared rows as an uncached preparation, and the copy is deleted once the cache is built."""
    from onlinemf import _prepared
    from onlinemf._prepared import build_caches
    from onlinemf.preprocess import prepare
    from onlinemf.readers import open_sources

    X = counts(rng, n=400, m=60, density=0.3)
    path = tmp_path / "x.h5ad"
    write_h5ad(path, X, "csr", "gzip", chunk=101)
    with h5py.File(path, "a") as f:  # two interleaved batches: splits of one file
        import pandas as pd
        from anndata.io import write_elem

        del f["obs"]
        write_elem(f, "obs", pd.DataFrame({"batch": pd.Categorical(np.where(np.arange(400) % 3, "a", "b"))},
                                          index=[f"c{i}" for i in range(400)]))
    work = tmp_path / "work"
    work.mkdir()
    sources = open_sources([path], batch_key="batch")
    try:
        plain = prepare(sources, n_genes=20, block_size=64)
        decoded = []
        original = _prepared.PreparedSource._read_raw
        monkeypatch.setattr(_prepared.PreparedSource, "_read_raw",
                            lambda self, a, b: decoded.append(self._raw_copy is not None) or original(self, a, b))
        cached = prepare(sources, genes=plain.genes, block_size=64, cache=cache, tmpdir=work)
        assert len(list(work.iterdir())) == 2  # one raw copy per batch
        build_caches(cached.sources, block_size=50)
        assert decoded and all(decoded)  # every raw block came from the copies
        assert len(list(work.iterdir())) == (2 if cache == "disk" else 0)  # copies gone, caches left
        for a, b in zip(cached.sources, plain.sources, strict=True):
            x, y = a.read_block(0, a.n_cells), b.read_block(0, b.n_cells)
            for key in ("indptr", "indices", "data"):
                np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
        cached.close()
        assert list(work.iterdir()) == []
        abandoned = prepare(sources, genes=plain.genes, block_size=64, cache=cache, tmpdir=work)
        abandoned.close()  # closed before any cache pass: copies deleted too
        assert list(work.iterdir()) == []
    finally:
        for s in sources:
            s.close()
