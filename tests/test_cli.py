"""End-to-end: fit, update with a held-back dataset, project — through CliRunner and real subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from onlinemf.cli import main

from onlinemf import pipelines

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "kang_pbmc_rliger_tiny.h5ad"
DEMO = REPO / "data" / "pbmc_demo.h5ad"
FAST = ["--k", "8", "--epochs", "2", "--batch-size", "200", "--no-umap", "--quiet"]


def run(args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)
    return result


@pytest.fixture(scope="module")
def split_tiny(tmp_path_factory):
    """The tiny Kang file split into one file per condition (ctrl for fit, stim held back)."""
    folder = tmp_path_factory.mktemp("tiny")
    adata = ad.read_h5ad(TINY)
    paths = {}
    for batch in ("ctrl", "stim"):
        part = adata[adata.obs["batch"] == batch].copy()
        paths[batch] = folder / f"{batch}.h5ad"
        part.write_h5ad(paths[batch])
    return paths


def test_help_lists_commands_and_defaults():
    result = run(["--help"])
    for cmd in ("fit", "update", "project", "info", "evaluate"):
        assert cmd in result.output
    fit_help = run(["fit", "--help"]).output
    assert "--lambda" in fit_help and "default: 20" in fit_help and "default: 5000" in fit_help


def test_fit_guesses_batch_key_and_writes_results(tmp_path):
    out, model = tmp_path / "res.h5ad", tmp_path / "model.h5"
    result = CliRunner().invoke(main, ["fit", str(TINY), "-o", str(out), "--model", str(model), "--k", "8", "--epochs", "3", "--batch-size", "200", "--no-umap"])
    assert result.exit_code == 0, result.output
    assert "obs column 'batch'" in result.output
    res = ad.read_h5ad(out)
    src = ad.read_h5ad(TINY)
    assert res.n_obs == src.n_obs and list(res.obs_names) == list(src.obs_names)
    assert (res.obs["batch"] == src.obs["batch"]).all()
    H = res.obsm["X_inmf"]
    assert H.shape == (600, 8) and np.isfinite(H).all() and (H >= 0).all()
    assert res.obsm["X_inmf_norm"].shape == (600, 8)
    assert res.varm["W_inmf"].shape == (src.n_vars, 8)
    sel = res.var["inmf_selected"].to_numpy()
    assert sel.any() and (res.varm["W_inmf"][~sel] == 0).all()
    assert res.obs["inmf_cluster"].nunique() >= 2
    assert res.uns["inmf"]["params"]["k"] == 8
    assert model.exists()


def test_fit_update_project_scenarios(split_tiny, tmp_path):
    model, model2 = tmp_path / "m.h5", tmp_path / "m2.h5"
    r1 = run(["fit", split_tiny["ctrl"], "-o", tmp_path / "fit.h5ad", "--model", model, *FAST])
    assert r1.exit_code == 0, r1.output
    # Scenario 2 with the old data gone: the model alone carries what is needed.
    moved = tmp_path / "gone.h5ad"
    os.replace(split_tiny["ctrl"], moved)
    try:
        r2 = run(["update", model, split_tiny["stim"], "-o", tmp_path / "upd.h5ad", "--model-out", model2, "--epochs", "2", "--no-umap", "--quiet"])
    finally:
        os.replace(moved, split_tiny["ctrl"])
    assert r2.exit_code == 0, r2.output
    upd = ad.read_h5ad(tmp_path / "upd.h5ad")
    assert upd.n_obs == 300 and upd.obsm["X_inmf"].shape == (300, 8)
    # The parameters recorded are the model's (they were FitOptions' defaults, k=20, before the options split).
    assert upd.uns["inmf"]["params"]["k"] == 8 and upd.uns["inmf"]["params"]["epochs"] == 2
    before = model.read_bytes()
    r3 = run(["project", model2, split_tiny["ctrl"], "-o", tmp_path / "proj.h5ad", "--no-umap", "--quiet"])
    assert r3.exit_code == 0, r3.output
    assert model.read_bytes() == before
    proj = ad.read_h5ad(tmp_path / "proj.h5ad")
    assert proj.obsm["X_inmf"].shape == (300, 8) and (proj.obsm["X_inmf"] >= 0).all()
    info = run(["info", model2])
    assert info.exit_code == 0 and "stim" in info.output and "ctrl" in info.output


def test_info_on_h5ad_and_10x():
    out = run(["info", REPO / "data" / "kang_ctrl_300.h5"]).output
    assert "300" in out and "10x" in out
    out = run(["info", TINY, "--batch-key", "batch"]).output
    assert "ctrl" in out and "stim" in out and "600" in out


def test_user_error_is_one_line_no_traceback(tmp_path):
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "missing.h5ad")])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "missing.h5ad" in result.output
    assert not any(tmp_path.iterdir())


def test_output_equal_to_input_is_refused(tmp_path):
    copy = tmp_path / "in.h5ad"
    copy.write_bytes(TINY.read_bytes())
    result = CliRunner().invoke(main, ["fit", str(copy), "-o", str(copy), *FAST])
    assert result.exit_code != 0 and "input" in result.output
    assert copy.read_bytes() == TINY.read_bytes()


def test_subprocess_fit_and_evaluate(tmp_path):
    out = tmp_path / "res.h5ad"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "onlinemf.cli", "fit", str(TINY), "-o", str(out), "--model", str(tmp_path / "m.h5"), *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ev = subprocess.run([sys.executable, "-m", "onlinemf.cli", "evaluate", str(out), "--label-key", "rliger_leiden"], capture_output=True, text=True, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert "alignment" in ev.stdout and "ari" in ev.stdout.lower()


def test_default_outputs_go_to_the_current_folder(tmp_path, monkeypatch):
    """Inputs often sit in read-only shared folders: without -o/--model nothing is written beside them."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny.h5ad").write_bytes(TINY.read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run(["fit", data / "tiny.h5ad", *FAST, "--no-cluster"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["tiny_inmf.h5ad", "tiny_model.h5"]
    assert sorted(p.name for p in data.iterdir()) == ["tiny.h5ad"]


def test_seed_reaches_postprocessing(split_tiny, tmp_path, monkeypatch):
    """--seed seeds quantile normalisation, Leiden and UMAP (UMAP's seed was fixed at 42); update and project
    use the model's seed unless given one."""
    from onlinemf import postprocess

    seen = []
    real_qn = postprocess.quantile_norm

    def quantile_norm(H, datasets, *, random_state=None, **kw):
        seen.append(("quantile_norm", random_state))
        return real_qn(H, datasets, random_state=random_state, **kw)

    monkeypatch.setattr(postprocess, "quantile_norm", quantile_norm)
    monkeypatch.setattr(postprocess, "cluster_leiden", lambda X, *, random_state=None, **kw: seen.append(("leiden", random_state)) or (X.argmax(axis=1)))
    monkeypatch.setattr(postprocess, "run_umap", lambda X, *, random_state=None, **kw: seen.append(("umap", random_state)) or X[:, :2])
    # UMAP in this process, where the patch is seen (test_umap_process checks the helper gets the same seed)
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 1)
    fast = [a for a in FAST if a != "--no-umap"]
    model = tmp_path / "m.h5"
    assert run(["fit", split_tiny["ctrl"], "-o", tmp_path / "f.h5ad", "--model", model, *fast, "--seed", "3"]).exit_code == 0
    assert seen == [("quantile_norm", 3), ("leiden", 3), ("umap", 3)]
    seen.clear()
    assert run(["project", model, split_tiny["stim"], "-o", tmp_path / "p.h5ad", "--quiet"]).exit_code == 0
    assert seen == [("quantile_norm", 3), ("leiden", 3), ("umap", 3)]
    seen.clear()
    assert run(["project", model, split_tiny["stim"], "-o", tmp_path / "p2.h5ad", "--quiet", "--seed", "9"]).exit_code == 0
    assert seen == [("quantile_norm", 9), ("leiden", 9), ("umap", 9)]
    assert ad.read_h5ad(tmp_path / "p2.h5ad").uns["inmf"]["params"]["postprocess_seed"] == 9


def test_full_disk_is_one_line_and_publishes_nothing(split_tiny, tmp_path, monkeypatch):
    """A storage failure while writing (h5py's OSError, errno 28) is one line with exit 1; the earlier model is
    untouched, no results file appears and no temporary is left."""
    import errno

    model = tmp_path / "m.h5"
    assert run(["fit", split_tiny["ctrl"], "-o", tmp_path / "first.h5ad", "--model", model, *FAST]).exit_code == 0
    before = model.read_bytes()

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed ...)")

    monkeypatch.setattr(pipelines, "write_results", full_disk)
    result = run(["fit", split_tiny["ctrl"], "-o", tmp_path / "r.h5ad", "--model", model, *FAST])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1:] == [
        "Error: No space left on device: the run stopped and published nothing (its temporary files are removed, "
        "earlier outputs untouched); free space or write elsewhere, then run again"]
    assert "Traceback" not in result.output
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.h5ad", "m.h5"]


def test_other_os_errors_are_not_hidden(split_tiny, tmp_path, monkeypatch):
    import errno

    def bug(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(pipelines, "write_results", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        run(["fit", split_tiny["ctrl"], "-o", tmp_path / "r.h5ad", "--model", tmp_path / "m.h5", *FAST])
