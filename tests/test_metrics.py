import numpy as np
import pytest

from onlinemf import InputError
from onlinemf.metrics import agreement, alignment, ari, contingency, evaluate, nmi


def test_alignment_mixed_is_one_and_separated_is_zero():
    rng = np.random.default_rng(0)
    mixed = rng.random((900, 10))
    ds = np.repeat(["a", "b", "c"], [300, 250, 350])
    assert alignment(mixed, ds) == pytest.approx(1.0, abs=0.08)
    separated = mixed + 10.0 * np.repeat(np.eye(3, 10), [300, 250, 350], axis=0)
    assert alignment(separated, ds) == pytest.approx(0.0, abs=1e-12)


def test_alignment_default_k_and_sampling():
    rng = np.random.default_rng(1)
    X = rng.random((400, 5))
    ds = np.repeat(["a", "b"], [380, 20])
    # default k = max(floor(0.01 * 400), 10) = 10; explicit k gives the same result
    assert alignment(X, ds, random_state=3) == alignment(X, ds, k=10, random_state=3)
    assert alignment(X, ds, random_state=3) != alignment(X, ds, random_state=4)  # sampling uses the seed
    with pytest.raises(InputError, match="k: expected at most 39"):
        alignment(X, ds, k=40)
    with pytest.raises(InputError, match="expected at least 2 datasets"):
        alignment(X, np.repeat("a", 400))


def test_alignment_counts_same_dataset_neighbours_exactly():
    # Two clumps, each holding 2 cells of "a" and 2 of "b": with k=3, every cell has 1 same-dataset
    # neighbour: score = 1 - (1 - 1.5) / (3 - 1.5) = 4/3 (LIGER's score can exceed 1).
    X = np.array([[0, 0], [0, 0.1], [0.1, 0], [0.1, 0.1], [9, 9], [9, 9.1], [9.1, 9], [9.1, 9.1]])
    ds = np.array(["a", "a", "b", "b", "a", "a", "b", "b"])
    # within a clump the nearest 3 of each cell are the other 3 cells of its clump
    assert alignment(X, ds, k=3) == pytest.approx(4 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_ari_nmi_match_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    a = rng.integers(0, int(rng.integers(1, 8)), n)
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, 6, n))
    b_str = np.array([f"c{v}" for v in b])
    assert ari(a, b_str) == pytest.approx(sk.adjusted_rand_score(a, b), abs=1e-12)
    assert nmi(a, b_str) == pytest.approx(sk.normalized_mutual_info_score(a, b), abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b"),
    [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [5, 6, 7]), ([0, 0, 1, 1], [0, 1, 0, 1]), ([0, 0, 0, 0], [0, 1, 2, 3]), ([3], [4])],
)
def test_ari_nmi_edge_cases_match_sklearn(a, b):
    sk = pytest.importorskip("sklearn.metrics")
    assert ari(a, b) == pytest.approx(sk.adjusted_rand_score(a, b), abs=1e-12)
    assert nmi(a, b) == pytest.approx(sk.normalized_mutual_info_score(a, b), abs=1e-12)


def test_contingency_rejects_unequal_lengths():
    np.testing.assert_array_equal(contingency(["x", "y", "x"], [1, 1, 2]), [[1, 1], [1, 0]])
    with pytest.raises(InputError, match=r"labels: expected two 1-D labelings of equal length, found shapes \(3,\) and \(2,\)"):
        ari([1, 2, 3], [1, 2])


def _own_nmf(data, ndims, seed):
    decomposition = pytest.importorskip("sklearn.decomposition")
    n_comp = min(ndims, *data.shape)
    return decomposition.NMF(n_components=n_comp, init="nndsvda", random_state=seed, max_iter=500).fit_transform(data)


def test_agreement_is_one_for_the_datasets_own_nmf_and_low_for_noise():
    rng = np.random.default_rng(0)
    data = {"a": rng.gamma(1.0, 1.0, (80, 30)), "b": rng.gamma(1.0, 1.0, (60, 30))}
    ds = np.repeat(["a", "b"], [80, 60])
    H_own = np.vstack([_own_nmf(data["a"], 5, 1), _own_nmf(data["b"], 5, 1)])
    assert agreement(H_own, ds, data, ndims=5, k=10, random_state=1) == pytest.approx(1.0)
    assert agreement(H_own, ds, [data["a"], data["b"]], ndims=5, k=10, random_state=1) == pytest.approx(1.0)
    noise = rng.random((140, 5))
    assert agreement(noise, ds, data, ndims=5, k=10, random_state=1) < 0.25
    with pytest.raises(InputError, match=r"scaled_data_list: expected data for datasets \['a', 'b'\], found none for \['b'\]"):
        agreement(noise, ds, {"a": data["a"]})
    with pytest.raises(InputError, match=r"scaled_data_list\['b'\]: expected 60 rows \(cells\), found 59"):
        agreement(noise, ds, {"a": data["a"], "b": data["b"][:59]})


def test_evaluate_gathers_available_metrics():
    rng = np.random.default_rng(2)
    X = rng.random((300, 4))
    ds = np.repeat(["a", "b"], 150)
    clusters = rng.integers(0, 3, 300)
    labels = np.where(clusters == 0, "t0", "t1").astype(object)
    labels[:10] = None  # unlabelled cells are left out of ARI/NMI
    out = evaluate(X, ds, clusters=clusters, labels=labels)
    assert out["n_cells"] == 300 and out["n_datasets"] == 2 and out["n_clusters"] == 3
    assert out["alignment"] == alignment(X, ds)
    assert out["n_labelled"] == 290
    assert out["ari"] == pytest.approx(ari(labels[10:].astype(str), clusters[10:]))
    assert out["nmi"] == pytest.approx(nmi(labels[10:].astype(str), clusters[10:]))
    only = evaluate(X, np.repeat("a", 300))
    assert only["alignment"] is None and "ari" not in only and "n_clusters" not in only
    with pytest.raises(InputError, match=r"clusters: expected shape \(300,\), found \(299,\)"):
        evaluate(X, ds, clusters=clusters[:-1])


def test_exact_neighbours_same_with_and_without_faiss(monkeypatch):
    import sys

    pytest.importorskip("faiss")
    from onlinemf.metrics import _neighbors_without_self

    rng = np.random.default_rng(11)
    X = rng.gamma(2.0, 1.0, size=(800, 12))
    X[5] = X[6]  # duplicates: each must still drop itself, not its twin
    ds = np.repeat(["a", "b"], 400)
    with_faiss = _neighbors_without_self(X, 15), alignment(X, ds, k=30)
    monkeypatch.setitem(sys.modules, "faiss", None)
    without = _neighbors_without_self(X, 15), alignment(X, ds, k=30)
    np.testing.assert_array_equal(np.sort(with_faiss[0], axis=1), np.sort(without[0], axis=1))
    assert (with_faiss[0] != np.arange(800)[:, None]).all()
    assert with_faiss[1] == without[1]
