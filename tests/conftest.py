import os
from pathlib import Path

# Cap BLAS threads before numpy loads: CI has 2 cores and tests run in one process.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import importlib.machinery
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]


def _prefer_installed_package() -> None:
    """With a regular (non-editable) install, test the installed package, not the checkout's sources.

    cli/ is installed as onlinemf.cli (package-dir), so the checkout's onlinemf/ has no cli: when ``python -m
    pytest`` puts the checkout first on sys.path, or a test's subprocess starts in it, ``onlinemf.cli`` would
    not import. An editable install is found either way and is left alone.
    """
    elsewhere = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
    spec = importlib.machinery.PathFinder.find_spec("onlinemf", elsewhere)
    if spec is not None and spec.origin is not None and not Path(spec.origin).resolve().is_relative_to(REPO):
        sys.path[:] = elsewhere
        os.environ["PYTHONSAFEPATH"] = "1"  # subprocesses: no current folder on their path


_prefer_installed_package()


def _shared_data() -> Path:
    env = os.environ.get("ONLINEMF_SHARED_DATA")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared" / "data", REPO / "data" / "shared", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return REPO.parent / "shared" / "data"


SHARED = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real datasets (../shared/data); tests needing it skip if absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return REPO / "data"
