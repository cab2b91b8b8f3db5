"""Every output kind (results, model, checkpoint, plots) gets the permissions of any new file: 0666 & ~umask."""

import os
import stat
from pathlib import Path

import pytest

from onlinemf import pipelines, plotting
from onlinemf._files import atomic_output

TINY = Path(__file__).resolve().parents[1] / "data" / "kang_pbmc_rliger_tiny.h5ad"


@pytest.fixture(params=[0o027, 0o002], ids=["umask027", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class RecordingBar:
    """A progress bar that notes the checkpoint's mode whenever the fit reports progress."""

    def __init__(self, checkpoint: Path, seen: set):
        self.checkpoint, self.seen = checkpoint, seen
        self.total, self.n = None, 0

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        if self.checkpoint.exists():
            self.seen.add(mode(self.checkpoint))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fit_outputs_follow_the_umask(tmp_path, umask):
    out, model, ckpt, plots = tmp_path / "res.h5ad", tmp_path / "m.h5", tmp_path / "ck.h5", tmp_path / "plots"
    seen: set = set()
    pipelines.fit(
        [TINY], output=out, model=model,
        params=pipelines.ModelParams(k=5, epochs=2, batch_size=100),
        reading=pipelines.InputOptions(batch_key="batch"),
        outputs=pipelines.OutputOptions(cluster=False, umap=False, plots=plots),
        checkpoint=ckpt, checkpoint_every=1,
        progress=lambda total=None, desc="", unit="": RecordingBar(ckpt, seen),
    )
    expected = 0o666 & ~umask
    assert seen == {expected}, "checkpoint"
    assert not ckpt.exists()  # a finished fit removes its checkpoint
    for path in (out, model, plots / "objective.png"):
        assert mode(path) == expected, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5", "plots", "res.h5ad"]  # no temporaries left


def test_plots_follow_the_umask(tmp_path, umask):
    emb = plotting.plot_embedding([[0, 0], [1, 1], [2, 0]], ["a", "b", "a"], tmp_path / "e.png")
    obj = plotting.plot_objective([3.0, 2.0, 1.0], tmp_path / "o.svg")
    assert mode(emb) == mode(obj) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.png", "o.svg"]


def test_writer_replacing_the_temporary_still_gets_the_umask_mode(tmp_path, umask):
    # A library that writes its own file and renames it over ours (mode 0600) does not decide the mode.
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        own = tmp_path / "own"
        own.write_bytes(b"x")
        own.chmod(0o600)
        os.replace(own, tmp)
    assert mode(target) == 0o666 & ~umask and target.read_bytes() == b"x"


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
