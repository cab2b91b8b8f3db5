"""Import slow optional libraries on a background thread while the run reads and factorizes.

UMAP and Leiden need libraries that take seconds to import (umap-learn and its numba-compiled dependencies),
and nothing needs them before the end of a run, so a pipeline names them at its start and a daemon thread imports
them while the main thread works. (anndata, needed to write, is not warmed up: measured, its import competed
for the GIL with the reading passes and the run got no faster.)
Before using such a module the main thread calls :func:`wait`, so two threads never import the same module at
once (the import system would cope, but a partly imported module could be seen).
"""

from __future__ import annotations

import importlib
import threading

_thread: threading.Thread | None = None


def start(modules: list[str]) -> None:
    """Import ``modules`` on a daemon thread (missing ones are skipped: their users raise the clear error)."""
    global _thread
    wait()

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001, S112 - the real import, later, reports any problem
                continue

    _thread = threading.Thread(target=run, name="onlinemf-warmup", daemon=True)
    _thread.start()


def wait() -> None:
    """Block until the background imports (if any) are done."""
    global _thread
    if _thread is not None:
        _thread.join()
        _thread = None
