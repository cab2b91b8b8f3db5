"""Run pyplanc's online iNMF (libplanc C++, the engine behind rliger) on prepared data.

Runs inside ``benchmarks/_venvs/pyplanc``. pyplanc 0.0.2 takes a list of
genes x cells ``scipy.sparse.csc_matrix`` (float64); a cells x genes CSR
transposed is exactly that, so the conversion is free apart from the cast.

pyplanc exposes no seed: Armadillo's generator starts from the same state in
every process, and each call advances it. Seed ``s`` is emulated by ``s - 1``
throw-away calls on a tiny problem before the timed one, which gives distinct,
reproducible initialisations.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import scipy.sparse as sp
from _common import FitMeter, load_prepared, parse_args, write_result

import pyplanc


def _advance_rng(n_calls: int) -> None:
    tiny = [sp.random(30, 40, density=0.3, format="csc", random_state=i) for i in range(2)]
    for _ in range(n_calls):
        pyplanc.oinmf(tiny, k=2, nCores=1, minibatchSize=20, permuteChunkSize=10)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    names, matrices, _ = load_prepared(args.input)
    genes_by_cells = [sp.csc_matrix(X.T, dtype=np.float64) for X in matrices]
    del matrices
    _advance_rng(args.seed - 1)
    options = {
        "k": args.k,
        "nCores": args.threads,
        "lambda": args.lam,  # a Python keyword, so passed through a dict
        "maxEpoch": args.epochs,
        "minibatchSize": args.batch_size,
        "maxHALSIter": 1,
        "permuteChunkSize": 1000,
        "verbose": False,
    }
    with FitMeter() as meter:
        out = pyplanc.oinmf(genes_by_cells, **options)
    write_result(
        args.output,
        W=out.W.T,
        Vs=[V.T for V in out.VList],
        Hs=list(out.HList),
        meter=meter,
        meta={
            "tool": "pyplanc",
            "version": version("pyplanc"),
            "own_objective": float(out.objErr),
            "seed_note": f"{args.seed - 1} warm-up calls advance Armadillo's RNG",
            "datasets": names,
        },
    )


if __name__ == "__main__":
    main()
