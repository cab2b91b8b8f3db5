"""Engine benchmark: onlinemf vs pyliger 0.2.4 vs pyplanc online iNMF on the same data.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/bench_engine.py                      # Kang, 3 seeds, 1 thread
    .venv/bin/python benchmarks/bench_engine.py --scale 1 10 --threads 1 2

Steps: install pyliger and pyplanc into their own venvs under
``benchmarks/_venvs/`` (once), prepare the data once in this process (library-size
normalisation, rliger variable genes, RMS scaling per dataset), write it to
``benchmarks/_work/``, run every tool in its own subprocess
(``benchmarks/_runners/run_<tool>.py``), then score every result with one
shared float64 objective. Prints a table and writes
``benchmarks/_work/engine_results.json``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.stats import norm

BENCH = Path(__file__).resolve().parent
RUNNERS = BENCH / "_runners"
VENVS = BENCH / "_venvs"
WORK = BENCH / "_work"
DEFAULT_DATA = Path("/work/shared/data/kang_ifnb_pyliger.h5ad")
# Tools other than onlinemf live in their own venv: name -> (pip requirements, import check).
# pyliger's dependency h5sparse imports pkg_resources, which setuptools >= 81 no longer ships.
VENV_TOOLS = {
    "pyliger": (["pyliger==0.2.4", "setuptools<81"],
                "import importlib.metadata as m, h5sparse; assert m.version('pyliger') == '0.2.4'"),
    "pyplanc": (["pyplanc==0.0.2"], "import pyplanc"),
}
TOOLS = ("onlinemf", "pyliger", "pyplanc")


# ---------------------------------------------------------------- environments
def tool_python(tool: str) -> Path:
    """Interpreter that runs ``tool``'s runner."""
    if tool == "onlinemf":
        return Path(sys.executable)
    return VENVS / tool / "bin" / "python"


def ensure_venv(tool: str) -> None:
    """Create ``benchmarks/_venvs/<tool>`` and pip-install the pinned package if missing."""
    requirements, probe_code = VENV_TOOLS[tool]
    python = tool_python(tool)
    if python.exists():
        probe = subprocess.run([python, "-c", probe_code], capture_output=True)
        if probe.returncode == 0:
            return
    print(f"[setup] installing {' '.join(requirements)} into {VENVS / tool}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENVS / tool], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *requirements], check=True)


# ---------------------------------------------------------------- data
def load_counts(path: Path, batch_key: str) -> tuple[list[str], list[sp.csr_matrix], np.ndarray]:
    """Raw counts split by ``obs[batch_key]``: names, CSR (cells x genes) per batch, gene names."""
    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    batches = adata.obs[batch_key].astype("category")
    names = [str(c) for c in batches.cat.categories]
    counts = [X[np.flatnonzero((batches == c).to_numpy())] for c in batches.cat.categories]
    return names, counts, np.asarray(adata.var_names, dtype=str)


def resample(counts: list[sp.csr_matrix], scale: int, seed: int) -> list[sp.csr_matrix]:
    """``scale`` times as many cells per batch, drawn with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    return [X[rng.integers(0, X.shape[0], size=scale * X.shape[0])] for X in counts]


def select_genes(normed: sp.csr_matrix, lib: np.ndarray, thresh: float, alpha: float) -> np.ndarray:
    """rliger's variance selection on library-normalised data; boolean mask (n_genes,)."""
    n_cells, n_genes = normed.shape
    mean = np.asarray(normed.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(normed.multiply(normed).sum(axis=0), dtype=np.float64).ravel()
    var = (sq - n_cells * mean**2) / (n_cells - 1)
    nu = float(np.mean(1.0 / lib))
    z = float(norm.ppf(1 - alpha / n_genes / 2))  # alpha corrected for n_genes tests
    upper = mean + z * np.sqrt(mean * nu / n_cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (var / nu > upper) & (np.log10(var) > np.log10(mean * nu) + thresh)
    return keep


def prepare_scipy(
    counts: list[sp.csr_matrix], genes: np.ndarray | None = None, thresh: float = 0.1, alpha: float = 0.99
) -> tuple[np.ndarray, list[sp.csr_matrix]]:
    """rliger recipe: normalise by library size, union of variable genes, RMS-scale per dataset.

    ``genes`` (column indices) skips the selection. Returns the gene indices used and, per
    dataset, a float32 CSR (cells x selected genes).
    """
    normed, keep = [], None
    for X in counts:
        lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        if np.any(lib == 0):
            msg = f"prepare: expected no empty cells, found {int(np.sum(lib == 0))}"
            raise ValueError(msg)
        N = sp.csr_matrix(sp.diags(1.0 / lib) @ X.astype(np.float64))
        normed.append(N)
        if genes is None:
            mask = select_genes(N, lib, thresh, alpha)
            keep = mask if keep is None else keep | mask
    if genes is None:
        genes = np.flatnonzero(keep)
    scaled = []
    for N in normed:
        sub = N[:, genes]
        rms = np.sqrt(np.asarray(sub.multiply(sub).sum(axis=0)).ravel() / (sub.shape[0] - 1))
        inv = np.divide(1.0, rms, out=np.zeros_like(rms), where=rms > 0)  # NaN -> 0 as rliger
        scaled.append(sp.csr_matrix(sub @ sp.diags(inv), dtype=np.float32))
    return genes, scaled


def prepare_onlinemf(names: list[str], counts: list[sp.csr_matrix], gene_names: np.ndarray,
                     genes: np.ndarray | None = None) -> tuple[np.ndarray, list[sp.csr_matrix]]:
    """The same recipe through the project's own ``onlinemf.preprocess.prepare``."""
    from onlinemf.preprocess import prepare
    from onlinemf.readers import MemorySource

    sources = [MemorySource(X, name=n, var_names=gene_names) for n, X in zip(names, counts, strict=True)]
    with prepare(sources, genes=genes) as prepared:
        Xs = [src.read_block(0, src.n_cells) for src in prepared.sources]
        return np.asarray(prepared.genes, dtype=str), Xs


def prepare_data(how: str, names: list[str], counts: list[sp.csr_matrix], gene_names: np.ndarray,
                 genes: np.ndarray | None = None) -> tuple[np.ndarray, list[sp.csr_matrix]]:
    """Gene names used (``genes``, or selected) and prepared float32 CSR (cells x genes) per dataset."""
    if how == "onlinemf":
        return prepare_onlinemf(names, counts, gene_names, genes)
    index = None if genes is None else np.flatnonzero(np.isin(gene_names, genes))
    used, Xs = prepare_scipy(counts, index)
    return gene_names[used], Xs


def write_prepared(path: Path, names: list[str], genes: np.ndarray, Xs: list[sp.csr_matrix]) -> None:
    arrays = {"names": np.asarray(names), "genes": np.asarray(genes, dtype=str)}
    for i, X in enumerate(Xs):
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sort_indices()
        arrays.update({f"X{i}_data": X.data, f"X{i}_indices": X.indices,
                       f"X{i}_indptr": X.indptr, f"X{i}_shape": np.asarray(X.shape)})
    np.savez(path, **arrays)


# ---------------------------------------------------------------- scoring
def inmf_objective(Xs: list[sp.csr_matrix], W: np.ndarray, Vs: list[np.ndarray],
                   Hs: list[np.ndarray], lam: float) -> float:
    """sum_i ||X_i - H_i (W + V_i)||_F^2 + lam ||H_i V_i||_F^2, in float64, by trace identities.

    Xs: (n_i, genes) CSR; W, V_i: (k, genes); H_i: (n_i, k). No n_i x genes matrix is formed.
    """
    total = 0.0
    for X, V, H in zip(Xs, Vs, Hs, strict=True):
        X = sp.csr_matrix(X, dtype=np.float64)
        L = W + V
        HtH = H.T @ H
        total += float(X.multiply(X).sum())
        total -= 2.0 * float(np.sum(np.asarray(X @ L.T) * H))
        total += float(np.sum(HtH * (L @ L.T)))
        total += lam * float(np.sum(HtH * (V @ V.T)))
    return total


def load_result(path: Path) -> tuple[dict, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        n = len(meta["datasets"])
        return meta, z["W"], [z[f"V{i}"] for i in range(n)], [z[f"H{i}"] for i in range(n)]


# ---------------------------------------------------------------- running
def run_tool(tool: str, prepared: Path, out: Path, seed: int, threads: int,
             args: argparse.Namespace) -> dict:
    """Run one tool in a subprocess; returns its meta dict or an error record."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [str(tool_python(tool)), str(RUNNERS / f"run_{tool}.py"), "--input", str(prepared),
           "--output", str(out), "--seed", str(seed), "--threads", str(threads), "--k", str(args.k),
           "--lam", str(args.lam), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    log = out.with_suffix(".log")
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                  timeout=args.timeout, cwd=WORK)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"rc={rc}: " + " | ".join(tail), "process_wall_s": wall}
    return {"process_wall_s": wall}


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "objective" in r:
            groups.setdefault((r["scale"], r["threads"], r["tool"]), []).append(r)
    rows = []
    for (scale, threads, tool), rs in sorted(groups.items()):
        rows.append({
            "scale": scale, "threads": threads, "tool": tool, "n_runs": len(rs),
            "fit_s_median": statistics.median(r["fit_s"] for r in rs),
            "fit_s_min": min(r["fit_s"] for r in rs), "fit_s_max": max(r["fit_s"] for r in rs),
            "peak_rss_fit_mb_median": statistics.median(r["peak_rss_fit_mb"] for r in rs),
            "fit_extra_rss_mb_median": statistics.median(r["fit_extra_rss_mb"] for r in rs),
            "objective_median": statistics.median(r["objective"] for r in rs),
            "objective_min": min(r["objective"] for r in rs),
            "objective_max": max(r["objective"] for r in rs),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'scale':>5} {'thr':>3} {'tool':<9} {'n':>2} {'fit s (med)':>11} {'min-max':>15} "
            f"{'peak MB':>8} {'+fit MB':>8} {'objective (med)':>16} {'rel. range':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = (r["objective_max"] - r["objective_min"]) / r["objective_median"]
        print(f"{r['scale']:>5} {r['threads']:>3} {r['tool']:<9} {r['n_runs']:>2} "
              f"{r['fit_s_median']:>11.2f} {r['fit_s_min']:>7.2f}-{r['fit_s_max']:<7.2f} "
              f"{r['peak_rss_fit_mb_median']:>8.0f} {r['fit_extra_rss_mb_median']:>8.0f} "
              f"{r['objective_median']:>16.6e} {spread:>11.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--scale", type=int, nargs="+", default=[1],
                   help="cell multipliers; 10 = resample 10x the cells per batch")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--large-seeds", type=int, nargs="+", default=[1],
                   help="seeds for scales > 1 (pyliger takes minutes per run there)")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--lam", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--prep", choices=("onlinemf", "scipy"), default="onlinemf",
                   help="data preparation: onlinemf.preprocess.prepare, or the scipy copy here "
                        "(identical output on Kang, kept as a cross-check)")
    p.add_argument("--reselect-genes", action="store_true",
                   help="select genes again on resampled data instead of reusing scale 1's")
    p.add_argument("--resample-seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--output", type=Path, default=WORK / "engine_results.json")
    args = p.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    for tool in args.tools:
        if tool in VENV_TOOLS:
            ensure_venv(tool)

    names, counts, gene_names = load_counts(args.data, args.batch_key)
    runs, prepared_info = [], {}
    # Larger scales keep the original data's genes, so only the cell count changes
    # (selecting again on resampled cells admits ~50 % more genes: the test's power grows with n).
    t0 = time.perf_counter()
    base = prepare_data(args.prep, names, counts, gene_names)
    for scale in args.scale:
        if scale == 1:
            genes, Xs = base
        else:
            t0 = time.perf_counter()
            data = resample(counts, scale, args.resample_seed)
            genes, Xs = prepare_data(args.prep, names, data, gene_names,
                                     None if args.reselect_genes else base[0])
            del data
        prepared = WORK / f"prepared_x{scale}.npz"
        write_prepared(prepared, names, genes, Xs)
        prepared_info[scale] = {"cells": [X.shape[0] for X in Xs], "genes": int(len(genes)),
                                "nnz": int(sum(X.nnz for X in Xs)),
                                "prepare_s": time.perf_counter() - t0}
        print(f"[data] x{scale}: {prepared_info[scale]}", flush=True)
        for threads in args.threads:
            for seed in (args.seeds if scale == 1 else args.large_seeds):
                for tool in args.tools:  # interleaved so machine noise hits every tool alike
                    out = WORK / f"result_{tool}_x{scale}_t{threads}_s{seed}.npz"
                    rec = {"tool": tool, "scale": scale, "threads": threads, "seed": seed}
                    rec.update(run_tool(tool, prepared, out, seed, threads, args))
                    if "error" not in rec:
                        meta, W, Vs, Hs = load_result(out)
                        rec.update(meta)
                        rec["objective"] = inmf_objective(Xs, W, Vs, Hs, args.lam)
                        rec["peak_rss_fit_mb"] = meta["peak_rss_fit_kb"] / 1024
                        rec["fit_extra_rss_mb"] = (meta["peak_rss_fit_kb"] - meta["rss_before_kb"]) / 1024
                        rec["min_factor"] = float(min(W.min(), *(V.min() for V in Vs), *(H.min() for H in Hs)))
                    print(f"[run] {tool:<8} x{scale} t{threads} seed {seed}: "
                          + (rec.get("error") or f"{rec['fit_s']:.2f} s, {rec['peak_rss_fit_mb']:.0f} MB, "
                                                  f"objective {rec['objective']:.6e}"), flush=True)
                    runs.append(rec)

    summary = summarise(runs)
    print()
    print_table(summary)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "prepared": prepared_info, "runs": runs, "summary": summary,
    }
    args.output.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
