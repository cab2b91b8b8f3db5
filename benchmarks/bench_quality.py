"""Integration quality: onlinemf vs pyliger 0.2.4, each running its own full pipeline.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/bench_quality.py                  # 3 datasets, seeds 1 2 3
    .venv/bin/python benchmarks/bench_quality.py --datasets cellbench5 --seeds 1
    .venv/bin/python benchmarks/bench_quality.py --seeds 1 2 3 --pyliger-from benchmarks/_work/quality_results.json

Per dataset and seed, two pipelines with the same k=20, lam=5, 5 epochs and the same mini-batch:

* onlinemf: ``onlinemf.tl.integrate`` (library-size normalisation, rliger gene selection, RMS
  scaling, online iNMF, quantile normalisation, Leiden), in this process;
* pyliger: ``create_liger``/``normalize``/``select_genes``/``scale_not_center``/``online_iNMF``/
  ``quantile_norm``/``louvain_cluster`` in its own venv (``_runners/quality_pyliger.py``);

plus onlinemf at its default mini-batch (5000, capped at the number of cells). Every result is
scored by the same function, :func:`score`, which calls ``onlinemf.metrics`` on the tool's
normalised H: ARI and NMI of its clusters against ``obs['cell_type']`` (when present), LIGER
alignment, and (``--agreement``) LIGER agreement against one shared reference (onlinemf's scaled
data of each batch). Prints a
table of means, then onlinemf minus pyliger paired by seed with its standard error (use many seeds: on
baron the seed moves alignment by ~0.13 sd), and writes ``benchmarks/_work/quality_results.json``. See
``benchmarks/README.md``.

``--pyliger-from REPORT.json`` reuses the pyliger runs of an earlier report: a seed's run is taken
from the ``.npz`` that report names when the file still exists and the settings recorded in it by the
runner (input file, batch key, k, lambda, epochs, mini-batch, var_thresh, resolution, BLAS threads,
seed) and its pyliger version equal this run's; it is scored again with :func:`score`. Every other
seed runs pyliger as usual.

Shared mini-batch: rliger advises a mini-batch no larger than the smallest dataset, and pyliger
silently runs ``floor(n_1 * epochs / b_1)`` iterations, i.e. none at all once the batch exceeds
5x the cells (its factors stay at their random start), so the shared size is
``min(5000, smallest dataset)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
from threadpoolctl import threadpool_limits

from onlinemf import metrics, tl
from onlinemf.preprocess import prepare
from onlinemf.readers import MemorySource

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
RUNNER = BENCH / "_runners" / "quality_pyliger.py"
DATA = Path("/work/shared/data")
DATASETS = {
    "cellbench5": DATA / "cellbench_5cl_celseq2_3plates.h5ad",
    "baron": DATA / "baron_pancreas_cider_xspecies.h5ad",
    "kang": DATA / "kang_ifnb_pyliger.h5ad",
}
BATCH_KEY, LABEL_KEY = "batch", "cell_type"
DEFAULT_BATCH = 5000
# louvain 0.7.1 (what pip picks next to igraph 1.0) aborts inside igraph's C core, so pyliger's
# Louvain needs an igraph 0.10 stack; its online iNMF runs in either venv.
PYLIGER_VENVS = (BENCH / "_venvs" / "pyliger_q", BENCH / "_venvs" / "pyliger")
PYLIGER_REQUIREMENTS = ["pyliger==0.2.4", "setuptools<81", "igraph==0.10.8", "python-igraph==0.10.8",
                        "louvain==0.8.2", "leidenalg==0.10.2"]
# pyliger settings the runner is given explicitly (its defaults), so that they are recorded with each result.
PYLIGER_VAR_THRESH, PYLIGER_RESOLUTION = 0.1, 1.0
LOUVAIN_PROBE = ("import igraph, louvain; g = igraph.Graph.Famous('Zachary'); "
                 "louvain.find_partition(g, louvain.RBConfigurationVertexPartition, seed=1); import pyliger")


# ---------------------------------------------------------------- environment
def pyliger_python() -> Path:
    """Interpreter of a venv whose pyliger can run Louvain; creates ``pyliger_q`` if none can."""
    for venv in PYLIGER_VENVS:
        python = venv / "bin" / "python"
        if python.exists() and subprocess.run([python, "-c", LOUVAIN_PROBE], check=False, capture_output=True).returncode == 0:
            return python
    venv = PYLIGER_VENVS[0]
    print(f"[setup] installing {' '.join(PYLIGER_REQUIREMENTS)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", *PYLIGER_REQUIREMENTS], check=True)
    return python


def pyliger_version(python: Path) -> str:
    out = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('pyliger'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def pyliger_settings(path: Path, batch_size: int, args) -> dict:
    """The runner's settings for one dataset, as it records them in its ``meta['settings']``."""
    return {"input": str(path.resolve()), "batch_key": BATCH_KEY, "k": args.k, "lam": float(args.lam),
            "epochs": args.epochs, "batch_size": batch_size, "var_thresh": PYLIGER_VAR_THRESH,
            "resolution": PYLIGER_RESOLUTION, "threads": args.threads}


def _npz_meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


def reusable_pyliger(report: dict, path: Path, batch_size: int, args, version: str) -> dict[int, Path]:
    """Seed -> ``.npz`` of an earlier report's pyliger run that used exactly this run's settings.

    A run qualifies when it has no error, its ``.npz`` still exists, and the ``meta`` the runner wrote into
    that file has this seed, this pyliger version and these settings (:func:`pyliger_settings`). Files
    from runners older than the ``settings`` record never qualify.
    """
    want = pyliger_settings(path, batch_size, args)
    found: dict[int, Path] = {}
    for entry in report.get("results", []):
        if entry.get("pipeline") != "pyliger" or entry.get("file") != path.name or entry.get("batch_size") != batch_size:
            continue
        for run in entry.get("runs", []):
            seed, npz = run.get("seed"), run.get("npz")
            if "error" in run or seed not in args.seeds or not npz or not Path(npz).is_file():
                continue
            meta = _npz_meta(Path(npz))
            if meta.get("seed") == seed and meta.get("version") == version and meta.get("settings") == want:
                found[seed] = Path(npz)
    return found


# ---------------------------------------------------------------- scoring
def score(H_norm, datasets, clusters, labels, *, seed: int, agreement_ref=None) -> dict:
    """The one scoring function applied to every tool's output (``onlinemf.metrics``).

    Parameters
    ----------
    H_norm : array of shape (n_cells, K)
    datasets, clusters : arrays of shape (n_cells,)
    labels : array of shape (n_cells,) of str, or None
    seed : int
        Seed of the alignment's down-sampling (the same for every tool at a given seed).
    agreement_ref : tuple (names, list of matrices) or None
        Scaled data per dataset, rows in the order of that dataset's cells in ``H_norm``.
    """
    H_norm = np.asarray(H_norm, dtype=np.float64)
    datasets = np.asarray(datasets).astype(str)
    clusters = np.asarray(clusters).astype(str)
    out = {"n_clusters": int(np.unique(clusters).size),
           "alignment": metrics.alignment(H_norm, datasets, random_state=seed)}
    if labels is not None:
        out["ari"] = metrics.ari(labels, clusters)
        out["nmi"] = metrics.nmi(labels, clusters)
    if agreement_ref is not None:
        names, scaled = agreement_ref
        out["agreement"] = metrics.agreement(H_norm, datasets, dict(zip(names, scaled, strict=True)),
                                             random_state=seed)
    return out


def agreement_reference(adata, genes=None):
    """Scaled data per batch (onlinemf's preprocessing), the common reference of ``agreement``."""
    values = adata.obs[BATCH_KEY].astype(str).to_numpy()
    names = [str(c) for c in adata.obs[BATCH_KEY].astype("category").cat.categories]
    rows = [np.flatnonzero(values == n) for n in names]
    sources = [MemorySource(adata.X[r], name=n, var_names=adata.var_names) for n, r in zip(names, rows, strict=True)]
    prepared = prepare(sources, genes=genes)
    try:
        scaled = [src.read_block(0, src.n_cells) for src in prepared.sources]
    finally:
        prepared.close()
    return names, rows, scaled


def _agreement_for(order, ref):
    """Restrict and reorder the reference to the cells present in a result (order = row indices)."""
    if ref is None:
        return None
    names, rows, scaled = ref
    position = {int(c): i for i, c in enumerate(order)}
    kept_names, kept_scaled, result_rows = [], [], []
    for name, r, X in zip(names, rows, scaled, strict=True):
        present = [j for j, c in enumerate(r) if int(c) in position]
        kept_names.append(name)
        kept_scaled.append(X[present])
        result_rows.append([position[int(r[j])] for j in present])
    return kept_names, kept_scaled, np.concatenate(result_rows)


# ---------------------------------------------------------------- runs
def run_onlinemf(adata, batch_size: int, seed: int, labels, ref, args) -> dict:
    work = adata.copy()
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        est = tl.integrate(work, BATCH_KEY, k=args.k, lam=args.lam, epochs=args.epochs, batch_size=batch_size,
                           seed=seed, return_model=True)
    seconds = time.perf_counter() - t0
    H_norm = work.obsm["X_inmf_norm"]
    datasets = work.obs[BATCH_KEY].astype(str).to_numpy()
    clusters = work.obs["inmf_cluster"].to_numpy()
    agree = None
    if ref is not None:
        names, rows, scaled = ref
        agree = (names, scaled)
        order = np.concatenate(rows)
        H_norm, datasets, clusters = H_norm[order], datasets[order], clusters[order]
        labels = None if labels is None else labels[order]
    rec = score(H_norm, datasets, clusters, labels, seed=seed, agreement_ref=agree)
    rec.update(seconds=seconds, n_iterations=int(est.n_steps_), n_genes=int(work.uns["inmf"]["params"]["n_genes_selected"]))
    return rec


def run_pyliger(python: Path, path: Path, adata, batch_size: int, labels, ref, args,
                reuse: dict[int, Path] | None = None) -> list[dict]:
    """pyliger's pipeline for every seed not in ``reuse`` in one subprocess; each result scored by :func:`score`."""
    reuse = reuse or {}
    stem = f"pyliger_{path.stem}_k{args.k}_lam{args.lam:g}_e{args.epochs}_b{batch_size}_t{args.threads}"
    pattern = WORK / "quality" / f"{stem}_s{{seed}}.npz"
    pattern.parent.mkdir(parents=True, exist_ok=True)
    log = WORK / "quality" / f"{stem}.log"
    todo = [seed for seed in args.seeds if seed not in reuse]
    returncode = 0
    if todo:
        cmd = [str(python), str(RUNNER), "--input", str(path), "--output", str(pattern), "--batch-key", BATCH_KEY,
               "--seeds", *map(str, todo), "--k", str(args.k), "--lam", str(args.lam),
               "--epochs", str(args.epochs), "--batch-size", str(batch_size), "--threads", str(args.threads),
               "--var-thresh", str(PYLIGER_VAR_THRESH), "--resolution", str(PYLIGER_RESOLUTION)]
        with open(log, "w") as fh:
            returncode = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT).returncode
    records = []
    for seed in args.seeds:
        out = reuse.get(seed, Path(str(pattern).replace("{seed}", str(seed))))
        if seed not in reuse and (returncode != 0 or not out.exists()):
            records.append({"error": f"exit {returncode}, see {log}"})
            continue
        with np.load(out, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            obs_names, H_norm, datasets, clusters = z["obs_names"], z["H_norm"], z["datasets"], z["clusters"]
        rows = adata.obs_names.get_indexer(obs_names)
        lab = None if labels is None else labels[rows]
        agree = _agreement_for(rows, ref)
        if agree is not None:
            names, scaled, order = agree
            H_norm, datasets, clusters = H_norm[order], datasets[order], clusters[order]
            lab = None if lab is None else lab[order]
            agree = (names, scaled)
        rec = score(H_norm, datasets, clusters, lab, seed=seed, agreement_ref=agree)
        rec.update(seconds=sum(meta["timings"].values()), n_iterations=meta["n_iterations"],
                   n_genes=meta["n_genes_selected"], n_cells_kept=len(obs_names),
                   npz=str(out), reused=seed in reuse)
        records.append(rec)
    return records


def summarise(runs: list[dict]) -> dict:
    """Mean and sample sd of every numeric field over seeds (errors are kept as they are)."""
    ok = [r for r in runs if "error" not in r]
    out = {"n_runs": len(ok)}
    for key in ok[0] if ok else []:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def print_table(rows: list[dict]) -> None:
    def cell(s, key, digits=3):
        if key not in s:
            return "-"
        return f"{s[key]['mean']:.{digits}f}±{s[key]['sd']:.{digits}f}"

    head = f"{'dataset':<11} {'pipeline':<17} {'batch':>5} {'iters':>5} {'genes':>6} {'clust':>5} " \
           f"{'ARI':>12} {'NMI':>12} {'alignment':>12} {'agreement':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r["summary"]
        n_iter = f"{s['n_iterations']['mean']:.0f}" if "n_iterations" in s else "-"
        genes = f"{s['n_genes']['mean']:.0f}" if "n_genes" in s else "-"
        clust = f"{s['n_clusters']['mean']:.1f}" if "n_clusters" in s else "-"
        print(f"{r['dataset']:<11} {r['pipeline']:<17} {r['batch_size']:>5} {n_iter:>5} {genes:>6} {clust:>5} "
              f"{cell(s, 'ari'):>12} {cell(s, 'nmi'):>12} {cell(s, 'alignment'):>12} {cell(s, 'agreement'):>12}")


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per dataset and metric: onlinemf minus pyliger at the shared mini-batch, paired by seed.

    The seed moves every metric more than the tool does (alignment sd ~0.1 on baron), so the
    difference is judged against its standard error over seeds, not against one run.
    """
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by_pipe = {r["pipeline"]: {run["seed"]: run for run in r["runs"] if "error" not in run}
                   for r in rows if r["dataset"] == name}
        ours, theirs = by_pipe.get("onlinemf", {}), by_pipe.get("pyliger", {})
        seeds = sorted(set(ours) & set(theirs))
        for metric in ("ari", "nmi", "alignment", "agreement"):
            d = np.array([ours[s][metric] - theirs[s][metric] for s in seeds
                          if isinstance(ours[s].get(metric), float) and isinstance(theirs[s].get(metric), float)])
            if d.size < 2:
                continue
            se = float(d.std(ddof=1) / np.sqrt(d.size))
            out.append({"dataset": name, "metric": metric, "n_seeds": int(d.size), "mean_diff": float(d.mean()),
                        "se": se, "diff_over_se": float(d.mean() / se) if se > 0 else 0.0})
    return out


def print_paired(diffs: list[dict]) -> None:
    print(f"{'dataset':<11} {'metric':<10} {'seeds':>5} {'onlinemf - pyliger':>19} {'SE':>7} {'diff/SE':>8}")
    for d in diffs:
        print(f"{d['dataset']:<11} {d['metric']:<10} {d['n_seeds']:>5} {d['mean_diff']:>+19.3f} {d['se']:>7.3f} "
              f"{d['diff_over_se']:>+8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--lam", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--agreement", action="store_true",
                   help="add LIGER agreement (slow: one scikit-learn NMF per dataset and run, ~2 min on cellbench5)")
    p.add_argument("--output", type=Path, default=WORK / "quality_results.json")
    p.add_argument("--pyliger-from", type=Path, metavar="REPORT.json",
                   help="reuse this earlier report's pyliger runs (its .npz files) where their recorded settings, "
                        "seed and pyliger version equal this run's; other seeds run pyliger")
    p.add_argument("--no-pyliger", action="store_true",
                   help="run onlinemf only (e.g. to compare two versions of onlinemf seed by seed)")
    args = p.parse_args()
    earlier = None
    if args.pyliger_from is not None:
        try:
            earlier = json.loads(args.pyliger_from.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--pyliger-from: expected a report written by this script, found {exc}")
    python = None if args.no_pyliger else pyliger_python()
    version = None if python is None else pyliger_version(python)
    report = {"machine": {"python": sys.version.split()[0], "platform": platform.platform()},
              "params": {"k": args.k, "lam": args.lam, "epochs": args.epochs, "threads": args.threads,
                         "seeds": args.seeds}, "pyliger_version": version, "results": []}
    for name in args.datasets:
        path = DATASETS[name]
        adata = ad.read_h5ad(path)
        labels = adata.obs[LABEL_KEY].astype(str).to_numpy() if LABEL_KEY in adata.obs else None
        sizes = adata.obs[BATCH_KEY].value_counts()
        shared = int(min(DEFAULT_BATCH, sizes.min()))
        ref = agreement_reference(adata) if args.agreement else None
        pipelines = [("onlinemf", shared)] + ([] if args.no_pyliger else [("pyliger", shared)])
        if shared != DEFAULT_BATCH:
            pipelines.append(("onlinemf default", DEFAULT_BATCH))
        for pipeline, batch in pipelines:
            if pipeline == "pyliger":
                reuse = {} if earlier is None else reusable_pyliger(earlier, path, batch, args, version)
                if earlier is not None:
                    print(f"[reuse] {name} pyliger batch {batch}: {len(reuse)} of {len(args.seeds)} seeds from "
                          f"{args.pyliger_from}", flush=True)
                runs = run_pyliger(python, path, adata, batch, labels, ref, args, reuse)
            else:
                runs = [run_onlinemf(adata, batch, seed, labels, ref, args) for seed in args.seeds]
            for seed, rec in zip(args.seeds, runs, strict=True):
                rec["seed"] = seed
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k != "npz"}
                print(f"[run] {name} {pipeline} batch {batch} seed {seed}: {shown}", flush=True)
            report["results"].append({"dataset": name, "file": path.name, "pipeline": pipeline, "batch_size": batch,
                                      "n_cells": {str(k): int(v) for k, v in sizes.items()},
                                      "runs": runs, "summary": summarise(runs)})
    print()
    print_table(report["results"])
    report["paired"] = paired_differences(report["results"])
    print()
    print_paired(report["paired"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
