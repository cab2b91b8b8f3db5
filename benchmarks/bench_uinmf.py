"""Online UINMF vs shared genes only: ARI, NMI and alignment over many seeds, paired by seed.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/bench_uinmf.py                        # 3 cases (block 300 and 6000), seeds 1-30
    .venv/bin/python benchmarks/bench_uinmf.py --cases baron --seeds 1 2 3

Cases (``obs['cell_type']`` is the truth, ``obs['batch']`` the datasets):

* ``cellbench3``: CellBench CEL-seq2 (240 cells) + Drop-seq (210); 13,069 genes have no counts in any Drop-seq
  cell (the file is the union of both gene lists, zeros where a batch lacked a gene), so CEL-seq2 carries its
  variable ones as unshared features (``--unshared CEL-seq2``).
* ``baron``: Baron pancreas, human (175) + mouse (153) in one upper-case symbol space; each species' variable
  genes the other lacks are its unshared features (``--unshared human,mouse``).
* ``cellbench5-block<N>``: constructed. CellBench 5 cell lines on 3 CEL-seq2 plates; the N (``--block``) genes most
  informative of the cell line (largest one-way ANOVA F of log1p library-normalised counts, all cells) are removed
  from plate p3's gene list, so they are not shared; p1 and p2 keep them as unshared features. Also run: the
  intact data, shared genes only (``intact``: what the removal costs).

Per case, the data is prepared once per variant exactly as ``onlinemf fit`` does (rliger normalisation, gene
selection at ``var_thresh`` 0.1, RMS scaling; UINMF adds ``select_unshared_genes`` at ``unshared_thresh`` 0.1): the
shared genes are the same in both variants. Per seed, both variants fit OnlineINMF (k=20, lam=5, 5 epochs,
mini-batch = the smallest dataset, as ``bench_quality.py``) from the same seed, then quantile normalisation and
Leiden (resolution 1) with that seed, scored by ``onlinemf.metrics`` (ARI, NMI vs cell_type; LIGER alignment).
Printed: means, and UINMF minus shared-only paired by seed with its standard error (sd / sqrt(n)). Results go to
``benchmarks/_work/uinmf_results.json``; figures in ``benchmarks/README.md`` ("Online UINMF").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from onlinemf import OnlineINMF, metrics, postprocess
from onlinemf.preprocess import prepare
from onlinemf.readers import MemorySource

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
DATA = Path("/work/shared/data")
CASES = {
    "cellbench3": (DATA / "cellbench_3cl_celseq2_dropseq.h5ad", ["CEL-seq2"]),
    "baron": (DATA / "baron_pancreas_cider_xspecies.h5ad", ["human", "mouse"]),
    "cellbench5-block": (DATA / "cellbench_5cl_celseq2_3plates.h5ad", ["p1", "p2"]),
}
METRICS = ("ari", "nmi", "alignment")


def informative_genes(adata: ad.AnnData, n: int) -> np.ndarray:
    """The ``n`` genes with the largest one-way ANOVA F of log1p(library-normalised counts) across cell types."""
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    X = sp.diags(1e4 / np.maximum(lib, 1)) @ X
    X.data = np.log1p(X.data)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    groups = np.unique(labels)
    mean = np.asarray(X.mean(axis=0)).ravel()
    between = np.zeros(X.shape[1])
    within = np.zeros(X.shape[1])
    for g in groups:
        rows = X[labels == g]
        m = np.asarray(rows.mean(axis=0)).ravel()
        sq = np.asarray(rows.multiply(rows).sum(axis=0)).ravel()
        between += rows.shape[0] * (m - mean) ** 2
        within += sq - rows.shape[0] * m**2
    F = (between / (groups.size - 1)) / np.maximum(within / (X.shape[0] - groups.size), 1e-12)
    return np.asarray(adata.var_names)[np.argsort(-F)[:n]]


def datasets_of(case: str, block: int) -> tuple[list[MemorySource], np.ndarray, np.ndarray, list[str]]:
    """The case's sources (one per batch), each cell's batch and label in source order, and the unshared datasets
    (``block=0``: nothing removed)."""
    path, unshared = CASES[case]
    adata = ad.read_h5ad(path)
    removed = set(informative_genes(adata, block)) if case == "cellbench5-block" and block else set()
    sources, batches, labels = [], [], []
    for b in adata.obs["batch"].cat.categories:
        part = adata[adata.obs["batch"] == b]
        keep = ~np.isin(part.var_names, list(removed)) if b == "p3" else np.ones(part.n_vars, dtype=bool)
        sources.append(MemorySource(sp.csr_matrix(part.X)[:, keep], name=str(b),
                                    var_names=np.asarray(part.var_names)[keep]))
        batches.append(np.full(part.n_obs, str(b)))
        labels.append(part.obs["cell_type"].astype(str).to_numpy())
    return sources, np.concatenate(batches), np.concatenate(labels), unshared


def run(prepared, unshared: dict, batches, labels, seed: int, batch_size: int) -> dict:
    est = OnlineINMF(20, lam=5.0, batch_size=batch_size, max_epochs=5, random_state=seed, n_threads=1)
    est.fit(prepared.sources, unshared=unshared)
    H = np.vstack([est.transform_source(s, dataset=s.name)[0] for s in prepared.sources])
    H_norm, _ = postprocess.quantile_norm(H, batches, random_state=seed)
    clusters = postprocess.cluster_leiden(H_norm, resolution=1.0, random_state=seed)
    return {"seed": seed, "ari": metrics.ari(labels, clusters), "nmi": metrics.nmi(labels, clusters),
            "alignment": metrics.alignment(H_norm, batches, random_state=seed),
            "n_clusters": int(np.unique(clusters).size)}


def paired(a: list[dict], b: list[dict], key: str) -> tuple[float, float]:
    """Mean of b - a over seeds and its standard error."""
    diffs = [y[key] - x[key] for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(1, 31)))
    ap.add_argument("--block", nargs="+", type=int, default=[300, 6000],
                    help="informative genes removed from p3 (cellbench5-block: one run per value)")
    ap.add_argument("--unshared-thresh", type=float, default=0.1, help="variance threshold of the unshared genes")
    ap.add_argument("--out", default="uinmf_results.json", help="file name under benchmarks/_work")
    args = ap.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    out = {"python": sys.version.split()[0], "machine": platform.machine(), "seeds": args.seeds,
           "block": args.block, "unshared_thresh": args.unshared_thresh, "cases": {}}
    with threadpool_limits(limits=1):
        todo = [(c, b) for c in args.cases for b in (args.block if c == "cellbench5-block" else [0])]
        for case, block in todo:
            t0 = time.perf_counter()
            sources, batches, labels, named = datasets_of(case, block)
            batch_size = min(s.n_cells for s in sources)
            with prepare(sources, cache="memory") as shared, prepare(sources, cache="memory", unshared=named,
                                                                         unshared_thresh=args.unshared_thresh) as uinmf:
                assert list(shared.genes) == list(uinmf.genes)
                counts = {n: int(g.size) for n, g in uinmf.unshared.items()}
                runs = {"shared": [run(shared, {}, batches, labels, s, batch_size) for s in args.seeds],
                        "uinmf": [run(uinmf, counts, batches, labels, s, batch_size) for s in args.seeds]}
            if case == "cellbench5-block":
                intact_sources = datasets_of(case, 0)[0]
                with prepare(intact_sources, cache="memory") as intact:
                    runs["intact"] = [run(intact, {}, batches, labels, s, batch_size) for s in args.seeds]
            res = {"n_shared_genes": len(shared.genes), "unshared": counts, "runs": runs,
                   "mean": {v: {m: statistics.fmean(r[m] for r in rs) for m in METRICS} for v, rs in runs.items()},
                   "uinmf_minus_shared": {m: paired(runs["shared"], runs["uinmf"], m) for m in METRICS},
                   "intact_minus_shared": ({m: paired(runs["shared"], runs["intact"], m) for m in METRICS}
                                           if "intact" in runs else None),
                   "seconds": time.perf_counter() - t0}
            case = f"{case}{block}" if block else case
            out["cases"][case] = res
            print(f"\n{case}: {res['n_shared_genes']} shared genes, unshared {counts}, {len(args.seeds)} seeds, "
                  f"{res['seconds']:.0f} s")
            for v in runs:
                print(f"  {v:7s} " + "  ".join(f"{m} {res['mean'][v][m]:.3f}" for m in METRICS))
            print("  UINMF - shared (paired, ± s.e.): " + "  ".join(
                f"{m} {d:+.3f} ± {se:.3f}" for m, (d, se) in res["uinmf_minus_shared"].items()))
            if res["intact_minus_shared"]:
                print("  intact - shared (paired, ± s.e.): " + "  ".join(
                    f"{m} {d:+.3f} ± {se:.3f}" for m, (d, se) in res["intact_minus_shared"].items()))
    (WORK / args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
