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
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InputError
from ._prepared import PreparedSource
from ._rowrange import CsrRowRange
from ._source import Source
from .readers import H5adSource, TenxH5Source, ZarrSource

#: Open sources a worker process keeps (least recently used closed first).
WORKER_OPEN_SOURCES = 32
#: Datasets up to this many cells are kept prepared in each worker's memory after its first pass over them (as
#: the local pipeline's "auto" cache): reading a unit's rows from a compressed file costs more than computing it
#: (Kang, 1024 rows from gzip: ~240 ms against ~10 ms of compute). Larger datasets are read from the file.
WORKER_MEMORY_CACHE_CELLS = 200_000


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
        while len(_open_sources) > WORKER_OPEN_SOURCES:
            _open_sources.popitem(last=False)[1].close()
        return source


def close_worker_sources() -> int:
    """Close the sources this worker process holds open; returns how many (run on every worker before a
    cluster this process started closes: open HDF5 files slow a worker's exit past the nanny's patience)."""
    with _open_lock:
        n = len(_open_sources)
        while _open_sources:
            _open_sources.popitem(last=False)[1].close()
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
    """On a worker: ``fn(item)`` with every :class:`RowsRef` in ``item`` replaced by the rows it describes."""
    return fn(_resolve(item, specs))
