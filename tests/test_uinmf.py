"""Online UINMF (datasets with unshared features): maths against a batch reference, KKT conditions of H, the
no-unshared path unchanged to the bit, model format versions, gene selection, CLI."""

from pathlib import Path

import _reference_uinmf as RU
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from onlinemf.cli import main

from onlinemf import InputError
from onlinemf import _solvers as S
from onlinemf.engine import OnlineINMF
from onlinemf.model_io import FORMAT_VERSION, load_model, save_model
from onlinemf.preprocess import compute_stats_all, prepare, select_unshared_genes
from onlinemf.readers import MemorySource, open_sources

FIXTURES = Path(__file__).parent / "data"
CELLBENCH = "cellbench_3cl_celseq2_dropseq.h5ad"


def synthetic(seed=0, sizes=(300, 240), K=3, G=60, u=(0, 25)):
    """Poisson data from a known UINMF model: ``[E_i, P_i] ~ Poisson(H_i [W + V_i, U_i])``, dict name -> CSR."""
    rng = np.random.default_rng(seed)
    W = rng.random((K, G)) * (rng.random((K, G)) < 0.5)
    out = {}
    for i, (n, ui) in enumerate(zip(sizes, u, strict=True)):
        V = 0.3 * rng.random((K, G)) * (rng.random((K, G)) < 0.3)
        U = rng.random((K, ui)) * (rng.random((K, ui)) < 0.5)
        H = rng.gamma(1.0, 1.0, (n, K))
        out[f"d{i}"] = sp.csr_matrix(rng.poisson(H @ np.hstack([W + V, U])).astype(np.float32))
    return out


def model(**kw):
    params = {"n_components": 3, "batch_size": 120, "max_epochs": 4, "chunk_size": 30, "random_state": 2, "n_threads": 1}
    params.update(kw)
    return OnlineINMF(**params)


def state(est):
    out = {"W": est.W_.copy()}
    for n in est.dataset_names_:
        for key in ("V_", "A_", "B_", "A_old_", "B_old_"):
            out[key + n] = getattr(est, key)[n].copy()
    return out


def assert_same(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


# ----------------------------------------------------------------------------- no unshared features: unchanged
def v1_fixture():
    """The data, sources and parameters of tests/data/v1_model.h5 (written by the code before UINMF)."""
    data = np.load(FIXTURES / "v1_model_data.npz")
    genes = [f"g{j}" for j in range(30)]
    sources = [MemorySource(sp.csr_matrix(data[n]), name=n, var_names=genes) for n in ("d0", "d1")]
    return sources, OnlineINMF(3, batch_size=50, max_epochs=3, chunk_size=20, random_state=5, n_threads=1)


def test_no_unshared_features_same_model_to_the_bit_as_before_uinmf():
    sources, est = v1_fixture()
    before = load_model(FIXTURES / "v1_model.h5").estimator
    for unshared in (None, {}, {"d0": 0}):
        sources, est = v1_fixture()
        est.fit(sources, unshared=unshared)
        assert_same(est, before)
        assert est.n_steps_ == before.n_steps_ and est.objective_ == before.objective_
        assert est.U_ == {} and est.unshared_names_ == {}


def test_v1_model_loads_and_resaves_as_current_version(tmp_path):
    with h5py.File(FIXTURES / "v1_model.h5") as f:
        assert int(f.attrs["format_version"]) == 1
    saved = load_model(FIXTURES / "v1_model.h5")
    assert saved.info == {"fixture": "v1"} and saved.scaling["d0"].shape == (30,)
    est = saved.estimator
    assert est.dataset_names_ == ["d0", "d1"] and est.U_ == {}
    save_model(tmp_path / "m.h5", est, scaling=saved.scaling)
    with h5py.File(tmp_path / "m.h5") as f:
        assert int(f.attrs["format_version"]) == FORMAT_VERSION == 2
        assert "U" not in f["datasets/0"]
    assert_same(load_model(tmp_path / "m.h5").estimator, est)


def test_unshared_arrays_in_a_v1_file_are_refused(tmp_path):
    est = model().fit(synthetic(), unshared={"d1": 25})
    save_model(tmp_path / "m.h5", est)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(Exception, match="datasets/1/U in a format_version 1 file"):
        load_model(tmp_path / "m.h5")


# ----------------------------------------------------------------------------- estimator
def test_uinmf_state_shapes_round_trip_and_names(tmp_path):
    data = synthetic()
    genes = [f"g{j}" for j in range(60)]
    own = [f"own{j}" for j in range(25)]
    sources = [MemorySource(data["d0"], name="d0", var_names=genes),
               MemorySource(data["d1"], name="d1", var_names=genes + own)]
    est = model().fit(sources, unshared={"d1": 25})
    assert est.W_.shape == (3, 60) and est.V_["d0"].shape == (3, 60) and est.V_["d1"].shape == (3, 85)
    assert list(est.U_) == ["d1"] and est.U_["d1"].shape == (3, 25)
    assert np.shares_memory(est.U_["d1"], est.V_["d1"]) and est.U_["d1"].min() >= 0
    assert list(est.unshared_names_["d1"]) == own and list(est.var_names_in_) == genes
    assert est.B_["d1"].shape == (3, 85) and est.B_old_["d1"].shape == (3, 85)
    save_model(tmp_path / "m.h5", est, scaling={"d1": np.ones(85), "d0": np.ones(60)})
    with h5py.File(tmp_path / "m.h5") as f:
        g = f["datasets/1"]
        assert g["V"].shape == (3, 60) and g["U"].shape == (3, 25) and g["B_U"].shape == (3, 25)
        assert g["B_U_old"].shape == (3, 25) and list(g["unshared_names"].asstr()[...]) == own
    back = load_model(tmp_path / "m.h5")
    assert_same(back.estimator, est)
    assert list(back.estimator.unshared_names_["d1"]) == own and back.scaling["d1"].shape == (85,)
    # H of known cells uses the stacked factor; projection on W takes the shared genes only (scenario 3)
    np.testing.assert_array_equal(back.estimator.transform(data["d1"], dataset="d1"), est.transform(data["d1"], dataset="d1"))
    assert est.transform(data["d1"][:, :60]).shape == (240, 3)
    with pytest.raises(InputError, match="expected 60 genes as the model then its 25 unshared features, found 60"):
        est.transform(data["d1"][:, :60], dataset="d1")
    with pytest.raises(InputError, match="expected 60 genes as the model, found 85"):
        est.transform(data["d1"])


def test_fit_equals_a_loop_of_partial_fit_with_unshared_features():
    data = synthetic(u=(10, 25))
    fitted = model().fit(data, unshared={"d0": 10, "d1": 25})
    est = model().initialize(data, unshared={"d0": 10, "d1": 25})
    for step, batch in est.minibatches(data):
        est.partial_fit(batch, new_epoch=step.new_epoch)
    assert_same(fitted, est)
    assert fitted.n_steps_ == est.n_steps_ > 4


def test_partial_fit_starts_datasets_with_unshared_features():
    data = synthetic()
    est = model().partial_fit(data["d1"][:100], dataset="d1", unshared={"d1": 25})
    assert est.W_.shape == (3, 60) and est.U_["d1"].shape == (3, 25)
    est.partial_fit(data["d0"][:100], dataset="d0")
    est.partial_fit({"d0": data["d0"][100:200], "d1": data["d1"][100:200]})
    assert est.V_["d0"].shape == (3, 60) and est.n_batches_ == {"d1": 2, "d0": 2}
    with pytest.raises(InputError, match="d1: expected 60 genes as the model then its 25 unshared features, found 60"):
        est.partial_fit(data["d1"][:50, :60], dataset="d1")


def test_unshared_parameter_errors():
    data = synthetic()
    with pytest.raises(InputError, match=r"unshared: expected names of the datasets being added \['d0', 'd1'\], found \['x'\]"):
        model().fit(data, unshared={"x": 3})
    with pytest.raises(InputError, match=r"unshared\['d1'\]: expected a number of unshared features >= 0, found -1"):
        model().fit(data, unshared={"d1": -1})
    with pytest.raises(InputError, match="d1: expected 60 genes as the model then its 20 unshared features, found 85"):
        model().fit(data, unshared={"d1": 20})
    with pytest.raises(InputError, match="d0: expected shared genes before its 60 unshared features, found 60 columns"):
        model().fit(data, unshared={"d0": 60})
    with pytest.raises(InputError, match="expected a dict dataset name"):
        model().fit(data, unshared=["d1"])


def test_update_keeps_frozen_unshared_factors_and_adds_new_ones():
    data = synthetic()
    est = model().fit(data, unshared={"d1": 25})
    U_before, W_before = est.U_["d1"].copy(), est.W_.copy()
    new = synthetic(seed=5, sizes=(200, 150), u=(0, 7))
    est.update({"n0": new["d0"], "n1": new["d1"]}, unshared={"n1": 7})
    np.testing.assert_array_equal(est.U_["d1"], U_before)
    assert not np.array_equal(est.W_, W_before) and est.U_["n1"].shape == (3, 7)
    assert est.frozen_ == {"d0", "d1"}


def test_hals_on_stacked_factors_is_the_uinmf_update():
    """One HALS sweep on [V, U] / [B, B^U] equals the W, V_i, U_i formulas of reference/uinmf.md."""
    rng = np.random.default_rng(1)
    K, G, u = 4, 12, 5
    W = rng.random((K, G))
    Hs = [rng.random((30, K)) for _ in range(2)]
    As = [H.T @ H for H in Hs]
    Vs = [rng.random((K, G)), rng.random((K, G + u))]
    Bs = [rng.random((K, G)) * 5, rng.random((K, G + u)) * 5]
    lam, c = 2.0, 3.0
    W1, V1 = W.copy(), [V.copy() for V in Vs]
    S.hals_update(W1, V1, As, [B.copy() for B in Bs], lam, [True, True], n_sweeps=1, floor=0.0)
    # reference, from the formulas
    W2, V2 = W.copy(), [V[:, :G].copy() for V in Vs]
    U2 = Vs[1][:, G:].copy()
    for j in range(K):
        grad = sum(B[j, :G] - A[j] @ (W2 + V) for A, B, V in zip(As, Bs, V2, strict=True))
        W2[j] = np.maximum(0, W2[j] + grad / sum(A[j, j] for A in As))
    for i, (A, B) in enumerate(zip(As, Bs, strict=True)):
        for j in range(K):
            V2[i][j] = np.maximum(0, V2[i][j] + (B[j, :G] - A[j] @ (W2 + V2[i]) - lam * A[j] @ V2[i]) / (c * A[j, j]))
    A, B = As[1], Bs[1]
    for j in range(K):
        U2[j] = np.maximum(0, U2[j] + (B[j, G:] - c * A[j] @ U2) / (c * A[j, j]))
    np.testing.assert_allclose(W1, W2, rtol=1e-12)
    np.testing.assert_allclose(V1[0], V2[0], rtol=1e-12)
    np.testing.assert_allclose(V1[1], np.hstack([V2[1], U2]), rtol=1e-12)


def test_kkt_conditions_of_h_with_the_stacked_factor():
    data = synthetic()
    est = model(dtype="float64").fit(data, unshared={"d1": 25})
    est.set_params(h_sweeps=400)
    X = data["d1"].toarray().astype(np.float64)
    H = est.transform(data["d1"], dataset="d1")
    V, U = est.V_["d1"][:, :60], est.U_["d1"]
    G, C = RU.h_system(X[:, :60], X[:, 60:], est.W_, V, U, est.lam)
    grad = H @ G - C.T  # gradient of 1/2 h^T G h - c^T h, per cell
    scale = np.abs(C).max()
    assert H.min() >= 0
    assert grad.min() >= -1e-6 * scale                    # dual feasibility
    assert np.abs(H * grad).max() <= 1e-6 * scale * max(1.0, H.max())  # complementary slackness
    # and it is the exact NNLS solution
    np.testing.assert_allclose(H, RU.nnls_bpp(G, C).T, atol=1e-6 * max(1.0, H.max()))


# ----------------------------------------------------------------------------- batch reference
def test_batch_reference_objective_never_increases():
    data = synthetic(u=(8, 25))
    Es = [X[:, :60] for X in data.values()]
    Ps = [data["d0"][:, 60:], data["d1"][:, 60:]]
    *_, objectives = RU.fit_batch_uinmf(Es, Ps, 3, 5.0, 25, np.random.default_rng(0))
    assert np.all(np.diff(objectives) <= 1e-9 * objectives[0])
    assert objectives[-1] < 0.9 * objectives[0]


def test_online_ends_close_to_the_batch_reference_on_real_data(shared_data):
    """CellBench CEL-seq2 + Drop-seq, CEL-seq2's genes that Drop-seq lacks as its unshared features."""
    sources = open_sources([str(shared_data / CELLBENCH)], batch_key="batch")
    with prepare(sources, n_genes=800, unshared=["CEL-seq2"], cache="memory") as p:
        G, u = len(p.genes), p.unshared["CEL-seq2"].size
        assert u > 100 and [s.n_genes for s in p.sources] == [G + u, G]
        Xs = [s.read_block(0, s.n_cells) for s in p.sources]
        *_, batch_objectives = RU.fit_batch_uinmf([X[:, :G] for X in Xs], [X[:, G:] for X in Xs], 8, 5.0, 15,
                                                  np.random.default_rng(0))
        est = OnlineINMF(8, batch_size=100, max_epochs=10, random_state=1, dtype="float64")
        est.fit(p.sources, unshared={"CEL-seq2": u})
        online = est.objective(p.sources)
    assert np.all(np.diff(batch_objectives) <= 1e-9 * batch_objectives[0])
    assert online <= 1.03 * batch_objectives[-1]


# ----------------------------------------------------------------------------- genes
def _stats(datasets):
    return compute_stats_all([MemorySource(X, name=n, var_names=g) for n, (X, g) in datasets.items()])


def test_select_unshared_genes_absent_by_name_or_without_counts():
    rng = np.random.default_rng(0)
    genes = [f"g{j}" for j in range(40)]
    # a: the 40 genes and 2 of its own, b: the 40 genes, every one with counts in both, all highly variable
    Xa = rng.poisson(3.0 + rng.gamma(0.2, 50.0, (200, 42))).astype(np.float32)
    Xb = rng.poisson(3.0 + rng.gamma(0.2, 50.0, (150, 40))).astype(np.float32)
    Xb[:, 5] = 0  # g5: b's batch concatenated with zeros -> absent from b
    stats = _stats({"a": (sp.csr_matrix(Xa), genes + ["x1", "x2"]), "b": (sp.csr_matrix(Xb), genes)})
    out = select_unshared_genes(stats, ["a", "b"], thresh=-10.0, alpha=0.99)
    assert list(out["a"]) == ["g5", "x1", "x2"]
    assert list(out["b"]) == []  # b has nothing the other lacks (g5 has no counts in b)
    assert select_unshared_genes(stats, ["a"], thresh=50.0)["a"].size == 0  # the threshold applies
    with pytest.raises(InputError, match=r"unshared: expected dataset names among \['a', 'b'\], found \['c'\]"):
        select_unshared_genes(stats, ["c"])


def test_prepare_appends_unshared_columns_and_scales_them():
    rng = np.random.default_rng(3)
    genes = [f"g{j}" for j in range(30)]
    Xa = sp.csr_matrix(rng.poisson(3.0 + rng.gamma(0.2, 50.0, (120, 33))).astype(np.float32))
    Xb = sp.csr_matrix(rng.poisson(3.0 + rng.gamma(0.2, 50.0, (100, 30))).astype(np.float32))
    srcs = [MemorySource(Xa, name="a", var_names=genes + ["x0", "x1", "x2"]), MemorySource(Xb, name="b", var_names=genes)]
    plain = prepare(srcs, thresh=-10.0)
    with prepare(srcs, thresh=-10.0, unshared=["a"], unshared_thresh=-10.0) as p:
        G = len(p.genes)
        assert list(p.genes) == list(plain.genes) and list(p.unshared["a"]) == ["x0", "x1", "x2"]
        assert list(p.sources[0].var_names[G:]) == list(p.unshared["a"]) and p.sources[1].n_genes == G
        A, A_plain = p.sources[0].read_block(0, 120).toarray(), plain.sources[0].read_block(0, 120).toarray()
        np.testing.assert_array_equal(A[:, :G], A_plain)  # shared columns unchanged
        np.testing.assert_allclose(np.sqrt((A[:, G:] ** 2).sum(0) / 119), 1.0, rtol=1e-5)  # RMS-scaled
        assert p.scales["a"].shape == (G + p.unshared["a"].size,)


# ----------------------------------------------------------------------------- CLI
def test_cli_fit_unshared_writes_u_and_v2_model_then_project(tmp_path, shared_data):
    import anndata as ad

    runner = CliRunner()
    out, mdl = tmp_path / "res.h5ad", tmp_path / "m.h5"
    args = ["fit", str(shared_data / CELLBENCH), "--batch-key", "batch", "--unshared", "CEL-seq2", "--k", "5",
            "--n-genes", "500", "--epochs", "2", "--batch-size", "150", "--no-umap", "--no-cluster", "--quiet",
            "--threads", "1", "-o", str(out), "--model", str(mdl)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    a = ad.read_h5ad(out)
    entry = a.uns["inmf"]["unshared"]["0"]
    assert entry["dataset"] == "CEL-seq2" and entry["U"].shape == (entry["genes"].size, 5) and entry["genes"].size > 100
    saved = load_model(mdl)
    assert not set(entry["genes"]) & set(saved.estimator.var_names_in_)
    assert list(saved.estimator.U_) == ["CEL-seq2"]
    np.testing.assert_array_equal(saved.estimator.U_["CEL-seq2"].T, entry["U"])
    with h5py.File(mdl) as f:
        assert int(f.attrs["format_version"]) == 2
    proj = runner.invoke(main, ["project", str(mdl), str(shared_data / CELLBENCH), "--batch-key", "batch", "--no-umap",
                                "--no-cluster", "--quiet", "-o", str(tmp_path / "p.h5ad")])
    assert proj.exit_code == 0, proj.output
    bad = runner.invoke(main, [*args[:5], "nope", *args[6:-4], "-o", str(tmp_path / "x.h5ad"), "--model", str(tmp_path / "x.h5")])
    assert bad.exit_code != 0 and "unshared: expected dataset names among ['CEL-seq2', 'Drop-seq'], found ['nope']" in bad.output


def test_tl_integrate_with_unshared_batches(shared_data):
    import anndata as ad

    from onlinemf import tl

    adata = ad.read_h5ad(shared_data / CELLBENCH)
    tl.integrate(adata, "batch", k=4, epochs=1, batch_size=200, n_genes=300, unshared=["CEL-seq2"], cluster=False)
    entry = adata.uns["inmf"]["unshared"]["0"]
    assert entry["dataset"] == "CEL-seq2" and entry["U"].shape == (entry["genes"].size, 4) and entry["genes"].size > 100
    drop = adata[adata.obs["batch"] == "Drop-seq"]
    assert np.asarray(drop[:, list(entry["genes"])].X.sum(axis=0)).max() == 0  # no counts in Drop-seq


class _Bars:
    """A progress factory whose factorize bar raises after ``stop`` mini-batches (an interrupted run)."""

    def __init__(self, stop=None):
        self.stop, self.first = stop, None

    def __call__(self, total=None, desc="", unit=""):
        bars = self

        class Bar:
            n = 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                pass

            def set_postfix(self, **kw):
                pass

            def refresh(self):
                if desc == "factorize" and bars.first is None:
                    bars.first = self.n
                if desc == "factorize" and bars.stop is not None and self.n >= bars.stop:
                    raise RuntimeError("interrupted")

        bar = Bar()
        bar.total = total
        return bar


def test_pipeline_resume_keeps_the_unshared_genes_and_equals_an_uninterrupted_fit(tmp_path, shared_data):
    from onlinemf import pipelines

    def run(name, progress, resume=False):
        return pipelines.fit(
            [shared_data / CELLBENCH], model=tmp_path / f"{name}.h5", checkpoint=tmp_path / "ck.h5", checkpoint_every=1,
            resume=resume, progress=progress, cache="memory",
            params=pipelines.ModelParams(k=4, epochs=2, batch_size=150, seed=3, threads=1),
            reading=pipelines.InputOptions(batch_key="batch"),
            selection=pipelines.GeneSelection(n_genes=300, unshared=("CEL-seq2",)),
            outputs=pipelines.OutputOptions(cluster=False, umap=False))

    run("full", _Bars())
    with pytest.raises(RuntimeError, match="interrupted"):
        run("cut", _Bars(stop=3))
    assert load_model(tmp_path / "ck.h5").estimator.n_steps_ == 2
    bars = _Bars()
    run("resumed", bars, resume=True)
    assert bars.first == 3  # it continued after the checkpoint's 2 mini-batches
    full, resumed = load_model(tmp_path / "full.h5").estimator, load_model(tmp_path / "resumed.h5").estimator
    assert list(resumed.unshared_names_["CEL-seq2"]) == list(full.unshared_names_["CEL-seq2"])
    assert_same(full, resumed)
