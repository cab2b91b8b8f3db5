"""UMAP in a helper process, beside Leiden: the same layout as in-process, and every failure falls back."""

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from onlinemf import pipelines, postprocess
from onlinemf._umap_process import UMAPProcess, UMAPProcessError
from onlinemf.pipelines import ModelParams, OutputOptions


def _factors(n=400, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, size=(4, k))
    return (centres[rng.integers(4, size=n)] + rng.gamma(0.3, 0.3, size=(n, k))).astype(np.float32)


def test_helper_layout_equals_in_process_layout():
    X = _factors()
    with UMAPProcess.start() as helper:
        helper.submit(X, random_state=7, n_neighbors=15)
        coords = helper.result()
    assert helper.seconds is not None and helper.seconds > 0
    assert np.array_equal(coords, postprocess.run_umap(X, random_state=7, n_neighbors=15))


def test_helper_reports_bad_input_as_its_error():
    with UMAPProcess.start() as helper:
        helper.submit(_factors(n=3), random_state=1)
        with pytest.raises(UMAPProcessError, match="expected at least 4 cells"):
            helper.result()


def test_helper_without_a_request_exits_on_end_of_input():
    """What happens when the parent dies without closing it: its pipe ends, and the helper exits cleanly."""
    helper = UMAPProcess.start()
    helper._proc.stdin.close()
    assert helper._proc.wait(timeout=60) == 0
    helper.close()


def test_idle_helper_is_ended_at_once_on_close():
    helper = UMAPProcess.start()
    helper.close()
    assert helper._proc.returncode is not None


def test_unread_layout_is_killed_on_close():
    helper = UMAPProcess.start()
    helper.submit(_factors(n=20000), random_state=1)  # seconds of work nobody reads
    helper.close()
    assert helper._proc.returncode is not None


def test_dead_helper_names_its_exit_code():
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    proc.wait()
    with UMAPProcess(proc, stderr) as helper:
        helper.submit(_factors(n=50), random_state=1)
        with pytest.raises(UMAPProcessError, match="exited with 3: boom"):
            helper.result()


def _fit(path, tmp_path, name):
    out = tmp_path / f"{name}.h5ad"
    summary = pipelines.fit([path], output=out, model=None, params=ModelParams(k=8, lam=5.0, epochs=2, seed=3),
                            outputs=OutputOptions(cluster=True, umap=True))
    with h5py.File(out, "r") as f:
        return summary, f["obsm/X_umap"][()], f["obs/inmf_cluster/codes"][()]


def test_fit_with_helper_equals_fit_without(demo_data, tmp_path, monkeypatch):
    path = demo_data / "pbmc_demo.h5ad"
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 1)
    alone, umap_alone, clusters_alone = _fit(path, tmp_path, "alone")
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 2)
    beside, umap_beside, clusters_beside = _fit(path, tmp_path, "beside")
    assert "umap_wait_s" not in alone.timings
    assert "umap_wait_s" in beside.timings  # the helper ran
    assert np.array_equal(umap_alone, umap_beside)
    assert np.array_equal(clusters_alone, clusters_beside)


def test_fit_falls_back_in_process_when_the_helper_dies(demo_data, tmp_path, monkeypatch, caplog):
    path = demo_data / "pbmc_demo.h5ad"
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 1)
    _, umap_alone, _ = _fit(path, tmp_path, "alone")

    def dead_helper():
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr)
        return UMAPProcess(proc, stderr)

    monkeypatch.setattr(pipelines, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipelines.UMAPProcess, "start", staticmethod(dead_helper))
    with caplog.at_level(logging.WARNING, logger="onlinemf.pipelines"):
        summary, umap, _ = _fit(path, tmp_path, "fallback")
    assert "exited with 9" in caplog.text
    assert "umap_wait_s" not in summary.timings
    assert np.array_equal(umap, umap_alone)


@pytest.mark.parametrize("options", [{"threads": 1}, {"cluster": False}, {"umap": False}])
def test_no_helper_where_nothing_runs_beside_umap(options, monkeypatch):
    started = []
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipelines.UMAPProcess, "start", staticmethod(lambda: started.append(1)))
    threads = options.pop("threads", None)
    with pipelines.umap_helper(OutputOptions(**options), threads) as helper:
        assert helper is None
    assert not started


def test_integrate_with_helper_equals_integrate_without(monkeypatch):
    import anndata as ad

    from onlinemf import tl

    tiny = ad.read_h5ad(Path(__file__).resolve().parents[1] / "data" / "kang_pbmc_rliger_tiny.h5ad")
    layouts = []
    for cores in (1, 2):
        monkeypatch.setattr(pipelines, "usable_cores", lambda cores=cores: cores)
        a = tl.integrate(tiny, "batch", k=5, epochs=1, batch_size=200, cluster=True, umap=True, copy=True)
        layouts.append((a.obsm["X_inmf_umap"], a.obs["inmf_cluster"].to_numpy(), a.uns["inmf"]["timings"]))
    assert "umap_wait_s" not in layouts[0][2] and "umap_wait_s" in layouts[1][2]
    assert np.array_equal(layouts[0][0], layouts[1][0])
    assert np.array_equal(layouts[0][1], layouts[1][1])


def test_update_and_project_with_helper_equal_without(demo_data, tmp_path, monkeypatch):
    import anndata as ad

    from onlinemf.pipelines import InputOptions

    source = ad.read_h5ad(demo_data / "pbmc_demo.h5ad")
    parts = {}
    for value in source.obs["batch"].unique():  # ctrl and stim: one to fit, one arriving later
        parts[value] = tmp_path / f"{value}.h5ad"
        source[source.obs["batch"] == value].copy().write_h5ad(parts[value])
    first, second = list(parts.values())
    model = tmp_path / "model.h5"
    pipelines.fit([first], output=None, model=model, params=ModelParams(k=6, lam=5.0, epochs=1, seed=3),
                  outputs=OutputOptions(cluster=False, umap=False))
    layouts = {}
    for cores in (1, 2):
        monkeypatch.setattr(pipelines, "usable_cores", lambda cores=cores: cores)
        pipelines.update(model, [second], output=tmp_path / f"u{cores}.h5ad", model_out=tmp_path / f"m{cores}.h5",
                         reading=InputOptions())
        pipelines.project(model, [second], output=tmp_path / f"p{cores}.h5ad")
        for run in ("u", "p"):
            with h5py.File(tmp_path / f"{run}{cores}.h5ad", "r") as f:
                layouts[run, cores] = (f["obsm/X_umap"][()], "umap_wait_s" in f["uns/inmf/timings"])
    for run in ("u", "p"):
        assert not layouts[run, 1][1] and layouts[run, 2][1]  # the helper ran only with 2 cores
        assert np.array_equal(layouts[run, 1][0], layouts[run, 2][0])


def test_no_helper_in_a_frozen_application(monkeypatch):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert UMAPProcess.start() is None
