"""Streaming throughput and peak memory of one preprocessing pass, beside ``anndata.read_h5ad``.

Each measurement runs in a fresh subprocess (so peak RSS is its own):

* ``stream``: ``open_sources(FILE, batch_key="batch")``, ``prepare(...)`` (the statistics pass, as the fit
  does it but without a cache), then one pass reading every prepared block;
* ``read_h5ad``: ``anndata.read_h5ad(FILE)`` of the whole file.

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess, also sampled after each phase.

    .venv/bin/python benchmarks/bench_stream.py benchmarks/_work/big_100k.h5ad benchmarks/_work/big_1m.h5ad
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_stream(path: str, block_size: int) -> dict:
    import numpy as np  # noqa: F401  (imported before the baseline, like the library's own imports)

    from onlinemf.preprocess import prepare
    from onlinemf.readers import open_sources

    out = {"mode": "stream", "rss_after_import_mb": _rss_mb(), "peak_after_import_mb": _peak_mb()}
    t = time.perf_counter()
    sources = open_sources([path], batch_key="batch")
    out.update(open_s=time.perf_counter() - t, peak_after_open_mb=_peak_mb(), rss_after_open_mb=_rss_mb())
    out["datasets"] = {s.name: s.n_cells for s in sources}
    t = time.perf_counter()
    prepared = prepare(sources, block_size=block_size, cache=None)
    out.update(stats_pass_s=time.perf_counter() - t, peak_after_stats_mb=_peak_mb(), rss_after_stats_mb=_rss_mb())
    out["n_genes_selected"] = len(prepared.genes)
    t = time.perf_counter()
    nnz = 0
    for src in prepared.sources:
        for _, _, block in src.iter_blocks(block_size):
            nnz += block.nnz
    out.update(prepared_pass_s=time.perf_counter() - t, prepared_nnz=nnz)
    out.update(peak_mb=_peak_mb(), rss_end_mb=_rss_mb())
    prepared.close()
    for s in sources:
        s.close()
    return out


def child_read_h5ad(path: str) -> dict:
    import anndata as ad

    out = {"mode": "read_h5ad", "peak_after_import_mb": _peak_mb()}
    t = time.perf_counter()
    adata = ad.read_h5ad(path)
    out.update(read_s=time.perf_counter() - t, peak_mb=_peak_mb(), n_cells=adata.n_obs)
    return out


def x_bytes(path) -> tuple[int, int, int, int]:
    """(n_cells, nnz, stored bytes, uncompressed bytes) of the file's CSR ``X``."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["X"]
        parts = [group[k] for k in ("data", "indices", "indptr")]
        stored = sum(d.id.get_storage_size() for d in parts)
        raw = sum(d.size * d.dtype.itemsize for d in parts)
        return int(group.attrs["shape"][0]), int(group["data"].shape[0]), int(stored), int(raw)


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(path: Path, block_size: int, *, with_read_h5ad: bool = True) -> dict:
    n_cells, nnz, stored, raw = x_bytes(path)
    result = {"file": str(path), "n_cells": n_cells, "nnz": nnz, "x_stored_mb": stored / 1e6, "x_raw_mb": raw / 1e6,
              "block_size": block_size, "stream": run_child(["stream", str(path), str(block_size)])}
    if with_read_h5ad:
        result["read_h5ad"] = run_child(["read_h5ad", str(path)])
    return result


def report(r: dict) -> str:
    s = r["stream"]
    n = r["n_cells"]
    lines = [f"{r['file']}: {n:,} cells, {r['nnz']:,} non-zeros, X {r['x_stored_mb']:,.0f} MB stored / "
             f"{r['x_raw_mb']:,.0f} MB uncompressed; datasets {s['datasets']}; {s['n_genes_selected']} genes selected"]
    for label, key in (("stats pass (prepare)", "stats_pass_s"), ("prepared-block pass", "prepared_pass_s")):
        sec = s[key]
        lines.append(f"  {label:22s} {sec:7.1f} s  {n / sec:10,.0f} cells/s  {r['x_stored_mb'] / sec:7.1f} MB/s stored  "
                     f"{r['x_raw_mb'] / sec:7.1f} MB/s uncompressed")
    lines.append(f"  stream peak RSS {s['peak_mb']:,.0f} MB (after import {s['peak_after_import_mb']:,.0f}, open "
                 f"{s['peak_after_open_mb']:,.0f}, stats {s['peak_after_stats_mb']:,.0f}); RSS at end {s['rss_end_mb']:,.0f} MB")
    if "read_h5ad" in r:
        h = r["read_h5ad"]
        lines.append(f"  anndata.read_h5ad       {h['read_s']:7.1f} s  peak RSS {h['peak_mb']:,.0f} MB "
                     f"(after import {h['peak_after_import_mb']:,.0f})")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        mode, path, *rest = argv[1:]
        out = child_stream(path, int(rest[0])) if mode == "stream" else child_read_h5ad(path)
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--block-size", type=int, default=20000)
    parser.add_argument("--no-read-h5ad", action="store_true", help="Skip the whole-file anndata.read_h5ad measurement.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw figures here.")
    args = parser.parse_args(argv)
    results = []
    for path in args.files:
        results.append(measure(path, args.block_size, with_read_h5ad=not args.no_read_h5ad))
        print(report(results[-1]), flush=True)
    if len(results) > 1:
        small, big = min(results, key=lambda r: r["n_cells"]), max(results, key=lambda r: r["n_cells"])
        extra = big["n_cells"] - small["n_cells"]
        growth = big["stream"]["peak_mb"] - small["stream"]["peak_mb"]
        print(f"stream peak RSS growth {small['n_cells']:,} -> {big['n_cells']:,} cells: {growth:+,.0f} MB "
              f"({growth * 1e6 / max(extra, 1):+.1f} bytes per extra cell)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
