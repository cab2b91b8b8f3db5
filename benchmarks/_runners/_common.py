"""Helpers shared by the engine-benchmark runners (numpy/scipy only).

Each runner executes in its own virtual environment (pyliger, pyplanc, or the
project's), so this module may import nothing beyond numpy, scipy and the
standard library.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def parse_args(description: str) -> argparse.Namespace:
    """Parse the command line every runner shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, type=Path, help="prepared .npz")
    parser.add_argument("--output", required=True, type=Path, help="result .npz")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    return parser.parse_args()


def load_prepared(path: Path) -> tuple[list[str], list[sp.csr_matrix], np.ndarray]:
    """Read the prepared datasets written by ``bench_engine.py``.

    Returns
    -------
    names : list of str
        Dataset names, in order.
    matrices : list of scipy.sparse.csr_matrix
        One float32 matrix of shape (n_cells_i, n_genes) per dataset.
    genes : numpy.ndarray of str, shape (n_genes,)
    """
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        genes = z["genes"]
        matrices = [
            sp.csr_matrix(
                (z[f"X{i}_data"], z[f"X{i}_indices"], z[f"X{i}_indptr"]),
                shape=tuple(z[f"X{i}_shape"]),
            )
            for i in range(len(names))
        ]
    return names, matrices, genes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_kb() -> int:
    """Current resident set size of this process, in KiB."""
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    """Resident high-water mark (VmHWM) since start or the last reset, in KiB."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class FitMeter:
    """Measure wall time and peak RSS of the block it wraps.

    Peak RSS is VmHWM after resetting it at entry, so it covers only the
    fit (plus whatever was resident before, reported as ``rss_before_kb``).
    """

    def __enter__(self) -> FitMeter:
        self.rss_before_kb = rss_kb()
        self.peak_reset = reset_peak_rss()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.peak_kb = peak_rss_kb()


def write_result(
    path: Path,
    *,
    W: np.ndarray,
    Vs: list[np.ndarray],
    Hs: list[np.ndarray],
    meter: FitMeter,
    meta: dict,
) -> None:
    """Write factors and measurements for the parent.

    Parameters
    ----------
    W : numpy.ndarray of shape (k, n_genes)
    Vs : list of numpy.ndarray of shape (k, n_genes), one per dataset
    Hs : list of numpy.ndarray of shape (n_cells_i, k), one per dataset
    meter : FitMeter
        The meter that wrapped the timed region.
    meta : dict
        JSON-serialisable extras (tool version, split timings, notes).
    """
    meta = dict(meta)
    meta.update(
        fit_s=meter.seconds,
        rss_before_kb=meter.rss_before_kb,
        peak_rss_fit_kb=meter.peak_kb,
        peak_reset=meter.peak_reset,
        maxrss_process_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    arrays = {"W": np.asarray(W, dtype=np.float64)}
    for i, (V, H) in enumerate(zip(Vs, Hs, strict=True)):
        arrays[f"V{i}"] = np.asarray(V, dtype=np.float64)
        arrays[f"H{i}"] = np.asarray(H, dtype=np.float64)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
