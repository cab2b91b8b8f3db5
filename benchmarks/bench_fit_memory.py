"""Peak RSS and wall time of ``onlinemf fit`` (a subprocess per file), to check memory does not grow with cells.

For each FILE it runs::

    onlinemf fit FILE --batch-key batch --no-umap --no-cluster -o OUT --model MODEL --quiet

and takes that child's own peak RSS from ``os.wait4`` (its ``ru_maxrss``), wall time, and the per-phase timings
the fit stores in the results (``uns['inmf']['timings']``). ``--trace`` instead runs ``pipelines.fit`` in a
child that samples its RSS every 0.1 s and reports the peak per phase (preprocess, factorize, final H, the
write that follows), to find where memory goes. Outputs go to ``benchmarks/_work/`` and are removed unless
``--keep``.

    .venv/bin/python benchmarks/bench_fit_memory.py benchmarks/_work/big_100k.h5ad benchmarks/_work/big_1m.h5ad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_stream import _rss_mb  # same folder: the script's own directory is on sys.path

WORK = Path(__file__).resolve().parent / "_work"


def onlinemf_command() -> list[str]:
    script = Path(sys.executable).with_name("onlinemf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onlinemf"]


def read_timings(results) -> dict:
    import h5py

    with h5py.File(results, "r") as f:
        group = f.get("uns/inmf/timings")
        return {} if group is None else {k: float(group[k][()]) for k in group}


def run_fit(path: Path, extra: list[str], keep: bool) -> dict:
    out, model = WORK / f"fitmem_{path.stem}.h5ad", WORK / f"fitmem_{path.stem}_model.h5"
    for p in (out, model):
        p.unlink(missing_ok=True)
    cmd = [*onlinemf_command(), "fit", str(path), "--batch-key", "batch", "--no-umap", "--no-cluster",
           "-o", str(out), "--model", str(model), "--quiet", *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over every child so far).
    # Drain the pipes in threads so a chatty child cannot block on a full pipe.
    captured = {}
    readers = [threading.Thread(target=lambda k=k, s=s: captured.__setitem__(k, s.read()))
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{captured['err'][-3000:]}")
    result = {"file": str(path), "command": " ".join(cmd), "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024,
              "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "timings": read_timings(out),
              "results_mb": out.stat().st_size / 1e6}
    if not keep:
        out.unlink(missing_ok=True)
        model.unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------- --trace: RSS per phase, in-process


def child_trace(path: str, extra: list[str]) -> dict:
    from onlinemf import pipelines
    from onlinemf._progress import NullProgress

    state = {"phase": "open", "peaks": {}, "stop": False}

    def sample():
        while not state["stop"]:
            phase = state["phase"]
            state["peaks"][phase] = max(state["peaks"].get(phase, 0.0), _rss_mb())
            time.sleep(0.1)

    class Phase:
        def __init__(self, desc):
            self.desc, self.bar = desc, NullProgress()

        def __enter__(self):
            state["phase"] = self.desc
            return self.bar

        def __exit__(self, *exc):
            state["phase"] = f"after {self.desc}"
            return False

    def factory(total=None, desc="", unit="it"):
        return Phase(desc)

    def phased(func, desc):
        def wrapper(*args, **kwargs):
            state["phase"] = desc
            try:
                return func(*args, **kwargs)
            finally:
                state["phase"] = f"after {desc}"

        return wrapper

    # Steps after the final H report no progress: mark them by wrapping what the pipeline calls.
    pipelines.save_model = phased(pipelines.save_model, "save model")
    pipelines.ResultsTable.from_sources = phased(pipelines.ResultsTable.from_sources, "read obs")
    pipelines.align_cluster_embed = phased(pipelines.align_cluster_embed, "quantile_norm")
    pipelines.write_results = phased(pipelines.write_results, "write results")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    epochs = int(extra[extra.index("--epochs") + 1]) if "--epochs" in extra else 5
    params, reading = pipelines.ModelParams(epochs=epochs), pipelines.InputOptions(batch_key="batch")
    outputs = pipelines.OutputOptions(cluster=False, umap=False)
    out, model = WORK / f"trace_{Path(path).stem}.h5ad", WORK / f"trace_{Path(path).stem}_model.h5"
    t = time.perf_counter()
    try:
        summary = pipelines.fit([path], output=out, model=model, params=params, reading=reading, outputs=outputs,
                                progress=factory)
    finally:
        state["stop"] = True
        sampler.join()
        out.unlink(missing_ok=True)
        model.unlink(missing_ok=True)
    import resource

    return {"file": path, "wall_s": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phase_peak_rss_mb": state["peaks"], "timings": summary.timings}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-trace":
        print(json.dumps(child_trace(argv[1], argv[2:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--epochs", type=int, default=None, help="Pass --epochs to the fit (default: the CLI's 5).")
    parser.add_argument("--trace", action="store_true", help="Peak RSS per phase (in-process fit in a child).")
    parser.add_argument("--keep", action="store_true", help="Keep the results and model files.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw figures here.")
    args = parser.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    extra = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    results = []
    for path in args.files:
        if args.trace:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child-trace", str(path), *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"trace of {path} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            phases = ", ".join(f"{k} {v:,.0f}" for k, v in r["phase_peak_rss_mb"].items())
            print(f"{path}: wall {r['wall_s']:.1f} s, peak RSS {r['peak_mb']:,.0f} MB; peak RSS per phase (MB): {phases}")
        else:
            r = run_fit(path, extra, args.keep)
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
            print(f"{path}: wall {r['wall_s']:.1f} s (user {r['user_s']:.0f} s, sys {r['sys_s']:.0f} s), "
                  f"peak RSS {r['peak_mb']:,.0f} MB; results file {r['results_mb']:,.0f} MB; timings: {phases}")
        print(f"  {r.get('command', 'pipelines.fit (trace)')}", flush=True)
        results.append(r)
    if len(results) > 1:
        small, big = min(results, key=lambda r: _cells(r["file"])), max(results, key=lambda r: _cells(r["file"]))
        ratio = big["peak_mb"] / small["peak_mb"]
        print(f"peak RSS ratio {Path(big['file']).name} / {Path(small['file']).name}: {ratio:.2f} (target <= 1.2)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def _cells(path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][0])


if __name__ == "__main__":
    main()
