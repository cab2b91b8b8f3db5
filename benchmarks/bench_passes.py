"""Statistics-pass and cache-pass times, before and after, and chunk-decoding throughput.

``passes``: each measurement is a fresh subprocess that runs what ``onlinemf fit`` runs before the
factorization: ``open_sources(FILE, batch_key="batch")``, ``prepare(..., cache="disk")`` (the
statistics pass) and ``build_caches`` (the cache pass), timing both. ``--code DIR`` runs the same
child against another checkout of the package (e.g. the commit before the change, unpacked with
``git archive``), so before and after alternate within one run; medians of ``--repeat`` runs.

``decode``: reads ``X/data`` and ``X/indices`` of each file whole, with plain h5py and with the
threaded decoder at 1 and 2 threads, alternately, in one process; medians.

    git archive 85afb2b onlinemf | tar -x -C /tmp/before
    git archive HEAD onlinemf | tar -x -C /tmp/after
    .venv/bin/python benchmarks/bench_passes.py passes FILES... --code /tmp/before --after /tmp/after --repeat 3
    .venv/bin/python benchmarks/bench_passes.py decode FILES... --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_passes(path: str, block_size: int, threads: int) -> dict:
    import resource

    from onlinemf._prepared import build_caches
    from onlinemf.preprocess import prepare
    from onlinemf.readers import open_sources

    try:
        from onlinemf.readers._decode import set_read_threads
    except ImportError:  # the code before the threaded decoder
        import contextlib

        def set_read_threads(_threads):
            return contextlib.nullcontext()

    with set_read_threads(threads or None):
        sources = open_sources([path], batch_key="batch")
        t0 = time.perf_counter()
        prepared = prepare(sources, block_size=block_size, cache="disk")
        t1 = time.perf_counter()
        build_caches(prepared.sources, block_size=block_size)
        t2 = time.perf_counter()
        nnz = sum(p.read_block(0, min(p.n_cells, 10)).nnz for p in prepared.sources)  # the cache answers
        prepared.close()
        for s in sources:
            s.close()
    import onlinemf
    return {"code": onlinemf.__file__, "stats_s": t1 - t0, "cache_s": t2 - t1, "genes": len(prepared.genes), "check_nnz": nnz,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(code: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def passes(files: list[Path], codes: dict[str, Path], block_size: int, threads: int, repeat: int) -> None:
    print(f"block_size {block_size}, decoding threads {threads or 'all usable cores'}, medians of {repeat} runs "
          f"(code versions alternate within each repeat)")
    print(f"{'file':36s} {'code':8s} {'stats s':>8s} {'cache s':>8s} {'sum s':>7s} {'peak MB':>8s}  genes")
    for path in files:
        runs: dict[str, list[dict]] = {label: [] for label in codes}
        for _ in range(repeat):
            for label, code in codes.items():
                runs[label].append(run_child(code, ["passes", str(path), str(block_size), str(threads)]))
        for label, results in runs.items():
            stats_s = statistics.median(r["stats_s"] for r in results)
            cache_s = statistics.median(r["cache_s"] for r in results)
            peak = max(r["peak_mb"] for r in results)
            print(f"{path.name:36s} {label:8s} {stats_s:8.2f} {cache_s:8.2f} {stats_s + cache_s:7.2f} {peak:8.0f}  "
                  f"{results[0]['genes']}", flush=True)


def decode(files: list[Path], repeat: int) -> None:
    import h5py

    from onlinemf.readers._decode import read_range

    print(f"whole X/data + X/indices, medians of {repeat} alternating runs")
    print(f"{'file':36s} {'filter':>8s} {'MB':>6s} {'h5py s':>7s} {'1 thr s':>7s} {'2 thr s':>7s}")
    for path in files:
        with h5py.File(path, "r") as f:
            parts = [f["X"][k] for k in ("data", "indices")]
            times: dict[str, list[float]] = {"h5py": [], "1": [], "2": []}
            for _ in range(repeat):
                for label, spent in times.items():
                    t = time.perf_counter()
                    for ds in parts:
                        if label == "h5py":
                            ds[:]
                        else:
                            read_range(ds, 0, ds.shape[0], threads=int(label))
                    spent.append(time.perf_counter() - t)
            mb = sum(ds.size * ds.dtype.itemsize for ds in parts) / 1e6
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{path.name:36s} {parts[0].compression or 'none':>8s} {mb:6.0f} {med['h5py']:7.3f} {med['1']:7.3f} "
                  f"{med['2']:7.3f}", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _, path, block_size, threads = argv[1:]
        print(json.dumps(child_passes(path, int(block_size), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["passes", "decode"])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--code", type=Path, default=None, help="Another checkout to compare with ('before').")
    parser.add_argument("--after", type=Path, default=REPO,
                        help="The checkout measured as 'after' (default this one; a `git archive HEAD` copy keeps "
                             "others' uncommitted edits out of a long run).")
    parser.add_argument("--block-size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=0, help="Decoding threads (0: every usable core).")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.mode == "decode":
        decode(args.files, args.repeat)
        return
    codes = {"before": args.code.resolve()} if args.code is not None else {}
    codes["after"] = args.after.resolve()
    passes([p.resolve() for p in args.files], codes, args.block_size, args.threads, args.repeat)


if __name__ == "__main__":
    main()
