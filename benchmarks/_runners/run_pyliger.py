"""Run pyliger 0.2.4's ``online_iNMF`` on prepared data.

Runs inside ``benchmarks/_venvs/pyliger``. Our prepared matrices are injected
directly: ``online_iNMF`` reads ``adata.layers["scale_data"]`` (cells x genes
CSR, sliced by rows) of each in-memory AnnData in ``liger.adata_list`` and
only needs ``liger.var_genes`` for its length, so pyliger's own
normalize/select_genes/scale_not_center and its ``./results/`` HDF5 copies are
bypassed. Results come back as ``obsm["H"]`` (cells x k) and ``varm["W"]``,
``varm["V"]`` (genes x k).
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import version

from _common import FitMeter, load_prepared, parse_args, write_result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warnings.filterwarnings("ignore")  # numba/anndata chatter on import
    import anndata as ad
    import pandas as pd
    from threadpoolctl import threadpool_limits

    import pyliger

    names, matrices, genes = load_prepared(args.input)
    adatas = []
    for name, X in zip(names, matrices, strict=True):
        obs = pd.DataFrame(index=[f"{name}_{i}" for i in range(X.shape[0])])
        var = pd.DataFrame(index=[str(g) for g in genes])
        adata = ad.AnnData(X=X, obs=obs, var=var)
        adata.layers["scale_data"] = X
        adata.uns["sample_name"] = name
        adatas.append(adata)
    liger = pyliger.Liger(adatas)
    liger.var_genes = [str(g) for g in genes]
    # online_iNMF writes nothing for in-memory data, but keep any stray
    # ./results/ out of the repository.
    os.chdir(args.output.parent)
    with threadpool_limits(args.threads), FitMeter() as meter:
        pyliger.online_iNMF(
            liger,
            k=args.k,
            value_lambda=args.lam,
            max_epochs=args.epochs,
            miniBatch_size=args.batch_size,
            miniBatch_max_iters=1,
            h5_chunk_size=1000,
            rand_seed=args.seed,
            verbose=False,
        )
    write_result(
        args.output,
        W=liger.W.T,
        Vs=[V.T for V in liger.V],
        Hs=list(liger.H),
        meter=meter,
        meta={"tool": "pyliger", "version": version("pyliger"), "datasets": names},
    )


if __name__ == "__main__":
    main()
