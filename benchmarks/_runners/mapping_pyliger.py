"""pyliger 0.2.4's scenario 3 for one held-out batch: fit the reference, project the query, quantile-normalise.

Runs inside ``benchmarks/_venvs/pyliger`` and imports nothing from onlinemf. Steps, pyliger's own functions:
``create_liger`` on the reference batches, ``normalize``, ``select_genes(var_thresh=0.1)``,
``scale_not_center``, ``online_iNMF(k, 5.0, 5 epochs, batch size, seed)``; the query gets ``normalize`` and
``scale_not_center`` on the reference's genes in a liger object of its own, then
``online_iNMF(liger, X_new=[query], projection=True)`` (H on W only) appends it to the reference, and
``quantile_norm(liger, ref_dataset=<largest reference batch>)`` normalises reference and query together:
pyliger has no way to align a projected dataset without the reference's H. Writes an ``.npz`` with the
reference's and the query's H, H_norm and labels; ``bench_mapping.py`` votes with ``onlinemf.mapping``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--queries", nargs="+", required=True, help="held-out obs['batch'] categories, each in turn")
    parser.add_argument("--output", required=True, type=Path, help="'{query}' and '{seed}' in the name are replaced")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="(pyliger's import is slow: one process)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the smallest reference batch")
    return parser.parse_args()


def split(adata, batch_key="batch"):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X)
    out = []
    for cat in adata.obs[batch_key].astype("category").cat.categories:
        idx = np.flatnonzero((adata.obs[batch_key] == cat).to_numpy())
        if idx.size == 0:
            continue
        part = ad.AnnData(X=X[idx], obs=pd.DataFrame({"cell_type": adata.obs["cell_type"].astype(str).to_numpy()[idx]},
                                                     index=pd.Index(adata.obs_names[idx].astype(str), name="cell")),
                          var=pd.DataFrame(index=pd.Index(adata.var_names.astype(str), name="gene")))
        part.uns["sample_name"] = str(cat)
        out.append(part)
    return out


def run_once(parts, held: str, seed: int, args, output: Path) -> None:
    import numpy as np
    import pyliger
    from threadpoolctl import threadpool_limits

    query = [p.copy() for p in parts if p.uns["sample_name"] == held]
    ref = [p.copy() for p in parts if p.uns["sample_name"] != held]
    with threadpool_limits(1):
        liger = pyliger.create_liger(ref)
        pyliger.normalize(liger)
        pyliger.select_genes(liger, var_thresh=0.1)
        pyliger.scale_not_center(liger)
        sizes = [a.n_obs for a in liger.adata_list]
        batch = args.batch_size or min(5000, min(sizes))
        pyliger.online_iNMF(liger, k=args.k, value_lambda=5.0, max_epochs=5, miniBatch_size=batch,
                            rand_seed=seed, verbose=False)
        genes = liger.adata_list[0].var_names
        q = pyliger.create_liger(query, remove_missing=False)
        pyliger.normalize(q)
        q.var_genes = list(genes)
        pyliger.scale_not_center(q, remove_missing=False)
        qa = q.adata_list[0]
        qa = qa[:, genes].copy()  # the reference's gene order
        ref_name = liger.adata_list[int(np.argmax(sizes))].uns["sample_name"]
        pyliger.online_iNMF(liger, X_new=[qa], projection=True, k=args.k, miniBatch_size=batch, verbose=False)
        pyliger.quantile_norm(liger, ref_dataset=ref_name, rand_seed=seed)
    adatas = liger.adata_list
    np.savez(output,
             H_ref=np.vstack([np.asarray(a.obsm["H"], dtype=np.float64) for a in adatas[:-1]]),
             H_query=np.asarray(adatas[-1].obsm["H"], dtype=np.float64),
             H_norm_ref=np.vstack([np.asarray(a.obsm["H_norm"], dtype=np.float64) for a in adatas[:-1]]),
             ref_labels=np.concatenate([a.obs["cell_type"].to_numpy().astype(str) for a in adatas[:-1]]),
             H_norm_query=np.asarray(adatas[-1].obsm["H_norm"], dtype=np.float64),
             query_labels=adatas[-1].obs["cell_type"].to_numpy().astype(str))


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    import anndata as ad

    args.input, args.output = args.input.resolve(), args.output.resolve()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(args.output.parent)  # pyliger may write ./results/
    parts = split(ad.read_h5ad(args.input))
    for held in args.queries:
        for seed in args.seeds:
            run_once(parts, held, seed, args, Path(str(args.output).replace("{query}", held).replace("{seed}", str(seed))))


if __name__ == "__main__":
    main()
