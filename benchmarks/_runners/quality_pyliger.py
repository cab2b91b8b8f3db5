"""Run pyliger 0.2.4's own pipeline on one labelled h5ad: the quality side of the comparison.

Runs inside a pyliger virtual environment (``benchmarks/_venvs/pyliger_q``: pyliger with an
igraph 0.10 stack, on which its Louvain works), so it imports nothing from onlinemf. Steps, all pyliger's own functions with their defaults unless named:
``create_liger`` (one in-memory AnnData per ``obs[batch_key]`` category, in category order),
``normalize``, ``select_genes(var_thresh=0.1)``, ``scale_not_center``, ``online_iNMF(k, lam,
epochs, batch size, seed)``, ``quantile_norm(rand_seed=seed)``, ``louvain_cluster(resolution,
random_seed=seed)`` (``--clustering leiden``: ``leiden_cluster``). Writes an ``.npz`` with the cell names (pyliger may drop cells with no
counts), their dataset, H, H_norm, clusters, the selected genes, and a JSON ``meta`` string (pyliger's
version, the seed, timings and every setting, which ``bench_quality.py --pyliger-from`` checks before reusing it).
Several seeds run in one process, since importing pyliger takes longer than its pipeline on
these data. The scoring is done by the parent (``bench_quality.py``) with ``onlinemf.metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from importlib.metadata import version
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="raw-count .h5ad")
    parser.add_argument("--output", required=True, type=Path,
                        help="result .npz; '{seed}' in the name is replaced by each seed")
    parser.add_argument("--batch-key", default="batch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="one full pipeline per seed, in one process (pyliger's import is slow)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--var-thresh", type=float, default=0.1)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clustering", choices=["louvain", "leiden"], default="louvain",
                        help="pyliger's louvain_cluster or leiden_cluster (its defaults: 10 starts)")
    return parser.parse_args()


def split_by_batch(path: Path, batch_key: str) -> list:
    """One AnnData (raw counts, CSR) per ``obs[batch_key]`` category, as pyliger expects them."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    adata = ad.read_h5ad(path)
    X = sp.csr_matrix(adata.X)
    batches = adata.obs[batch_key].astype("category")
    out = []
    for cat in batches.cat.categories:
        idx = np.flatnonzero((batches == cat).to_numpy())
        if idx.size == 0:
            continue
        obs = pd.DataFrame(index=pd.Index(adata.obs_names[idx].astype(str), name="cell"))
        var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str), name="gene"))
        part = ad.AnnData(X=X[idx], obs=obs, var=var)
        part.uns["sample_name"] = str(cat)
        out.append(part)
    return out


def run_once(args: argparse.Namespace, seed: int, output: Path) -> None:
    """The whole pyliger pipeline for one seed; writes ``output``."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    import pyliger

    timings = {}
    with threadpool_limits(args.threads):
        t0 = time.perf_counter()
        liger = pyliger.create_liger(split_by_batch(args.input, args.batch_key))
        pyliger.normalize(liger)
        pyliger.select_genes(liger, var_thresh=args.var_thresh)
        pyliger.scale_not_center(liger)
        timings["preprocess_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        pyliger.online_iNMF(liger, k=args.k, value_lambda=args.lam, max_epochs=args.epochs,
                            miniBatch_size=args.batch_size, rand_seed=seed, verbose=False)
        timings["factorize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pyliger.quantile_norm(liger, rand_seed=seed)
        timings["quantile_norm_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cluster = pyliger.leiden_cluster if args.clustering == "leiden" else pyliger.louvain_cluster
        cluster(liger, resolution=args.resolution, random_seed=seed)
        timings["cluster_s"] = time.perf_counter() - t
    adatas = liger.adata_list
    # Iterations pyliger ran: floor(n_1 * epochs / b_1) with b_i = round(batch * n_i / sum n).
    n_cells = [a.n_obs for a in adatas]
    b_first = int(np.round(n_cells[0] / sum(n_cells) * args.batch_size))
    n_iters = int(np.floor(n_cells[0] * args.epochs / b_first)) if b_first > 0 else 0
    meta = {
        "tool": "pyliger",
        "version": version("pyliger"),
        "seed": seed,
        "datasets": [a.uns["sample_name"] for a in adatas],
        "n_cells": n_cells,
        "n_genes_selected": len(liger.var_genes),
        "n_iterations": n_iters,
        "minibatch_first": b_first,
        "timings": timings,
        # Everything that decides the result, so that a later run can tell whether this file is reusable.
        "settings": {"input": str(args.input), "batch_key": args.batch_key, "k": args.k, "lam": args.lam,
                     "epochs": args.epochs, "batch_size": args.batch_size, "var_thresh": args.var_thresh,
                     "resolution": args.resolution, "threads": args.threads},
    }
    if args.clustering != "louvain":  # recorded only when not the default, so earlier files stay comparable
        meta["settings"]["clustering"] = args.clustering
    np.savez(
        output,
        obs_names=np.concatenate([a.obs_names.to_numpy().astype(str) for a in adatas]),
        datasets=np.concatenate([np.repeat(a.uns["sample_name"], a.n_obs) for a in adatas]).astype(str),
        H=np.vstack([np.asarray(a.obsm["H"], dtype=np.float64) for a in adatas]),
        H_norm=np.vstack([np.asarray(a.obsm["H_norm"], dtype=np.float64) for a in adatas]),
        clusters=np.concatenate([np.asarray(a.obs["cluster"]) for a in adatas]).astype(np.int64),
        genes=np.asarray(liger.var_genes, dtype=str),
        meta=np.array(json.dumps(meta)),
    )


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")  # numba / anndata chatter
    args.input = args.input.resolve()
    args.output = args.output.resolve()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # pyliger writes ./results/ for on-disk data only; keep any stray file out of the repository.
    os.chdir(args.output.parent)
    for seed in args.seeds:
        run_once(args, seed, Path(str(args.output).replace("{seed}", str(seed))))


if __name__ == "__main__":
    main()
