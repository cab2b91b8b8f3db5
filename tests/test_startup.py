"""Startup stays light: ``import onlinemf`` loads no plotting, UMAP, clustering or JIT library, and the CLI's
help works without them. Each check runs in a fresh interpreter, where ``sys.modules`` shows what an import
really pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("umap", "matplotlib", "numba", "igraph", "leidenalg", "sklearn", "pynndescent", "faiss", "scranpy")


def _loaded_after(statement: str) -> list[str]:
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", [
    "import onlinemf",
    "import onlinemf.cli",
    "from onlinemf import OnlineINMF, InputError, ModelError, save_model, load_model",
    "import onlinemf.postprocess, onlinemf.metrics, onlinemf.plotting",
])
def test_import_loads_no_heavy_library(statement):
    assert _loaded_after(statement) == []


def test_public_names_resolve():
    import onlinemf
    from onlinemf.engine import OnlineINMF
    from onlinemf.model_io import load_model, save_model

    assert onlinemf.OnlineINMF is OnlineINMF
    assert onlinemf.save_model is save_model and onlinemf.load_model is load_model
    assert {"OnlineINMF", "InputError", "ModelError", "save_model", "load_model"} <= set(onlinemf.__all__)
    assert "OnlineINMF" in dir(onlinemf)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        onlinemf.not_a_name  # noqa: B018


def test_cli_help_runs_without_heavy_imports():
    code = ("import sys\nfrom onlinemf.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "Usage:" in done.stdout and "fit" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"
