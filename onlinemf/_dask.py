"""The fit's work units and the H pass on a ``dask.distributed`` cluster: workers read their own rows, only
factors and statistics (and H) cross the network.

A step of the fit (:mod:`onlinemf._step`) maps ``unit_stats`` over fixed work units of at most ``UNIT_ROWS`` rows.
:class:`DaskExecutor` runs that map on a cluster:

- the client never reads a mini-batch: :meth:`DaskExecutor.read_batch` describes it as :class:`RowsRef` (a
  dataset token and a row range), split into the same units as a local mini-batch;
- each dataset is described once per fit by a :class:`SourceSpec` (input path, batch rows, selected genes and
  scale factors) that reaches each worker once; a worker opens it on first use and keeps it open (per process);
- per step, the factors (``W + V_i`` and the K x K Gram matrix per dataset) go to the cluster once and from
  there to each worker that runs a unit, and each unit returns its ``H^T H`` (K x K), ``X^T H`` (genes x K) and
  loss;
- the client adds the units' statistics in unit order and runs the HALS updates, as a local fit does;
- :func:`transform_source` (the final H pass, ``project``) maps the H solve over the same units as the local pass.

The descriptions and the worker side are in :mod:`onlinemf._remote`.

The units, their rows and the order of the sums are those of a local fit and each unit is computed by the same
code with BLAS on one thread, so a distributed fit gives the local model to the bit (tests/test_dask.py).
A worker that dies is replaced by the cluster and its units are rerun (units are pure); if the cluster gives up
on a unit (``KilledWorker``) the fit stops with an error, and a checkpoint written so far stays valid.

Dask is an optional dependency (``pip install 'onlinemf[dask]'``); it is imported only here, on use.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InputError
from ._remote import (
    RowsRef,
    SourceSpec,
    chunk_statistics,
    close_worker_sources,
    describe,
    run_item,
    stats_chunks,
)
from ._source import Source
from ._validation import require_extra
from .preprocess import DatasetStats, _StatsAccumulator

logger = logging.getLogger("onlinemf.dask")

# ----------------------------------------------------------------------------- client side
def _identity(value: Any) -> Any:
    return value


def _refs(item: Any) -> list[RowsRef]:
    if isinstance(item, RowsRef):
        return [item]
    if isinstance(item, tuple):
        return [ref for x in item for ref in _refs(x)]
    return []


def _nbytes(obj: Any) -> int:
    """Bytes of the arrays in a (nested) result or task function, for the traffic counters."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 8 if isinstance(obj, (int, float)) else 0


@dataclass
class Traffic:
    """What the executor sent and received: factor bytes out (counted once per worker), result bytes in."""

    steps: int = 0
    units: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0


class DaskExecutor:
    """Runs work units on the workers of a ``dask.distributed.Client``; results in item order.

    Items are ``(name, RowsRef)`` pairs (or anything holding :class:`RowsRef`); ``fn`` must be picklable (it is sent
    once per :meth:`map` to the cluster, and each task refers to it).
    """

    def __init__(self, client: Any):
        self.client = client
        self._specs: dict[int, SourceSpec] = {}
        self._spec_futures: dict[str, Any] = {}
        self.traffic = Traffic()
        self.n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))

    def _shared(self, value: Any) -> Any:
        # A task returning ``value``, not scattered data: workers fetch its result from each other, and if the
        # worker holding it dies the scheduler recomputes it (scattered data would be lost, and a broadcast
        # scatter waits on a dead worker).
        return self.client.submit(_identity, value, pure=False)

    def _spec(self, source: Source) -> SourceSpec:
        spec = self._specs.get(id(source))
        if spec is None:
            spec = self._specs[id(source)] = describe(source)
        if spec.token not in self._spec_futures:
            self._spec_futures[spec.token] = self._shared(spec)
        return spec

    def read_batch(self, sources: list[Source], step: Any, dtype: np.dtype) -> dict[str, list[RowsRef]]:
        """The mini-batch of ``step`` described, one :class:`RowsRef` per row range (as ``read_pieces`` blocks)."""
        out = {}
        for source, ranges in zip(sources, step.ranges, strict=True):
            token = self._spec(source).token
            out[source.name] = [RowsRef(token, int(a), int(b), source.n_genes, np.dtype(dtype).str) for a, b in ranges]
        return out

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list:
        import time

        from distributed import KilledWorker

        items = list(items)
        if not items:
            return []
        t0 = time.perf_counter()
        fn_future = self._shared(fn)
        futures = []
        for item in items:
            specs = {ref.token: self._spec_futures[ref.token] for ref in _refs(item)}
            futures.append(self.client.submit(run_item, fn_future, item, specs, pure=False))
        try:
            results = self.client.gather(futures)
        except KilledWorker as exc:
            msg = (f"the Dask cluster lost the workers running a unit several times ({exc}); the fit stopped. "
                   "A checkpoint written so far (--checkpoint) continues it (--resume)")
            raise InputError(msg) from None
        finally:
            for future in futures:
                future.release()
            fn_future.release()
        self.traffic.steps += 1
        self.traffic.units += len(items)
        self.traffic.bytes_out += _nbytes(fn) * min(len(items), self.n_workers)
        self.traffic.bytes_in += _nbytes(results)
        self.traffic.seconds += time.perf_counter() - t0
        return results

    def close(self) -> None:
        for future in self._spec_futures.values():
            future.release()
        self._spec_futures.clear()
        self._specs.clear()


#: Statistics-pass chunks in flight per worker (client memory: their sums, about 30 bytes per gene and 8 per cell).
STATS_CHUNKS_PER_WORKER = 3


def stats_pass(client: Any, sources: Sequence[Source], block_size: int, progress: Callable[[int], Any] | None = None
               ) -> list[DatasetStats]:
    """The statistics pass of :func:`onlinemf.preprocess.prepare` as a map-reduce on the cluster.

    The chunks are the local pass's blocks (``block_size`` cells, or the blocks of the union of a file's batch
    splits); each worker reads its chunks' rows itself and returns per-chunk sums (library sizes, per-gene sums,
    sums of squares and non-zero counts); the client adds them in chunk order, as the local pass does. So the
    statistics, and then the genes and scale factors, equal the local ones to the bit (tests/test_dask.py). Only
    the sums cross the network. ``prepare(..., stats_pass=functools.partial(stats_pass, client))`` uses it.
    """
    from distributed import KilledWorker

    check_client(client)
    accumulators = [_StatsAccumulator(src) for src in sources]  # refuses an empty dataset before any task
    chunks = stats_chunks(list(sources), block_size)
    n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    specs: dict[str, Any] = {}
    pending: deque = deque()
    try:
        for k in range(len(chunks) + 1):
            if k < len(chunks):  # keep a few chunks per worker in flight, take the results in chunk order
                chunk = chunks[k]
                if chunk.spec.token not in specs:  # each description (a split union's rows) goes out once
                    specs[chunk.spec.token] = client.submit(_identity, chunk.spec, pure=False)
                pending.append((chunk, client.submit(chunk_statistics, specs[chunk.spec.token], chunk.start,
                                                     chunk.stop, chunk.owner, pure=False)))
            while pending and (k == len(chunks) or len(pending) >= STATS_CHUNKS_PER_WORKER * n_workers):
                done, future = pending.popleft()
                for (dataset, start, stop), sums in zip(done.parts, future.result(), strict=True):
                    accumulators[dataset].add_sums(start, stop, sums)
                future.release()
                if progress is not None:
                    progress(done.stop - done.start)
    except KilledWorker as exc:
        msg = f"the Dask cluster lost the workers reading a chunk of the statistics pass several times ({exc})"
        raise InputError(msg) from None
    finally:
        for _, future in pending:
            future.release()
        for future in specs.values():
            future.release()
    return [acc.result() for acc in accumulators]


#: Work units per round of the H pass on the cluster (memory on the client: the H of this many units at a time).
H_PASS_UNITS = 256


def transform_source(est: Any, source: Source, client: Any, *, dataset: str | None = None, block_size: int = 10000,
                     with_objective: bool = False) -> tuple[np.ndarray, float | None]:
    """:meth:`OnlineINMF.transform_source <onlinemf.engine.OnlineINMF.transform_source>` on the cluster.

    The workers read the rows; the units are those of the local pass (blocks of ``block_size`` cells cut into work
    units) and the losses are added in the same order, so H and the objective equal the local ones to the bit.
    Only the factors go out and H (80 bytes per cell at K=20, float32) comes back.
    """
    from . import _step

    factors = est._factors(dataset)
    names = None if source.placeholder_genes else source.var_names
    est._check_genes(source.n_genes, names, source.name, est._n_unshared(dataset))
    task = _step.HTask({"": factors}, est.h_sweeps, with_objective)
    H = np.empty((source.n_cells, est.n_components), dtype=est._dt)
    total = 0.0
    with dask_executor(client) as executor:
        token = executor._spec(source).token
        dtype = np.dtype(est._dt).str
        # (block start, unit) in block order; each block's losses are added as the local pass adds them
        units = [(a, ref) for a in range(0, source.n_cells, block_size)
                 for ref in RowsRef(token, a, min(a + block_size, source.n_cells), source.n_genes, dtype)
                 .split_units(_step.UNIT_ROWS)]
        block_losses: list[float] = []
        current = None
        for lo in range(0, len(units), H_PASS_UNITS):
            window = units[lo:lo + H_PASS_UNITS]
            for (block, ref), (H_unit, loss) in zip(window, executor.map(task, [("", r) for _, r in window]),
                                                    strict=True):
                if block != current and block_losses:
                    total += sum(block_losses)
                    block_losses = []
                current = block
                H[ref.start:ref.stop] = H_unit
                block_losses.append(loss or 0.0)
        total += sum(block_losses)
    return H, (total if with_objective else None)


def _require_distributed(what: str):
    return require_extra("dask", what, ("distributed",))[0]


def check_client(client: Any) -> None:
    """Raise :class:`InputError` unless ``client`` is a connected ``dask.distributed.Client``."""
    distributed = _require_distributed("a fit on a Dask cluster")
    if not isinstance(client, distributed.Client):
        msg = f"client: expected a dask.distributed.Client, found {type(client).__name__}"
        raise InputError(msg)
    if client.status != "running":
        msg = f"client: expected a connected dask.distributed.Client, found one with status {client.status!r}"
        raise InputError(msg)


@contextlib.contextmanager
def dask_executor(client: Any) -> Iterator[DaskExecutor]:
    """A :class:`DaskExecutor` on ``client``; the client's BLAS on one thread inside (the HALS updates run here,
    as a local fit runs them)."""
    from threadpoolctl import threadpool_limits

    check_client(client)
    executor = DaskExecutor(client)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield executor
    finally:
        executor.close()
        t = executor.traffic
        if t.steps:
            logger.info("Dask: %d steps, %d units, %.1f KB out and %.1f KB in per step, %.1f ms per step",
                        t.steps, t.units, t.bytes_out / t.steps / 1e3, t.bytes_in / t.steps / 1e3,
                        1e3 * t.seconds / t.steps)


# ----------------------------------------------------------------------------- --scheduler
def _local_workers(scheduler: str) -> int:
    value = scheduler.split(":", 1)[1]
    if not value.isdigit() or int(value) < 1:
        msg = f"--scheduler {scheduler}: expected local:N with N a positive number of worker processes"
        raise InputError(msg)
    return int(value)


@contextlib.contextmanager
def scheduler_client(scheduler: str | None) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for a ``--scheduler`` value, closed on exit (None: yields None).

    ``local:N`` starts a ``LocalCluster`` of N worker processes (one thread each) and closes it on exit, on errors
    and on Ctrl-C; ``tcp://HOST:PORT`` (any address with ``://``) joins a running scheduler; anything else is a
    scheduler file (``dask scheduler --scheduler-file``, dask-jobqueue, dask-mpi).
    """
    if scheduler is None:
        yield None
        return
    distributed = _require_distributed("--scheduler")
    if scheduler.startswith("local:"):
        n_workers = _local_workers(scheduler)
        logger.info("starting a local Dask cluster of %d worker processes", n_workers)
        cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"})
        try:
            with distributed.Client(cluster) as client:
                try:
                    yield client
                finally:
                    with contextlib.suppress(Exception):  # a best effort: the workers are closed next anyway
                        client.run(close_worker_sources)
        finally:
            cluster.close()
        return
    kwargs = {"address": scheduler} if "://" in scheduler else {"scheduler_file": scheduler}
    if "scheduler_file" in kwargs and not Path(scheduler).is_file():
        msg = f"--scheduler {scheduler}: expected local:N, tcp://HOST:PORT or a scheduler file, found no such file"
        raise InputError(msg)
    try:
        client = distributed.Client(timeout="30s", **kwargs)
    except (OSError, TimeoutError, ValueError) as exc:
        msg = f"--scheduler {scheduler}: could not connect to the Dask scheduler: {exc}"
        raise InputError(msg) from None
    with client:
        logger.info("joined the Dask cluster at %s (%d workers)", client.scheduler.address,
                    len(client.scheduler_info(n_workers=-1)["workers"]))
        yield client
