"""Interruption and file safety with real processes: SIGINT, SIGKILL, --resume, concurrent readers.

A fit of the 3,000-cell demo with small mini-batches runs 199 iterations, checkpointing every 2, so
signals land in the middle of an epoch. The interrupted-then-resumed fit must equal an uninterrupted one.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _badfiles as B
import anndata as ad
import h5py
import numpy as np
import pytest

from onlinemf import load_model

DEMO = B.REPO / "data" / "pbmc_demo.h5ad"
ARGS = ["--k", "12", "--epochs", "2", "--batch-size", "30", "--seed", "3", "--no-umap", "--no-cluster", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DEADLINE_S = 240


def command(folder: Path, name: str, *extra) -> list[str]:
    return [sys.executable, "-m", "onlinemf.cli", "fit", str(folder / "in.h5ad"), "-o", str(folder / f"{name}.h5ad"),
            "--model", str(folder / f"{name}_model.h5"), *ARGS, *extra]


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the fit ended (status {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def checkpoint_done(path: Path) -> int:
    import json

    with h5py.File(path, "r") as f:
        return int(json.loads(f.attrs["checkpoint"])["done"])


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted fit, and the same fit interrupted by SIGINT, then by SIGKILL, then resumed."""
    folder = tmp_path_factory.mktemp("interrupt")
    os.symlink(DEMO, folder / "in.h5ad")
    input_hash = B.digest(DEMO)
    ckpt = folder / "ck.h5"
    resumable = ["--checkpoint", str(ckpt), "--checkpoint-every", "2", "--resume"]

    reference = start(command(folder, "ref"))
    # 1. SIGINT in the middle of an epoch: clean message, status 130, no outputs, the checkpoint kept.
    proc = start(command(folder, "out", *resumable))
    wait_for(ckpt.exists, proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    sigint = finish(proc)
    after_sigint = {"files": sorted(p.name for p in folder.iterdir()), "done": checkpoint_done(ckpt)}
    # 2. SIGKILL once the resumed run has written a newer checkpoint: no cleanup can run.
    proc = start(command(folder, "out", *resumable))
    first = ckpt.stat().st_mtime_ns
    wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != first, proc, "a newer checkpoint")
    proc.send_signal(signal.SIGKILL)
    sigkill = finish(proc)
    after_sigkill = {"files": sorted(p.name for p in folder.iterdir()), "done": checkpoint_done(ckpt)}
    # A temporary a killed writer left (as if the kill had hit a checkpoint write) must go on the next run.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (folder / f".ck.h5.{dead}-abc123.tmp").write_bytes(b"partial")
    # 3. Resume to the end.
    resumed = finish(start(command(folder, "out", *resumable)))
    ref = finish(reference)
    return {"folder": folder, "ckpt": ckpt, "sigint": sigint, "sigkill": sigkill, "resumed": resumed, "ref": ref,
            "after_sigint": after_sigint, "after_sigkill": after_sigkill, "input_hash": input_hash}


def test_sigint_is_clean(runs):
    status, err = runs["sigint"]
    assert status == 130, err
    assert "Traceback" not in err
    assert "Interrupted: no output was written" in err
    # Nothing at the target paths, no temporaries: only the input and the checkpoint (and the reference run's
    # outputs, if it finished meanwhile).
    names = [n for n in runs["after_sigint"]["files"] if "ref" not in n]
    assert names == ["ck.h5", "in.h5ad"]
    assert 0 < runs["after_sigint"]["done"] < 199  # mid-run: 2 epochs of 100 mini-batches


def test_sigkill_leaves_no_output(runs):
    status, _ = runs["sigkill"]
    assert status == -signal.SIGKILL
    names = [n for n in runs["after_sigkill"]["files"] if "ref" not in n]
    # A checkpoint temporary may remain if the kill hit a write; results and model never appear half-written.
    assert [n for n in names if not n.startswith(".ck.h5.")] == ["ck.h5", "in.h5ad"]
    assert runs["after_sigkill"]["done"] > runs["after_sigint"]["done"]  # the second run resumed and went on


def test_resume_finishes_and_cleans_up(runs):
    status, err = runs["resumed"]
    assert status == 0, err
    folder = runs["folder"]
    assert not runs["ckpt"].exists()  # a finished fit removes its checkpoint
    assert temporaries(folder) == []  # including the stale one planted for a killed writer
    assert B.digest(folder / "in.h5ad") == runs["input_hash"]
    assert (folder / "out.h5ad").exists() and (folder / "out_model.h5").exists()


def test_resumed_fit_equals_uninterrupted(runs):
    status, err = runs["ref"]
    assert status == 0, err
    folder = runs["folder"]
    ref, out = load_model(folder / "ref_model.h5").estimator, load_model(folder / "out_model.h5").estimator
    np.testing.assert_array_equal(out.var_names_in_, ref.var_names_in_)
    np.testing.assert_allclose(out.W_, ref.W_, rtol=1e-6, atol=1e-7)
    for name in ref.dataset_names_:
        np.testing.assert_allclose(out.V_[name], ref.V_[name], rtol=1e-6, atol=1e-7)
    assert out.n_steps_ == ref.n_steps_
    H_ref = ad.read_h5ad(folder / "ref.h5ad").obsm["X_inmf"]
    H_out = ad.read_h5ad(folder / "out.h5ad").obsm["X_inmf"]
    np.testing.assert_allclose(H_out, H_ref, rtol=1e-6, atol=1e-7)


def test_two_processes_read_one_input_at_once(tmp_path):
    os.symlink(DEMO, tmp_path / "in.h5ad")
    fast = ["--epochs", "1", "--batch-size", "500"]
    procs = [start(command(tmp_path, name, *fast)) for name in ("a", "b")]
    for proc in procs:
        status, err = finish(proc)
        assert status == 0, err
    H_a = ad.read_h5ad(tmp_path / "a.h5ad").obsm["X_inmf"]
    H_b = ad.read_h5ad(tmp_path / "b.h5ad").obsm["X_inmf"]
    np.testing.assert_array_equal(H_a, H_b)
    assert temporaries(tmp_path) == []


def test_sigterm_cleans_up_like_sigint(tmp_path):
    """A scheduler's SIGTERM (time limit) exits like Ctrl-C: status 130, only the checkpoint left."""
    os.symlink(DEMO, tmp_path / "in.h5ad")
    ckpt = tmp_path / "ck.h5"
    proc = start(command(tmp_path, "out", "--checkpoint", str(ckpt), "--checkpoint-every", "2"))
    wait_for(ckpt.exists, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    status, err = finish(proc)
    assert status == 130, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "in.h5ad"]


def test_a_swallowed_interrupt_still_stops_publication(tmp_path):
    """Python drops a KeyboardInterrupt raised in a weakref callback; the flag the CLI's handler sets makes the
    next safe point (a progress update, a rename into place) raise it again, so nothing is published."""
    from onlinemf._files import atomic_output, interrupt_requested
    from onlinemf._progress import NullProgress

    target = tmp_path / "out.h5ad"
    interrupt_requested.set()
    try:
        with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
            tmp.write_bytes(b"complete")
        with pytest.raises(KeyboardInterrupt), NullProgress(total=1) as bar:
            bar.update(1)
    finally:
        interrupt_requested.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
def test_sigterm_ends_the_umap_helper(tmp_path):
    """A run that clusters and embeds starts a UMAP helper process at once; SIGTERM mid-fit ends both."""
    from onlinemf._cores import usable_cores

    if usable_cores() < 2:
        pytest.skip("the helper starts only with two or more usable cores")
    os.symlink(DEMO, tmp_path / "in.h5ad")
    ckpt = tmp_path / "ck.h5"
    cmd = [a for a in command(tmp_path, "out", "--checkpoint", str(ckpt), "--checkpoint-every", "2", "--threads", "2")
           if a not in ("--no-umap", "--no-cluster")]
    proc = start(cmd)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for(lambda: ckpt.exists() and children.read_text().split(), proc, "the helper and the first checkpoint")
    helper = int(children.read_text().split()[0])
    proc.send_signal(signal.SIGTERM)
    status, err = finish(proc)
    assert status == 130, err
    assert not Path(f"/proc/{helper}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "in.h5ad"]
