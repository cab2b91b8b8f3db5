"""Reference mapping: quantile alignment with stored reference quantiles, kNN label transfer, novelty."""

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from onlinemf.cli import main

from onlinemf import InputError
from onlinemf.mapping import (
    ReferenceQuantiles,
    align_to_reference,
    reference_quantiles,
    transfer_labels,
)
from onlinemf.postprocess import quantile_norm


def _factors(rng, n, K, scale=1.0):
    """Cells each loading mostly on one factor, as iNMF H does (so clusters have >= 20 cells)."""
    top = rng.integers(0, K, n)
    H = rng.gamma(0.3, 0.2, size=(n, K))
    H[np.arange(n), top] += rng.gamma(4.0, 1.0, n)
    return H * scale


@pytest.fixture(scope="module")
def three_datasets():
    rng = np.random.default_rng(3)
    K = 4
    parts = [_factors(rng, 300, K), _factors(rng, 200, K, scale=np.array([2.0, 0.5, 1.0, 3.0])), _factors(rng, 150, K, 0.7)]
    datasets = np.repeat(np.array(["a", "b", "c"]), [300, 200, 150])
    return np.concatenate(parts), datasets


def test_alignment_reproduces_quantile_norm_for_every_dataset(three_datasets):
    H, datasets = three_datasets
    H_norm, clusters = quantile_norm(H, datasets, random_state=1)
    ref = reference_quantiles(H, datasets, random_state=1)
    assert ref.reference == "a" and ref.values.shape == (4, 4, 51)
    for name in ("a", "b", "c"):  # the reference itself too
        m = datasets == name
        aligned, labels = align_to_reference(H[m], ref)
        np.testing.assert_array_equal(aligned, H_norm[m])
        np.testing.assert_array_equal(labels, clusters[m])


def test_several_query_datasets_are_aligned_each_on_its_own(three_datasets):
    H, datasets = three_datasets
    ref = reference_quantiles(H, datasets, reference="b")
    m = datasets != "b"
    together, _ = align_to_reference(H[m], ref, datasets=datasets[m])
    for name in ("a", "c"):
        alone, _ = align_to_reference(H[datasets == name], ref)
        np.testing.assert_array_equal(together[datasets[m] == name], alone)


def test_alignment_undoes_a_per_factor_batch_effect(three_datasets):
    # Max-factor clusters ignore per-factor scales (each factor is RMS-scaled); the kNN refinement, in raw H,
    # does not, so it is off here.
    H, datasets = three_datasets
    ref = reference_quantiles(H, datasets, refine_knn=False)
    own = H[datasets == "a"]
    aligned_own, _ = align_to_reference(own, ref)
    aligned_scaled, _ = align_to_reference(own * np.array([3.0, 0.2, 1.5, 7.0]), ref)
    np.testing.assert_allclose(aligned_scaled, aligned_own, rtol=1e-9, atol=1e-12)


def test_alignment_checks_its_inputs(three_datasets):
    H, datasets = three_datasets
    ref = reference_quantiles(H, datasets)
    with pytest.raises(InputError, match="expected 4 factors"):
        align_to_reference(H[:, :3], ref)
    with pytest.raises(InputError, match="reference: expected one of the datasets"):
        reference_quantiles(H, datasets, reference="zzz")
    with pytest.raises(InputError, match=r"shape \(K, K, q\+1\)"):
        ReferenceQuantiles(values=np.zeros((4, 3, 51)), n_cells=np.zeros(4), reference="a")


def test_small_clusters_keep_raw_factors():
    rng = np.random.default_rng(0)
    H = _factors(rng, 200, 3)
    ref = reference_quantiles(H, np.zeros(200), min_cells=20)
    query = _factors(rng, 10, 3) * 5  # every query cluster below min_cells: nothing is mapped
    aligned, _ = align_to_reference(query, ref)
    np.testing.assert_array_equal(aligned, query)


def test_vote_confidence_and_distance_on_a_constructed_case():
    # Reference on a line (second coordinate constant): A at 0, 0.1, 0.2; B at 1.0, 1.1, 1.2.
    x = np.array([0.0, 0.1, 0.2, 1.0, 1.1, 1.2])
    ref = np.column_stack([x, np.ones(6)])
    labels = np.array(["A", "A", "A", "B", "B", "B"])
    query = np.array([[0.3, 1.0], [1.05, 1.0], [0.6, 1.0]])
    result = transfer_labels(query, ref, labels, n_neighbors=4, metric="euclidean")
    assert list(result.labels) == ["A", "B", "A"]  # 0.6 sits between: 2 A and 2 B neighbours, the tie goes to A
    np.testing.assert_allclose(result.confidence, [0.75, 0.75, 0.5])
    # Unit: the reference cells' median mean distance to their 4 nearest other reference cells.
    own = [np.sort(np.abs(x - xi))[1:5].mean() for xi in x]
    assert result.scale == pytest.approx(np.median(own))
    np.testing.assert_allclose(result.distance[0], np.mean([0.1, 0.2, 0.3, 0.7]) / np.median(own), rtol=1e-6)


def test_novel_cell_type_gets_a_larger_mapping_distance():
    rng = np.random.default_rng(1)
    K = 6
    centres = {"A": np.eye(K)[0] * 3, "B": np.eye(K)[1] * 3, "C": np.eye(K)[2] * 3, "novel": np.eye(K)[3] * 3}

    def cells(name, n):
        return np.abs(centres[name] + rng.normal(0, 0.3, size=(n, K)))

    ref = np.concatenate([cells("A", 100), cells("B", 100), cells("C", 100)])
    ref_labels = np.repeat(["A", "B", "C"], 100)
    query = np.concatenate([cells("A", 30), cells("B", 30), cells("novel", 30)])
    result = transfer_labels(query, ref, ref_labels, metric="cosine")
    known, novel = slice(0, 60), slice(60, 90)
    assert (result.labels[known] == np.repeat(["A", "B"], 30)).all()
    assert np.median(result.distance[known]) < 1.5
    assert result.distance[novel].min() > 3 * result.distance[known].max()


def test_transfer_labels_checks_its_inputs():
    ref = np.ones((5, 3))
    with pytest.raises(InputError, match="expected 3 factors"):
        transfer_labels(np.ones((2, 2)), ref, list("aabbb"))
    with pytest.raises(InputError, match="metric"):
        transfer_labels(np.ones((2, 3)), ref, list("aabbb"), metric="manhattan")
    with pytest.raises(InputError, match="labels: expected one label per cell"):
        transfer_labels(np.ones((2, 3)), ref, list("aab"))
    with pytest.raises(InputError, match="labels: expected a label for every cell"):
        transfer_labels(np.ones((2, 3)), ref, ["a", None, "b", "b", "a"])


# ----------------------------------------------------------------------------- end to end (CLI and Python)
TINY = Path(__file__).resolve().parents[1] / "data" / "kang_pbmc_rliger_tiny.h5ad"
FAST = ["--k", "8", "--epochs", "2", "--batch-size", "200", "--no-umap", "--no-cluster", "--quiet"]
LABEL = "rliger_leiden"  # rliger's clusters of these cells: the same populations in ctrl and stim


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """ctrl fitted as the reference (with --label-key), stim split into two query files."""
    folder = tmp_path_factory.mktemp("mapping")
    adata = ad.read_h5ad(TINY)
    paths = {"folder": folder}
    for name, part in (("ctrl", adata[adata.obs["batch"] == "ctrl"]),
                       ("stim_a", adata[adata.obs["batch"] == "stim"][:150]),
                       ("stim_b", adata[adata.obs["batch"] == "stim"][150:])):
        paths[name] = folder / f"{name}.h5ad"
        part.copy().write_h5ad(paths[name])
    paths["results"], paths["model"] = folder / "ref_inmf.h5ad", folder / "ref_model.h5"
    result = _cli(["fit", paths["ctrl"], "--batch-key", "none", "--label-key", LABEL, "-o", paths["results"],
                   "--model", paths["model"], *FAST])
    assert result.exit_code == 0, result.output
    return paths


def test_project_with_reference_transfers_labels(reference, tmp_path):
    before = _digest(reference["results"])
    out = tmp_path / "query.h5ad"
    result = _cli(["project", reference["model"], reference["stim_a"], reference["stim_b"], "-o", out,
                   "--reference", reference["results"], "--label-key", LABEL, *FAST[-3:]])
    assert result.exit_code == 0, result.output
    assert _digest(reference["results"]) == before  # the reference is only read
    res = ad.read_h5ad(out)
    assert res.n_obs == 300 and res.obsm["X_inmf"].shape == (300, 8) and res.obsm["X_inmf_norm"].shape == (300, 8)
    truth = res.obs[LABEL].astype(str).to_numpy()
    predicted = res.obs["inmf_label"].astype(str).to_numpy()
    assert set(predicted) <= set(truth)
    assert (predicted == truth).mean() > 0.5  # 8 rliger clusters; the largest holds 20 % of the cells
    confidence = res.obs["inmf_label_confidence"].to_numpy()
    distance = res.obs["inmf_mapping_distance"].to_numpy()
    assert ((confidence > 0) & (confidence <= 1)).all() and (distance >= 0).all()
    # Confident calls are the better ones.
    high = confidence >= np.median(confidence)
    assert (predicted == truth)[high].mean() >= (predicted == truth)[~high].mean()


def test_label_key_recorded_by_fit_is_the_default(reference, tmp_path):
    out = tmp_path / "query.h5ad"
    result = _cli(["project", reference["model"], reference["stim_a"], "-o", out, "--reference", reference["results"],
                   *FAST[-3:]])
    assert result.exit_code == 0, result.output
    assert "inmf_label" in ad.read_h5ad(out).obs


def test_python_equivalent(reference, tmp_path):
    from onlinemf import pipelines

    out = tmp_path / "query.h5ad"
    pipelines.project(reference["model"], [reference["stim_a"]], output=out, reference=reference["results"],
                      label_key=LABEL, outputs=pipelines.OutputOptions(cluster=False, umap=False))
    assert {"inmf_label", "inmf_label_confidence", "inmf_mapping_distance"} <= set(ad.read_h5ad(out).obs)


def _assert_refused(args, out, match):
    result = _cli(args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and match in lines[0], result.output
    assert "Traceback" not in result.output
    assert not Path(out).exists()


def test_reference_from_another_model_is_refused(reference, tmp_path):
    other_results, other_model = tmp_path / "other.h5ad", tmp_path / "other.h5"
    result = _cli(["fit", reference["ctrl"], "--batch-key", "none", "--seed", "7", "-o", other_results, "--model",
                   other_model, *FAST])
    assert result.exit_code == 0, result.output
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", reference["model"], reference["stim_a"], "-o", out, "--reference", other_results,
                     "--label-key", LABEL, "--quiet"], out, "results of another model")


def test_missing_label_key_is_refused_with_the_columns(reference, tmp_path):
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", reference["model"], reference["stim_a"], "-o", out, "--reference", reference["results"],
                     "--label-key", "cell_type", "--quiet"], out, f"columns: batch, {LABEL}")


def test_query_without_the_model_genes_is_refused(reference, tmp_path):
    query = ad.read_h5ad(reference["stim_a"])
    short = tmp_path / "short.h5ad"
    query[:, : query.n_vars // 2].copy().write_h5ad(short)
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", reference["model"], short, "-o", out, "--reference", reference["results"],
                     "--label-key", LABEL, "--quiet"], out, "genes of the model")


def test_model_without_mapping_data_says_what_is_missing(reference, tmp_path):
    import h5py

    old = tmp_path / "old_model.h5"
    old.write_bytes(Path(reference["model"]).read_bytes())
    with h5py.File(old, "r+") as f:  # what a model written before mapping support looks like
        del f["mapping"]
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", old, reference["stim_a"], "-o", out, "--reference", reference["results"],
                     "--label-key", LABEL, "--quiet"], out, "no reference quantiles")
    # Without --reference the old model still projects.
    result = _cli(["project", old, reference["stim_a"], "-o", out, "--quiet", "--no-umap", "--no-cluster"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- model file
def _fitted_with_record():
    import scipy.sparse as sp

    from onlinemf import OnlineINMF
    from onlinemf.mapping import MappingRecord
    from onlinemf.readers import MemorySource

    X = sp.random(120, 30, density=0.4, random_state=0, format="csr") * 10
    est = OnlineINMF(n_components=3, batch_size=60, max_epochs=2, random_state=0).fit([MemorySource(X, name="a")])
    H = est.transform(X)
    record = MappingRecord(reference_quantiles(H, np.zeros(120), min_cells=5), label_key="cell_type", labels=("x", "y"))
    return est, record


def test_model_file_keeps_the_mapping_record(tmp_path):
    from onlinemf.model_io import load_model, save_model

    est, record = _fitted_with_record()
    save_model(tmp_path / "m.h5", est, mapping=record)
    loaded = load_model(tmp_path / "m.h5").mapping
    np.testing.assert_array_equal(loaded.quantiles.values, record.quantiles.values)  # NaN rows included
    np.testing.assert_array_equal(loaded.quantiles.n_cells, record.quantiles.n_cells)
    assert loaded.quantiles.settings() == record.quantiles.settings()
    assert loaded.label_key == "cell_type" and loaded.labels == ("x", "y")
    save_model(tmp_path / "plain.h5", est)  # update's models, and every model before mapping: none
    assert load_model(tmp_path / "plain.h5").mapping is None


def test_model_with_a_damaged_mapping_group_is_refused(tmp_path):
    import h5py

    from onlinemf import ModelError
    from onlinemf.model_io import load_model, save_model

    est, record = _fitted_with_record()
    save_model(tmp_path / "m.h5", est, mapping=record)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        del f["mapping/quantiles"]
        f["mapping"].create_dataset("quantiles", data=np.zeros((3, 2, 51)))
    with pytest.raises(ModelError, match=r"mapping/quantiles is not a \(3, 3, q\+1\) array"):
        load_model(tmp_path / "m.h5")


def test_fit_with_a_missing_label_key_is_refused_before_any_work(reference, tmp_path):
    out, model = tmp_path / "res.h5ad", tmp_path / "model.h5"
    _assert_refused(["fit", reference["ctrl"], "--batch-key", "none", "--label-key", "cell_type", "-o", out,
                     "--model", model, *FAST], out, f"columns: batch, {LABEL}")
    assert not model.exists()


def test_label_key_without_reference_is_refused(reference, tmp_path):
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", reference["model"], reference["stim_a"], "-o", out, "--label-key", LABEL, "--quiet"],
                    out, "give --reference")


def test_reference_that_is_not_a_results_file_is_refused(reference, tmp_path):
    out = tmp_path / "query.h5ad"
    _assert_refused(["project", reference["model"], reference["stim_a"], "-o", out, "--reference", reference["ctrl"],
                     "--label-key", LABEL, "--quiet"], out, "expected a results .h5ad of onlinemf fit")


def test_update_writes_no_reference_quantiles(reference, tmp_path):
    from onlinemf.model_io import load_model

    assert load_model(reference["model"]).mapping.label_key == LABEL  # fit's model has them
    updated = tmp_path / "updated.h5"
    result = _cli(["update", reference["model"], reference["stim_a"], "--epochs", "1", "-o", tmp_path / "u.h5ad",
                   "--model-out", updated, *FAST[-3:]])
    assert result.exit_code == 0, result.output
    assert load_model(updated).mapping is None  # its W moved away from the reference's H


def test_fit_with_a_model_reuses_the_reference_clusters_and_gives_the_same_results(tmp_path, monkeypatch):
    """With a model the reference dataset's clusters are computed once, for the model's mapping record and for
    quantile normalisation; the normalised H must equal a run without a model (which computes them itself)."""
    from onlinemf import _keys, pipelines, postprocess

    calls = []
    real = postprocess.refined_labels
    monkeypatch.setattr(postprocess, "refined_labels", lambda H, *a, **k: calls.append(H.shape[0]) or real(H, *a, **k))
    options = {"params": pipelines.ModelParams(k=8, epochs=2, batch_size=200),
               "reading": pipelines.InputOptions(batch_key="batch"), "outputs": pipelines.OutputOptions(umap=False)}
    a, b = tmp_path / "with_model.h5ad", tmp_path / "without_model.h5ad"
    pipelines.fit([TINY], output=a, model=tmp_path / "m.h5", **options)
    assert len(calls) == 2  # one per dataset: the reference's for the model, reused by quantile_norm
    pipelines.fit([TINY], output=b, model=None, **options)
    assert len(calls) == 4
    ra, rb = ad.read_h5ad(a), ad.read_h5ad(b)
    np.testing.assert_array_equal(ra.obsm[_keys.OBSM_H_NORM], rb.obsm[_keys.OBSM_H_NORM])
    np.testing.assert_array_equal(ra.obs[_keys.OBS_CLUSTER].to_numpy(), rb.obs[_keys.OBS_CLUSTER].to_numpy())
