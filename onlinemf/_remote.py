"""What a Dask worker needs to compute a work unit without the client's data: descriptions and the worker side.

- :class:`SourceSpec`: how to open one dataset from its file (reader options, then the preparation: selected
  genes and scale factors), made on the client by :func:`describe`;
- :class:`RowsRef`: rows ``start:stop`` of a described dataset, standing for a block of a mini-batch;
- :func:`run_item`, on a worker: the unit's rows read through the dataset, opened once per worker process and
  kept open (:func:`worker_source`), then the step's function applied.

No Dask import here: the client side is :mod:`onlinemf._dask`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._blockmath import block_statistics
from ._errors import InputError
from ._prepared import PreparedSource
from ._rowrange import CsrRowRange
from ._source import Source
from .readers import H5adSource, TenxH5Source, ZarrSource, split_groups

logger = logging.getLogger("onlinemf.dask")

#: Open sources a worker process keeps (least recently used closed first).
WORKER_OPEN_SOURCES = 32
#: Datasets up to this many cells are kept prepared in each worker's memory after its first pass over them (as
#: the local pipeline's "auto" cache): reading a unit's rows from a compressed file costs more than computing it
#: (Kang, 1024 rows from gzip: ~240 ms against ~10 ms of compute). Larger datasets are read from the file.
WORKER_MEMORY_CACHE_CELLS = 200_000
#: Bytes of prepared data a worker process keeps in memory, all datasets together. None: half the Dask worker's
#: memory limit, or :data:`DEFAULT_WORKER_CACHE_BYTES` for a worker without one. Over it, the least recently used
#: cached datasets are closed after a task, and from then on read from the file on that worker (rebuilding a
#: dataset's cache would cost a pass over it per task). Peak: the cap plus the cache built by the current task.
WORKER_CACHE_BYTES: int | None = None
DEFAULT_WORKER_CACHE_BYTES = 4 << 30


# ----------------------------------------------------------------------------- descriptions
@dataclass(frozen=True, eq=False)
class SourceSpec:
    """How a worker opens one prepared dataset: the file and its reader options, then the preparation.

    Attributes
    ----------
    token : str
        Identifies the description (content hash, including the file's size and modification time).
    name : str
        Dataset name.
    kind : {"h5ad", "zarr", "10x"}
    path : str
        Absolute path of the input file, as the client sees it; workers must see it at the same path.
    options : dict
        Reader options: ``layer``, ``use_raw``, ``rows`` (sorted file rows of a batch split) for h5ad; ``layer``,
        ``rows`` for zarr; ``genome`` for 10x.
    gene_index : ndarray of int of shape (n_selected,) or None
        Selected genes (positions in the file's genes); None: the raw counts (an unprepared source).
    scale : ndarray of float64 of shape (n_selected,) or None
        Per-gene divisors of the preparation.
    cache : {None, "memory"}
        Whether the worker keeps the prepared dataset in memory (see :data:`WORKER_MEMORY_CACHE_CELLS`).
    """

    token: str
    name: str
    kind: str
    path: str
    options: dict = field(default_factory=dict)
    gene_index: np.ndarray | None = None
    scale: np.ndarray | None = None
    cache: str | None = None

    def open(self) -> Source:
        """The source this describes (opened from the file: call on a worker)."""

        if self.kind == "h5ad":
            raw: Source = H5adSource(self.path, name=self.name, **self.options)
        elif self.kind == "zarr":
            raw = ZarrSource(self.path, name=self.name, **self.options)
        else:
            raw = TenxH5Source(self.path, name=self.name, **self.options)
        if self.gene_index is None:
            return raw
        return _OwningPrepared(raw, self.gene_index, self.scale, cache=self.cache)


class _OwningPrepared(PreparedSource):
    """A PreparedSource that closes its raw source with itself (the worker opened both)."""

    def close(self) -> None:
        super().close()
        self.source.close()

    @property
    def cached_nbytes(self) -> int:
        """Bytes of the memory cache once built (values, column indices, row pointers); 0 otherwise."""
        X = getattr(self._cache, "_X", None)  # the memory cache's CSR matrix; a disk cache or none has no _X
        return 0 if X is None else int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


def describe(source: Source) -> SourceSpec:
    """The :class:`SourceSpec` of a source read from a file (h5ad or 10x), prepared or not.

    Raises
    ------
    InputError
        For a source that is not read from a file (an in-memory matrix): workers could not read it.
    """
    gene_index = scale = None
    raw = source
    if isinstance(source, PreparedSource):
        raw, gene_index, scale = source.source, source.gene_index, source.scale
    if isinstance(raw, H5adSource):
        kind, options = "h5ad", {"layer": raw.layer, "use_raw": raw.use_raw, "rows": raw.rows}
    elif isinstance(raw, ZarrSource):
        kind, options = "zarr", {"layer": raw.layer, "rows": raw.rows}
    elif isinstance(raw, TenxH5Source):
        kind, options = "10x", {"genome": raw.genome}
    else:
        msg = (f"{source.name}: a fit on a Dask cluster needs datasets read from files the workers can reach "
               f"(.h5ad, .zarr or 10x .h5, prepared or not), found {type(raw).__name__}")
        raise InputError(msg)
    path = str(Path(raw.path).resolve())
    digest = hashlib.sha256()
    try:
        st = os.stat(path)
        digest.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|{kind}|{source.name}".encode())
    except OSError:
        digest.update(uuid.uuid4().bytes)
    digest.update(repr(sorted((k, v) for k, v in options.items() if k != "rows")).encode())
    for array in (options.get("rows"), gene_index, scale):
        digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    cache = "memory" if gene_index is not None and source.n_cells <= WORKER_MEMORY_CACHE_CELLS else None
    return SourceSpec(token=digest.hexdigest()[:32], name=source.name, kind=kind, path=path, options=options,
                      gene_index=gene_index, scale=scale, cache=cache)


@dataclass(frozen=True)
class StatsChunk:
    """One task of the distributed statistics pass: file rows ``start:stop`` of ``spec`` (raw counts) and where
    each part of them goes.

    ``owner`` is None when the rows are all one dataset's; for batch splits of one ``.h5ad`` matrix (``spec`` then
    exposes the union of their rows), ``owner[j]`` is the position in the group of the split that row j belongs
    to. ``parts`` lists ``(dataset position, first row, end row)`` in the order :func:`chunk_statistics` returns
    them: the blocks the local pass (:func:`onlinemf.readers.iter_split_blocks`) hands to each dataset. The
    rows of ``spec`` are the same blocks' rows, read the same way, so the worker's sums equal the local ones.
    """

    spec: SourceSpec
    start: int
    stop: int
    owner: np.ndarray | None
    parts: tuple[tuple[int, int, int], ...]


def stats_chunks(sources: list[Source], block_size: int) -> list[StatsChunk]:
    """The local statistics pass's blocks (``preprocess._stats_pass``) as worker tasks, in the pass's order."""
    chunks = []
    for group in split_groups(sources):
        members = [sources[g] for g in group]
        if len(members) == 1:
            spec, n = describe(members[0]), members[0].n_cells
            for a in range(0, n, block_size):
                b = min(a + block_size, n)
                chunks.append(StatsChunk(spec, a, b, None, ((group[0], a, b),)))
            continue
        # as iter_split_blocks: the union of the splits' rows in file order, cut into blocks of block_size
        specs = [describe(m) for m in members]
        union = np.concatenate([m.rows for m in members])  # type: ignore[attr-defined]  # splits are H5adSources
        owner = np.repeat(np.arange(len(members), dtype=np.int32), [m.n_cells for m in members])
        order = np.argsort(union, kind="stable")
        union, owner = union[order], owner[order]
        digest = hashlib.sha256("|".join(sp_.token for sp_ in specs).encode()).hexdigest()[:32]
        spec = SourceSpec(token=digest, name=f"{Path(specs[0].path).name} (all batches)", kind=specs[0].kind,
                          path=specs[0].path, options={**specs[0].options, "rows": union})
        done = np.zeros(len(members), dtype=np.int64)
        for lo in range(0, union.size, block_size):
            hi = min(lo + block_size, union.size)
            own = owner[lo:hi]
            parts = []
            for i in np.unique(own):
                n = int(np.count_nonzero(own == i))
                parts.append((group[int(i)], int(done[i]), int(done[i]) + n))
                done[i] += n
            chunks.append(StatsChunk(spec, lo, hi, own, tuple(parts)))
    return chunks


@dataclass(frozen=True)
class RowsRef:
    """Rows ``start:stop`` of a described dataset, in the working ``dtype``: a block of a mini-batch that a
    worker reads itself. Has the ``shape`` of the block it stands for."""

    token: str
    start: int
    stop: int
    n_genes: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.n_genes)

    def split_units(self, size: int) -> list[RowsRef]:
        """The block cut into units of at most ``size`` rows, as :func:`onlinemf._step.work_units` cuts blocks."""
        return [RowsRef(self.token, a, min(a + size, self.stop), self.n_genes, self.dtype)
                for a in range(self.start, self.stop, size)]


# ----------------------------------------------------------------------------- worker side
_open_sources: OrderedDict[str, Source] = OrderedDict()
_open_lock = threading.Lock()
_blas_pinned = False
_in_use: Counter[str] = Counter()  # tokens of the sources that running tasks read (never closed under them)
_uncached: set[str] = set()  # tokens dropped for the byte cap: opened without a memory cache from then on


def _worker_label() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except (ImportError, ValueError):
        return f"process {os.getpid()}"


def worker_source(spec: SourceSpec) -> Source:
    """The open source of ``spec`` in this worker process (opened on first use, kept among the last few)."""
    global _blas_pinned
    with _open_lock:
        if not _blas_pinned:
            # As in a local fit (onlinemf._executor): BLAS on one thread, so products sum in the same order.
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
            _blas_pinned = True
        source = _open_sources.get(spec.token)
        if source is not None:
            _open_sources.move_to_end(spec.token)
            return source
        if spec.token in _uncached:
            spec = replace(spec, cache=None)
        if not os.path.exists(spec.path):
            msg = (f"{spec.name}: {_worker_label()} cannot see the input {spec.path} (no such file there): the input "
                   "must be on storage every worker reaches at the same path")
            raise InputError(msg)
        try:
            source = spec.open()
        except (OSError, InputError) as exc:
            msg = f"{spec.name}: {_worker_label()} cannot read the input {spec.path}: {exc}"
            raise InputError(msg) from None
        _open_sources[spec.token] = source
        idle = [t for t in _open_sources if not _in_use[t] and t != spec.token]
        for token in idle[:max(0, len(_open_sources) - WORKER_OPEN_SOURCES)]:
            _open_sources.pop(token).close()
        return source


def worker_cache_limit() -> int:
    """The byte cap on this worker's memory caches (:data:`WORKER_CACHE_BYTES`)."""
    if WORKER_CACHE_BYTES is not None:
        return int(WORKER_CACHE_BYTES)
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    return int(limit) // 2 if limit else DEFAULT_WORKER_CACHE_BYTES


def set_worker_cache_bytes(limit: int | None) -> None:
    """Set :data:`WORKER_CACHE_BYTES` in this process: ``client.run(set_worker_cache_bytes, 2 << 30)`` sets it on
    every worker of a cluster (None: the default)."""
    global WORKER_CACHE_BYTES
    WORKER_CACHE_BYTES = None if limit is None else int(limit)
    with _open_lock:
        _trim_caches()


def _cached_nbytes(source: Source) -> int:
    return source.cached_nbytes if isinstance(source, _OwningPrepared) else 0


def worker_cache_bytes() -> int:
    """Bytes of prepared data this worker process holds in memory now (all open datasets)."""
    with _open_lock:
        return sum(_cached_nbytes(s) for s in _open_sources.values())


def _trim_caches() -> None:
    """Close the least recently used cached datasets not in use until the caches fit the cap (hold _open_lock)."""
    limit = worker_cache_limit()
    sizes = {token: _cached_nbytes(source) for token, source in _open_sources.items()}
    total = sum(sizes.values())
    for token, size in sizes.items():  # least recently used first
        if total <= limit:
            break
        if size and not _in_use[token]:
            source = _open_sources.pop(token)
            _uncached.add(token)
            logger.warning("%s: %s keeps %.0f MB of prepared data in memory, over its cap of %.0f MB; %s is read "
                           "from the file from now on", source.name, _worker_label(), total / 1e6, limit / 1e6,
                           source.name)
            source.close()
            total -= size


def close_worker_sources() -> int:
    """Close the sources this worker process holds open; returns how many (run on every worker before a
    cluster this process started closes: open HDF5 files slow a worker's exit past the nanny's patience)."""
    with _open_lock:
        n = len(_open_sources)
        while _open_sources:
            _open_sources.popitem(last=False)[1].close()
        _uncached.clear()
    return n


def _load(ref: RowsRef, specs: dict[str, SourceSpec]) -> CsrRowRange:
    block = worker_source(specs[ref.token]).read_block(ref.start, ref.stop)
    if block.dtype != np.dtype(ref.dtype):
        block = block.astype(ref.dtype)
    # A range over the block, as a local mini-batch's units are (same kernels, same numbers).
    return CsrRowRange(block, 0, block.shape[0])


def _resolve(item: Any, specs: dict[str, SourceSpec]) -> Any:
    if isinstance(item, RowsRef):
        return _load(item, specs)
    if isinstance(item, tuple):
        return tuple(_resolve(x, specs) for x in item)
    return item


def run_item(fn: Callable[[Any], Any], item: Any, specs: dict[str, SourceSpec]) -> Any:
    """On a worker: ``fn(item)`` with every :class:`RowsRef` in ``item`` replaced by the rows it describes; then
    the worker's memory caches are trimmed to their cap (:data:`WORKER_CACHE_BYTES`)."""
    with _open_lock:
        _in_use.update(list(specs))
    try:
        return fn(_resolve(item, specs))
    finally:
        with _open_lock:
            _in_use.subtract(list(specs))
            _trim_caches()


def chunk_statistics(spec: SourceSpec, start: int, stop: int, owner: np.ndarray | None) -> list[tuple]:
    """On a worker: the statistics-pass sums (:func:`onlinemf._blockmath.block_statistics`) of rows ``start:stop``
    of ``spec``'s raw counts, one per part of a :class:`StatsChunk` (``owner``), in its ``parts`` order. The rows
    are read and checked here; only the sums go back."""
    block = worker_source(spec).read_block(start, stop)
    if owner is None:
        return [block_statistics(block)]
    return [block_statistics(block[np.flatnonzero(owner == i)]) for i in np.unique(owner)]
