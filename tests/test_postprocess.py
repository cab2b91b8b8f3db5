import bisect
import sys
from collections import Counter

import numpy as np
import pytest

from onlinemf import InputError, metrics, plotting
from onlinemf._validation import MissingExtraError
from onlinemf.postprocess import (
    cluster_leiden,
    cosine_knn,
    knn_vote,
    max_factor_labels,
    quantile_norm,
    run_umap,
    snn_graph,
)

# --- a slow, straightforward per-cell reimplementation of rliger's quantileNorm -----------------------

def _slow_quantile(values, q):
    x = sorted(values)
    out = []
    for i in range(q + 1):
        h = (len(x) - 1) * min(i * (1.0 / q), 1.0)
        lo = int(np.floor(h))
        hi = min(lo + 1, len(x) - 1)
        out.append(x[lo] + (h - lo) * (x[hi] - x[lo]))
    return out


def _slow_approxfun(x, y, v):
    pts = {}
    for xi, yi in zip(x, y):
        pts.setdefault(xi, []).append(yi)
    xs = sorted(pts)
    ys = [sum(pts[a]) / len(pts[a]) for a in xs]
    if v <= xs[0]:
        return ys[0]
    if v >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, v) - 1
    return ys[i] + (v - xs[i]) * (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])


def slow_quantile_norm(H, datasets, *, quantiles, min_cells, n_neighbors, max_sample, refine_knn, seed):
    names = list(dict.fromkeys(datasets.tolist()))
    n, K = H.shape
    sizes = [int((datasets == d).sum()) for d in names]
    ref = names[int(np.argmax(sizes))]
    labels = np.zeros(n, dtype=int)
    for d in names:
        cells = [i for i in range(n) if datasets[i] == d]
        rms = [np.sqrt(sum(H[i, j] ** 2 for i in cells) / (len(cells) - 1)) for j in range(K)]
        for i in cells:
            best, best_val = -1, 0.0
            for j in range(K):
                val = H[i, j] / rms[j] if rms[j] > 0 else 0.0
                if val > best_val:
                    best, best_val = j, val
            labels[i] = best
        if refine_knn:
            new = {}
            for i in cells:
                dist = sorted(cells, key=lambda c: float(np.sum((H[c] - H[i]) ** 2)))
                votes = Counter(labels[c] for c in dist[:n_neighbors])
                top = max(votes.values())
                new[i] = min(lab for lab, cnt in votes.items() if cnt == top)
            for i, lab in new.items():
                labels[i] = lab
    rng = np.random.default_rng(seed)
    out = H.copy()
    for d in names:
        for c in range(K):
            cells = [i for i in range(n) if datasets[i] == d and labels[i] == c]
            ref_cells = [i for i in range(n) if datasets[i] == ref and labels[i] == c]
            if len(cells) < min_cells or len(ref_cells) < min_cells or not cells:
                continue
            for j in range(K):
                vals = H[cells, j]
                rvals = H[ref_cells, j]
                s2 = vals if len(vals) <= max_sample else vals[rng.choice(len(vals), max_sample, replace=False)]
                s1 = rvals if len(rvals) <= max_sample else rvals[rng.choice(len(rvals), max_sample, replace=False)]
                q2, q1 = _slow_quantile(s2, quantiles), _slow_quantile(s1, quantiles)
                if sum(q1) == 0 or sum(q2) == 0 or len(set(q1)) < 2 or len(set(q2)) < 2:
                    for i in cells:
                        out[i, j] = 0.0
                else:
                    for i in cells:
                        out[i, j] = _slow_approxfun(q2, q1, H[i, j])
    return out, labels


def clustered_factors(rng, n, K=4, scale=None, power=None, zero_rows=1):
    """Cells with one dominant factor each; optional factor-wise monotone distortion a_j * x**p_j."""
    lab = rng.integers(0, K, n)
    H = rng.gamma(2.0, 0.15, size=(n, K))
    H[np.arange(n), lab] += rng.gamma(6.0, 0.5, size=n)
    H[rng.random((n, K)) < 0.15] = 0.0
    H[:zero_rows] = 0.0
    if scale is not None:
        H = scale * H ** power
    return H, lab


@pytest.mark.parametrize("refine", [False, True])
def test_matches_slow_reimplementation(refine):
    rng = np.random.default_rng(3)
    H = np.vstack([clustered_factors(rng, n)[0] for n in (90, 130, 70)])
    ds = np.repeat(np.array(["a", "b", "c"]), [90, 130, 70])
    kw = dict(quantiles=10, min_cells=8, n_neighbors=7, max_sample=25)
    fast, fast_lab = quantile_norm(H, ds, refine_knn=refine, eps=0.0, random_state=5, **kw)
    slow, slow_lab = slow_quantile_norm(H, ds, refine_knn=refine, seed=5, **kw)
    np.testing.assert_array_equal(fast_lab, slow_lab)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-14)
    assert not np.allclose(fast, H)  # the mapping did something


def test_distorted_dataset_is_mapped_onto_reference():
    rng = np.random.default_rng(0)
    K = 4
    H1, _ = clustered_factors(rng, 1500, K)
    scale = np.array([0.3, 2.0, 5.0, 1.0])
    power = np.array([1.5, 0.7, 1.0, 2.0])
    H2, _ = clustered_factors(rng, 1000, K, scale=scale, power=power)
    H = np.vstack([H1, H2])
    ds = np.array(["ref"] * 1500 + ["other"] * 1000)
    H_norm, clusters = quantile_norm(H, ds)
    probs = np.linspace(0.05, 0.95, 10)
    gains = []
    for c in range(K):
        a = (ds == "ref") & (clusters == c)
        b = (ds == "other") & (clusters == c)
        assert a.sum() >= 20 and b.sum() >= 20
        for j in range(K):
            spread = np.quantile(H_norm[a, j], 0.95) + 1e-12
            before = np.abs(np.quantile(H[a, j], probs) - np.quantile(H[b, j], probs)).max() / spread
            after = np.abs(np.quantile(H_norm[a, j], probs) - np.quantile(H_norm[b, j], probs)).max() / spread
            assert after < 0.15, (c, j, after)
            if scale[j] != 1.0 or power[j] != 1.0:
                gains.append(before / after)
    assert len(gains) == K * K
    assert min(gains) > 2 and np.median(gains) > 10  # the distortion was large before normalising


def test_reference_keeps_order_and_default_reference_is_largest():
    rng = np.random.default_rng(1)
    H = np.vstack([clustered_factors(rng, 300)[0], clustered_factors(rng, 700, scale=2.0, power=1.3)[0]])
    ds = np.repeat(["small", "big"], [300, 700])
    H_norm, clusters = quantile_norm(H, ds, max_sample=200)
    ref = ds == "big"
    for c in np.unique(clusters[ref]):
        for j in range(H.shape[1]):
            cells = np.flatnonzero(ref & (clusters == c))
            order = np.argsort(H[cells, j], kind="stable")
            assert np.all(np.diff(H_norm[cells[order], j]) >= -1e-12)
    # 'big' is the reference: its distribution is kept, so its values barely move
    assert np.abs(H_norm[ref] - H[ref]).mean() < 0.1 * np.abs(H[ref]).mean()
    explicit, _ = quantile_norm(H, ds, max_sample=200, reference="big")
    np.testing.assert_array_equal(explicit, H_norm)
    other, _ = quantile_norm(H, ds, max_sample=200, reference="small")
    assert not np.allclose(other, H_norm)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    H = np.vstack([clustered_factors(rng, 400)[0], clustered_factors(rng, 500, scale=3.0, power=1.0)[0]])
    ds = np.repeat([0, 1], [400, 500])
    first = quantile_norm(H, ds, max_sample=50, random_state=7)
    again = quantile_norm(H, ds, max_sample=50, random_state=7)
    other = quantile_norm(H, ds, max_sample=50, random_state=8)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_float32_input_stays_float32_and_equals_float64_result_rounded():
    rng = np.random.default_rng(9)
    H = np.vstack([clustered_factors(rng, 400)[0], clustered_factors(rng, 500, scale=3.0, power=1.5)[0]])
    H32 = H.astype(np.float32)
    ds = np.repeat(["a", "b"], [400, 500])
    norm32, lab32 = quantile_norm(H32, ds, max_sample=50, eps=0.0)
    norm64, lab64 = quantile_norm(H32.astype(np.float64), ds, max_sample=50, eps=0.0)
    assert norm32.dtype == np.float32 and norm64.dtype == np.float64
    np.testing.assert_array_equal(lab32, lab64)
    np.testing.assert_array_equal(norm32, norm64.astype(np.float32))


def test_max_factor_labels_over_several_row_chunks():
    rng = np.random.default_rng(10)
    H = rng.gamma(1.0, 1.0, size=(140_000, 3)) * np.array([1.0, 5.0, 0.2])
    H[:5] = 0.0
    rms = np.sqrt((H * H).sum(axis=0) / (len(H) - 1))
    expected = (H / rms).argmax(axis=1)
    expected[:5] = -1
    np.testing.assert_array_equal(max_factor_labels(H), expected)
    np.testing.assert_array_equal(max_factor_labels(H.astype(np.float32)), max_factor_labels(H.astype(np.float32).astype(np.float64)))


def test_small_clusters_keep_raw_values():
    rng = np.random.default_rng(4)
    H1, _ = clustered_factors(rng, 400)
    H2, lab2 = clustered_factors(rng, 300, scale=2.0, power=1.0)
    H2[lab2 != 3, 3] = 0.0  # factor 3 only in cluster 3 cells, which are nearly absent in dataset 2
    H2 = H2[(lab2 != 3) | (np.cumsum(lab2 == 3) <= 8)]
    H = np.vstack([H1, H2])
    ds = np.repeat(["a", "b"], [len(H1), len(H2)])
    H_norm, clusters = quantile_norm(H, ds, refine_knn=False)
    small = (ds == "b") & (clusters == 3)
    assert 0 < small.sum() < 20
    np.testing.assert_array_equal(H_norm[small], H[small])
    big = (ds == "b") & (clusters == 0)
    assert not np.allclose(H_norm[big], H[big])


def test_zero_factors_and_minus_one_labels():
    H = np.zeros((50, 3))
    H_norm, clusters = quantile_norm(H, np.repeat(["a", "b"], 25))
    assert np.isfinite(H_norm).all() and not H_norm.any()
    assert (clusters == -1).all()
    rng = np.random.default_rng(5)
    H, _ = clustered_factors(rng, 200, zero_rows=3)
    H[:, 2] = 0.0  # a factor unused by every cell: RMS 0 must not give NaN
    ds = np.repeat(["a", "b"], 100)
    H_norm, clusters = quantile_norm(H, ds, refine_knn=False)
    assert np.isfinite(H_norm).all()
    empty = ~H.any(axis=1)
    assert empty[:3].all()
    np.testing.assert_array_equal(clusters == -1, empty)
    np.testing.assert_array_equal(H_norm[:3], 0.0)
    assert max_factor_labels(np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]]))[2] == -1


def test_very_different_dataset_sizes():
    rng = np.random.default_rng(6)
    H = np.vstack([clustered_factors(rng, 3000)[0], clustered_factors(rng, 25, scale=2.0, power=1.0)[0]])
    ds = np.repeat(["huge", "tiny"], [3000, 25])
    H_norm, clusters = quantile_norm(H, ds)
    assert H_norm.shape == H.shape and np.isfinite(H_norm).all()
    tiny = ds == "tiny"
    np.testing.assert_array_equal(H_norm[tiny], H[tiny])  # no tiny cluster reaches min_cells=20
    H_norm, _ = quantile_norm(H, ds, min_cells=3, n_neighbors=5)
    assert not np.allclose(H_norm[tiny], H[tiny])


def test_knn_vote_ties_go_to_smallest_label():
    labels = np.array([2, 1, -1, 1, 2])
    neighbors = np.array([[0, 1], [1, 0], [2, 3], [3, 4], [4, 0]])
    np.testing.assert_array_equal(knn_vote(neighbors, labels), [1, 1, -1, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(H=np.ones((4, 2)), datasets=["a", "b"]), r"datasets: expected one label per cell, shape \(4,\)"),
        (dict(H=np.ones(4), datasets=["a"] * 4), r"H: expected a non-empty 2-D array"),
        (dict(H=np.array([[1.0, np.nan]] * 2), datasets=["a", "b"]), "H: expected finite values, found 2"),
        (dict(H=-np.ones((2, 2)), datasets=["a", "b"]), "H: expected non-negative"),
        (dict(H=np.ones((2, 2)), datasets=["a", "b"], reference="c"), r"reference: expected one of the datasets \['a', 'b'\], found 'c'"),
        (dict(H=np.ones((2, 2)), datasets=["a", "b"], quantiles=0), "quantiles: expected an integer >= 1"),
        (dict(H=np.ones((2, 2)), datasets=["a", None]), "datasets: expected a label for every cell, found 1 missing"),
    ],
)
def test_quantile_norm_rejects_bad_input(kwargs, match):
    H = kwargs.pop("H")
    datasets = kwargs.pop("datasets")
    with pytest.raises(InputError, match=match):
        quantile_norm(H, datasets, **kwargs)


# --- clustering, UMAP and plots ------------------------------------------------------------------

def test_snn_graph_matches_dense_jaccard():
    rng = np.random.default_rng(0)
    n, k = 60, 6
    nn = np.array([np.concatenate([[i], rng.choice(np.delete(np.arange(n), i), k - 1, replace=False)])
                   for i in range(n)])
    graph = snn_graph(nn, chunk=17).toarray()
    sets = [set(row) for row in nn]
    for i in range(n):
        for j in range(n):
            s = len(sets[i] & sets[j])
            w = s / (2 * k - s)
            expected = w if (j > i and w >= 1 / 15) else 0.0
            assert graph[i, j] == pytest.approx(expected), (i, j)


def test_leiden_recovers_separated_groups_ordered_by_size():
    rng = np.random.default_rng(0)
    sizes = [50, 120, 80]
    X = np.vstack([rng.normal(10 * i, 1.0, size=(s, 5)) for i, s in enumerate(sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    labels = cluster_leiden(X, resolution=0.5)
    assert metrics.ari(truth, labels) == 1.0
    np.testing.assert_array_equal(np.bincount(labels), sorted(sizes, reverse=True))


@pytest.fixture(scope="module")
def cellbench(shared_data):
    """H of cellbench 5 cell lines (3 plates) from sklearn NMF on library-normalised, scaled genes."""
    ad = pytest.importorskip("anndata")
    decomposition = pytest.importorskip("sklearn.decomposition")
    import scipy.sparse as sp

    a = ad.read_h5ad(shared_data / "cellbench_5cl_celseq2_3plates.h5ad")
    X = a.X.tocsr().astype(np.float64)
    Xn = sp.diags(1.0 / np.asarray(X.sum(axis=1)).ravel()) @ X
    mean = np.asarray(Xn.mean(axis=0)).ravel()
    var = np.asarray(Xn.multiply(Xn).mean(axis=0)).ravel() - mean**2
    nu = np.mean(1.0 / np.asarray(X.sum(axis=1)).ravel())
    score = np.where(mean > 0, np.log10(np.maximum(var, 1e-300)) - np.log10(np.maximum(mean * nu, 1e-300)), -np.inf)
    Xs = Xn[:, np.argsort(-score)[:500]].tocsr()  # rliger-style dispersion ranking
    batch = a.obs["batch"].to_numpy().astype(str)
    for b in np.unique(batch):  # scaleNotCenter per dataset
        idx = np.flatnonzero(batch == b)
        rms = np.sqrt(np.asarray(Xs[idx].multiply(Xs[idx]).sum(axis=0)).ravel() / (idx.size - 1))
        Xs[idx] = Xs[idx] @ sp.diags(1.0 / np.where(rms > 0, rms, 1.0))
    nmf = decomposition.NMF(n_components=20, init="random", random_state=1, max_iter=400)
    H = nmf.fit_transform(Xs)
    return H, batch, a.obs["cell_type"].to_numpy().astype(str)


def test_leiden_on_cellbench_matches_cell_types(cellbench):
    H, batch, cell_type = cellbench
    H_norm, _ = quantile_norm(H, batch)
    labels = cluster_leiden(H_norm, resolution=0.3)
    score = metrics.ari(cell_type, labels)
    print(f"cellbench_5cl: ARI {score:.3f}, {labels.max() + 1} clusters, alignment H "
          f"{metrics.alignment(H, batch):.3f} -> H_norm {metrics.alignment(H_norm, batch):.3f}")
    assert score > 0.8
    np.testing.assert_array_equal(cluster_leiden(H_norm, resolution=0.3), labels)
    assert metrics.alignment(H_norm, batch) > 0.9


def test_cosine_knn_is_exact():
    rng = np.random.default_rng(3)
    X = np.abs(rng.normal(size=(200, 8)))
    X[7] = 0.0  # an all-zero row stays at the origin
    idx, dist = cosine_knn(X, 6)
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
    full = 1.0 - unit @ unit.T
    np.fill_diagonal(full, 0.0)
    full[7, :] = full[:, 7] = 0.5
    full[7, 7] = 0.0
    expected = np.sort(full, axis=1)[:, :6]
    np.testing.assert_allclose(dist, expected, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), expected, atol=1e-6)
    assert (idx[:, 0] == np.arange(200)).sum() >= 199  # each row's nearest is itself (ties aside)


@pytest.mark.slow  # umap-learn's numba compilation takes ~30 s once per process
def test_umap_learn_fallback_returns_finite_coordinates(monkeypatch):
    pytest.importorskip("umap")
    monkeypatch.setitem(sys.modules, "scranpy", None)  # the fallback where scranpy has no wheel
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(120, 6)))
    coords = run_umap(X, n_neighbors=10)
    assert coords.shape == (120, 2) and np.isfinite(coords).all()


@pytest.mark.parametrize(("modules", "call", "extra"), [
    (("umap", "scranpy"), lambda X: run_umap(X), "umap"),
    (("igraph",), lambda X: cluster_leiden(X), "cluster"),
    (("matplotlib",), lambda X: plotting.plot_objective([1.0], "x.png"), "plot"),
])
def test_missing_extra_names_the_extra(monkeypatch, modules, call, extra):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=rf"pip install 'onlinemf\[{extra}\]'"):
        call(np.ones((10, 3)))
    assert issubclass(MissingExtraError, InputError)


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb.png"
    obj = tmp_path / "objective.png"
    assert plotting.plot_embedding(rng.normal(size=(300, 2)), rng.integers(0, 12, 300), emb, title="t") == emb
    assert plotting.plot_objective(np.geomspace(100, 1, 30), obj) == obj
    for path in (emb, obj):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.png", "objective.png"]  # no temp files left
    with pytest.raises(InputError, match=r"coords: expected a non-empty array of shape \(n_cells, 2\)"):
        plotting.plot_embedding(np.ones((3, 3)), [1, 2, 3], tmp_path / "bad.png")
    with pytest.raises(InputError, match="path .*: expected an existing folder"):
        plotting.plot_objective([1.0, 2.0], tmp_path / "missing" / "o.png")


# --- backends: faiss kNN, igraph Leiden, umappp UMAP ---------------------------------------------------

def _hide(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _overlap(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def test_faiss_exact_knn_equals_kd_tree():
    pytest.importorskip("faiss")
    from onlinemf import postprocess

    rng = np.random.default_rng(4)
    X = rng.gamma(2.0, 1.0, size=(600, 20))
    idx = postprocess.knn_indices(X, 15, eps=0.5)  # faiss: exact whatever eps
    _, exact = cKDTree_query(X, 15)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(exact, axis=1))
    assert (idx[:, 0] == np.arange(600)).all()


def test_eps_zero_stays_exact_in_float64(monkeypatch):
    from onlinemf import postprocess

    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 6))
    monkeypatch.setattr(postprocess, "_faiss_knn", lambda *a, **k: pytest.fail("faiss used for eps=0"))
    _, exact = cKDTree_query(X, 7)
    np.testing.assert_array_equal(postprocess.knn_indices(X, 7, eps=0.0), exact)


def cKDTree_query(X, k):
    from scipy.spatial import cKDTree

    return cKDTree(X).query(X, k=k)


def test_inverted_file_index_above_exact_limit_has_high_recall(monkeypatch):
    pytest.importorskip("faiss")
    from onlinemf import postprocess

    rng = np.random.default_rng(6)
    H, _ = clustered_factors(rng, 6000, K=10, zero_rows=0)
    monkeypatch.setattr(postprocess, "EXACT_KNN_MAX_CELLS", 1000)
    idx = postprocess.knn_indices(H, 20)
    again = postprocess.knn_indices(H, 20)
    np.testing.assert_array_equal(idx, again)  # the seeded index is reproducible
    assert idx.shape == (6000, 20) and idx.min() >= 0 and idx.max() < 6000
    _, exact = cKDTree_query(H, 20)
    assert _overlap(idx, exact) > 0.95


def test_quantile_norm_same_with_and_without_faiss(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    H = np.vstack([clustered_factors(rng, n, K=6)[0] for n in (400, 600)])
    ds = np.repeat(["a", "b"], [400, 600])
    with_faiss = quantile_norm(H, ds, eps=0.5)
    _hide(monkeypatch, "faiss")
    kd_exact = quantile_norm(H, ds, eps=0.0)
    np.testing.assert_array_equal(with_faiss[1], kd_exact[1])
    np.testing.assert_allclose(with_faiss[0], kd_exact[0], rtol=1e-12)


def test_cosine_knn_same_with_and_without_faiss(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(8)
    X = np.abs(rng.normal(size=(400, 10)))
    X[3] = 0.0
    idx, dist = cosine_knn(X, 8)
    _hide(monkeypatch, "faiss")
    idx_kd, dist_kd = cosine_knn(X, 8)
    np.testing.assert_allclose(dist, dist_kd, atol=1e-6)
    assert _overlap(idx, idx_kd) > 0.99  # the all-zero row is equidistant from all others


def test_leiden_is_seeded_and_leaves_global_random_alone():
    import random

    rng = np.random.default_rng(9)
    X = np.vstack([rng.normal(3 * i, 1.0, size=(150, 5)) for i in range(4)])
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    a = cluster_leiden(X, random_state=3)
    assert random.random() == expected_next
    np.testing.assert_array_equal(a, cluster_leiden(X, random_state=3))


def test_umappp_is_reproducible_and_keeps_neighbourhoods():
    pytest.importorskip("scranpy")
    rng = np.random.default_rng(10)
    X = np.abs(rng.normal(0.5, 0.3, size=(300, 8)))
    X[np.arange(300), np.repeat([0, 1, 2], 100)] += 4.0  # three groups, three directions (cosine metric)
    coords = run_umap(X, n_neighbors=15, random_state=1)
    assert coords.shape == (300, 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    np.testing.assert_array_equal(coords, run_umap(X, n_neighbors=15, random_state=1))
    assert not np.array_equal(coords, run_umap(X, n_neighbors=15, random_state=2))
    # Each cell's 10 nearest cells in the embedding come mostly from its own group.
    _, near = cKDTree_query(coords.astype(np.float64), 11)
    group = np.repeat([0, 1, 2], 100)
    assert (group[near[:, 1:]] == group[:, None]).mean() > 0.95


def test_leiden_same_when_edges_come_in_slices(monkeypatch):
    from onlinemf import postprocess

    rng = np.random.default_rng(12)
    X = np.vstack([rng.normal(4 * i, 1.0, size=(120, 5)) for i in range(3)])
    whole = cluster_leiden(X, random_state=2)
    monkeypatch.setattr(postprocess, "LEIDEN_EDGE_SLICE", 97)
    np.testing.assert_array_equal(cluster_leiden(X, random_state=2), whole)


def test_pca_coordinates_are_the_scaled_leading_components():
    from onlinemf.postprocess import pca_coordinates

    rng = np.random.default_rng(13)
    X = rng.normal(size=(500, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 7.0
    coords = pca_coordinates(X)
    assert coords.shape == (500, 2) and coords.flags.c_contiguous
    assert np.isclose(np.abs(coords).max(), 10.0)
    # The same plane as the first two right singular vectors of the centred data, up to sign and scale.
    centred = X - X.mean(axis=0)
    expected = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    for j in range(2):
        assert abs(np.corrcoef(coords[:, j], expected[:, j])[0, 1]) > 1 - 1e-9
    np.testing.assert_array_equal(coords, pca_coordinates(X[:, :]))
    assert np.array_equal(pca_coordinates(np.zeros((5, 3))), np.zeros((5, 2)))


def test_umappp_starts_from_pca_above_the_spectral_limit(monkeypatch):
    pytest.importorskip("scranpy")
    from onlinemf import postprocess

    rng = np.random.default_rng(10)
    X = np.abs(rng.normal(0.5, 0.3, size=(300, 8)))
    X[np.arange(300), np.repeat([0, 1, 2], 100)] += 4.0
    spectral = run_umap(X, n_neighbors=15, random_state=1)
    monkeypatch.setattr(postprocess, "SPECTRAL_INIT_MAX_CELLS", 100)
    calls = []
    real = postprocess.pca_coordinates
    monkeypatch.setattr(postprocess, "pca_coordinates", lambda Y: calls.append(Y.shape) or real(Y))
    coords = run_umap(X, n_neighbors=15, random_state=1)
    assert calls == [(300, 8)] and not np.array_equal(coords, spectral)
    np.testing.assert_array_equal(coords, run_umap(X, n_neighbors=15, random_state=1))
    _, near = cKDTree_query(coords.astype(np.float64), 11)
    group = np.repeat([0, 1, 2], 100)
    assert (group[near[:, 1:]] == group[:, None]).mean() > 0.95


def test_quantile_norm_with_given_labels_equals_computing_them():
    from onlinemf.postprocess import refined_labels

    rng = np.random.default_rng(14)
    H = rng.gamma(0.5, 1.0, size=(900, 6))
    datasets = np.repeat(["a", "b"], [600, 300])
    expected = quantile_norm(H, datasets, max_sample=50, random_state=4)
    given = {"a": refined_labels(H[:600], random_state=4)}
    got = quantile_norm(H, datasets, max_sample=50, random_state=4, labels=given)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # Labels that are not the dataset's clusters change the result: they are used, not recomputed.
    other = quantile_norm(H, datasets, max_sample=50, random_state=4, labels={"a": np.zeros(600, dtype=np.int64)})
    assert not np.array_equal(other[0], expected[0])
    with pytest.raises(InputError, match=r"labels\['a'\]: expected one label per cell"):
        quantile_norm(H, datasets, labels={"a": np.zeros(5, dtype=np.int64)})
    with pytest.raises(InputError, match=r"labels: expected names among the datasets \['a', 'b'\], found \['c'\]"):
        quantile_norm(H, datasets, labels={"c": np.zeros(600, dtype=np.int64)})


def test_distinct_rows_keep_file_order_and_rebuild_the_matrix():
    from onlinemf.postprocess import distinct_rows

    X = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [3.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    first, inverse = distinct_rows(X)
    np.testing.assert_array_equal(first, [0, 1, 3])
    np.testing.assert_array_equal(inverse, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(X[first][inverse], X)
    first, inverse = distinct_rows(X[[3, 0, 1]])
    np.testing.assert_array_equal(first, [0, 1, 2])


def test_umap_places_identical_rows_together_and_embeds_each_once(monkeypatch):
    pytest.importorskip("scranpy")
    from onlinemf import postprocess

    rng = np.random.default_rng(10)
    X = np.abs(rng.normal(0.5, 0.3, size=(300, 8)))
    X[np.arange(300), np.repeat([0, 1, 2], 100)] += 4.0
    copies = X[rng.integers(0, 300, 600)]
    seen = []
    real = postprocess._umap_umappp
    monkeypatch.setattr(postprocess, "_umap_umappp", lambda Y, *a, **k: seen.append(Y.shape[0]) or real(Y, *a, **k))
    coords = run_umap(np.vstack([X, copies]), n_neighbors=15, random_state=1)
    assert seen == [300]  # the 600 copies are not embedded again
    np.testing.assert_array_equal(coords[:300], run_umap(X, n_neighbors=15, random_state=1))
    first, inverse = postprocess.distinct_rows(np.vstack([X, copies]))
    np.testing.assert_array_equal(coords, coords[first][inverse])


def _snn_of_groups(seed, n_groups=6, n=150, spread=1.0):
    from onlinemf.postprocess import knn_indices, snn_graph

    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(2.0 * i, spread, size=(n, 5)) for i in range(n_groups)])
    return snn_graph(knn_indices(X, 20))


@pytest.mark.parametrize("seed", [0, 1])
def test_capped_leiden_equals_igraphs_own_iterations(seed):
    """One iteration per call from the previous membership gives igraph's own n_iterations partition (same
    random stream); the loop only adds the early stop."""
    import random

    import igraph

    from onlinemf.postprocess import _same_partition, leiden_membership

    snn = _snn_of_groups(seed, spread=1.6)  # overlapping groups: several iterations change the partition
    coo = snn.tocoo()
    g = igraph.Graph(n=snn.shape[0], edges=np.column_stack([coo.row, coo.col]), directed=False)
    for n_iterations in (1, 2, 5):
        igraph.set_random_number_generator(random.Random(4))
        own = g.community_leiden(objective_function="modularity", weights=coo.data.astype(float), resolution=1.0,
                                 n_iterations=n_iterations).membership
        igraph.set_random_number_generator(random)
        capped = leiden_membership(igraph, snn, resolution=1.0, n_iterations=n_iterations, random_state=4)
        assert _same_partition(capped, own)


def test_capped_leiden_stops_when_an_iteration_changes_nothing(monkeypatch):
    import igraph

    from onlinemf.postprocess import leiden_membership

    calls = []
    real = igraph.Graph.community_leiden

    def counted(self, *args, **kwargs):
        calls.append(kwargs["n_iterations"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(igraph.Graph, "community_leiden", counted)
    snn = _snn_of_groups(0, n_groups=3, spread=0.2)  # three far-apart groups: settled after the first iteration
    labels = leiden_membership(igraph, snn, resolution=1.0, n_iterations=50, random_state=1)
    assert len(set(labels)) == 3
    assert 2 <= len(calls) < 50 and set(calls) == {1}
    calls.clear()
    leiden_membership(igraph, snn, resolution=1.0, n_iterations=-1, random_state=1)
    assert calls == [-1]


def test_same_partition_ignores_cluster_numbers():
    from onlinemf.postprocess import _same_partition

    assert _same_partition([0, 0, 1, 2], [5, 5, 0, 1])
    assert not _same_partition([0, 0, 1, 2], [0, 1, 1, 2])
    assert not _same_partition([0, 0, 1, 1], [0, 0, 0, 0])
    assert not _same_partition(None, [0, 1])
