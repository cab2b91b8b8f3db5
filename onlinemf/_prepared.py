"""Applying a preparation block by block: :class:`PreparedSource` and its memory/disk caches.

Split from :mod:`onlinemf.preprocess` (which computes the statistics and chooses genes and scales);
this module only applies them: normalise rows by their full library size, keep the selected genes,
divide by the per-gene scale.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from ._blockmath import prepare_block, prepare_parts, stack_parts
from ._errors import InputError
from ._prefetch import prefetch
from ._rowrange import CsrRowRange
from ._source import Source, check_range, csr_ranges, csr_rows
from .readers import iter_split_blocks, read_threads, split_groups, thread_pool

logger = logging.getLogger("onlinemf.preprocess")

Progress = Callable[[int], object] | None
# Stored values from which a raw block is prepared on several threads (smaller: thread overhead wins).
PIECE_VALUES = 1 << 18

def _sum_by(index: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Float64 sums of ``weights`` grouped by ``index`` in 0:n, shape (n,)."""
    # bincount returns int64 for empty input, hence the cast
    return np.bincount(index, weights=weights, minlength=n).astype(np.float64, copy=False)


def _row_sums(X: sp.csr_matrix) -> np.ndarray:
    """Per-row sums of a CSR matrix in float64, shape (n_rows,)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return _sum_by(rows, X.data.astype(np.float64), X.shape[0])


def row_scale(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Library size per row and, per stored value, the factor 1/libsize of its row (float64)."""
    lib = _row_sums(X)
    inv = np.zeros_like(lib)
    np.divide(1.0, lib, out=inv, where=lib > 0)
    return lib, np.repeat(inv, np.diff(X.indptr))


def check_cache_mode(cache) -> None:
    if cache not in (None, "memory", "disk"):
        msg = f"cache: expected None, 'memory' or 'disk', found {cache!r}"
        raise InputError(msg)


def check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        msg = f"block_size: expected a positive integer, found {block_size!r}"
        raise InputError(msg)


def _prepare_block(raw: sp.csr_matrix, col_map: np.ndarray, divisor: np.ndarray, n_out: int,
                   lib: np.ndarray | None = None) -> sp.csr_matrix:
    """See :func:`onlinemf._blockmath.prepare_block` (kept under this name for callers)."""
    return prepare_block(raw, col_map, divisor, n_out, lib)


class _MemoryCache:
    """Prepared rows held as one CSR matrix, filled block by block."""

    def __init__(self, n_cols: int):
        self._parts: list[sp.csr_matrix] = []
        self._n_cols = n_cols
        self._X: sp.csr_matrix | None = None

    def append(self, block: sp.csr_matrix) -> None:
        self._parts.append(block)

    def finish(self) -> _MemoryCache:
        self._X = sp.vstack(self._parts, format="csr") if self._parts else sp.csr_matrix((0, self._n_cols), dtype=np.float32)
        self._parts = []
        return self

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        return csr_rows(self._X, start, stop)

    def read_ranges(self, ranges) -> sp.csr_matrix:
        return csr_ranges(self._X, ranges)

    def read_pieces(self, ranges) -> list[CsrRowRange]:
        return [CsrRowRange(self._X, int(a), int(b)) for a, b in ranges]

    def close(self) -> None:
        self._X, self._parts = None, []


def _remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _read_exactly(path: str, dtype, offset: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` at item ``offset`` of a raw binary file (the read releases the GIL)."""
    out = np.empty(count, dtype=dtype)
    if count:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset * out.itemsize)
            view = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
            got = 0
            while got < view.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    msg = f"{path}: the prepared-data cache is shorter than expected (removed or truncated?)"
                    raise OSError(msg)
                got += n
    return out


class DiskCache:
    """Prepared rows as raw binary files (float32 values, int32 columns, int64 row pointers) in a
    temporary folder, deleted on close.

    Plain files rather than HDF5: appending is one ``write`` per array and reading one ``readinto``
    per array, both outside the GIL, with no chunk bookkeeping; the 200k-cell cache pass measured
    in benchmarks/README.md spent 2.6 s of its time in h5py's resize-and-write. Not compressed:
    the cache is read once per epoch, and compressing it costs more CPU than the page cache saves.
    """

    def __init__(self, n_cols: int, name: str, tmpdir=None):
        self._folder = tempfile.mkdtemp(prefix="onlinemf-prepared-", dir=tmpdir)
        self._finalizer = weakref.finalize(self, _remove_folder, self._folder)
        self._n_cols, self.name = n_cols, name
        self._paths = {key: os.path.join(self._folder, key) for key in ("data", "indices", "indptr")}
        self._files = {key: open(path, "wb") for key, path in self._paths.items()}  # noqa: SIM115 - closed in finish/close
        np.zeros(1, dtype=np.int64).tofile(self._files["indptr"])
        self._nnz = 0
        self._indptr: np.ndarray | None = None

    @property
    def path(self) -> str:
        return self._folder

    def append(self, block: sp.csr_matrix) -> None:
        block.data.astype(np.float32, copy=False).tofile(self._files["data"])
        block.indices.astype(np.int32, copy=False).tofile(self._files["indices"])
        (block.indptr[1:].astype(np.int64) + self._nnz).tofile(self._files["indptr"])
        self._nnz += block.nnz

    def _close_files(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def finish(self) -> DiskCache:
        self._close_files()
        # 8 bytes per cell, mapped: only the windows that reads touch are paged in
        self._indptr = np.memmap(self._paths["indptr"], dtype=np.int64, mode="r")
        return self

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        indptr = np.array(self._indptr[start:stop + 1])  # type: ignore[index]  # set by finish()
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = _read_exactly(self._paths["data"], np.float32, lo, hi - lo)
        indices = _read_exactly(self._paths["indices"], np.int32, lo, hi - lo)
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self._n_cols))

    def close(self) -> None:
        self._close_files()
        self._indptr = None
        self._finalizer()


class PreparedSource(Source):
    """A raw source seen through normalisation, gene selection and scaling, block by block.

    ``read_block(start, stop)`` = rows divided by their FULL library size (all the source's genes,
    as rliger normalises before selecting genes), restricted to ``gene_index``, divided by ``scale``
    (0 where ``scale == 0``), as canonical CSR float32 of shape (stop - start, n_selected).

    Parameters
    ----------
    source : Source
        Raw counts, cells x genes. Stays owned by the caller: :meth:`close` does not close it.
    gene_index : array of int, shape (n_selected,)
        Positions of the selected genes in ``source.var_names``.
    scale : array of float, shape (n_selected,)
        Divisor per selected gene (see :func:`scale_factors`).
    cache : {None, "memory", "disk"}
        Keep the prepared rows after the first full pass (an :meth:`iter_blocks` run to the end, or
        :meth:`build_cache`, which a first :meth:`read_block` triggers), in memory as CSR or in
        temporary binary files under ``tmpdir`` deleted on :meth:`close`. Cached reads equal uncached ones.
    tmpdir : path or None
    block_size : int
        Cells per raw read when the cache is built by a :meth:`read_block`.
    lib_size : array of float64, shape (n_cells,), optional
        The source's library sizes as the statistics pass computed them
        (:attr:`DatasetStats.lib_size`): rows are then not summed again. Bit-identical either way.
    """

    def __init__(self, source: Source, gene_index, scale, *, cache: str | None = None, tmpdir=None,
                 block_size: int = 20000, lib_size=None, raw_copy: DiskCache | None = None):
        gene_index = np.asarray(gene_index, dtype=np.int64).ravel()
        scale = np.asarray(scale, dtype=np.float64).ravel()
        if gene_index.size != scale.size:
            msg = f"{source.name}: expected one scale per selected gene ({gene_index.size}), found {scale.size}"
            raise InputError(msg)
        if gene_index.size and (gene_index.min() < 0 or gene_index.max() >= source.n_genes
                                or np.unique(gene_index).size != gene_index.size):
            msg = f"{source.name}: expected distinct gene positions in 0:{source.n_genes}, found others"
            raise InputError(msg)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            msg = f"{source.name}: expected finite non-negative scale factors, found NaN, inf or negatives"
            raise InputError(msg)
        check_cache_mode(cache)
        check_block_size(block_size)
        self._raw = source
        self.name = source.name
        self.gene_index, self.scale = gene_index, scale
        self.cache_mode, self._tmpdir, self._block_size = cache, tmpdir, int(block_size)
        self._var = np.asarray(source.var_names)[gene_index]
        if lib_size is not None:
            lib_size = np.asarray(lib_size, dtype=np.float64).ravel()
            if lib_size.size != source.n_cells:
                msg = f"{source.name}: expected one library size per cell ({source.n_cells}), found {lib_size.size}"
                raise InputError(msg)
        self._lib_size = lib_size
        # Decoded raw rows kept by the statistics pass (see RawCopies): read instead of decoding again.
        self._raw_copy = raw_copy
        # int32 where it fits: the per-value gather col_map[indices] is a third faster than with int64
        map_dtype = np.int32 if gene_index.size < 2**31 else np.int64
        self._col_map = np.full(source.n_genes, -1, dtype=map_dtype)
        self._col_map[gene_index] = np.arange(gene_index.size)
        self._divisor = np.where(scale > 0, scale, np.inf)
        self._cache: _MemoryCache | DiskCache | None = None
        self._lock = threading.Lock()

    @property
    def n_cells(self) -> int:
        return self._raw.n_cells

    @property
    def var_names(self) -> np.ndarray:
        return self._var

    @property
    def obs_names(self) -> np.ndarray:
        return self._raw.obs_names

    @property
    def source(self) -> Source:
        """The wrapped raw source."""
        return self._raw

    @property
    def cached(self) -> bool:
        """Whether the cache is complete (later reads come from it)."""
        return self._cache is not None

    def _compute(self, start: int, stop: int) -> sp.csr_matrix:
        return self._prepare(self._read_raw(start, stop), start, stop)

    def _read_raw(self, start: int, stop: int) -> sp.csr_matrix:
        if self._raw_copy is not None:
            return self._raw_copy.read(start, stop)
        return self._raw.read_block(start, stop)

    def _drop_raw_copy(self) -> None:
        if self._raw_copy is not None:
            self._raw_copy.close()
            self._raw_copy = None

    def _prepare(self, raw: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
        return stack_parts(self._prepare_parts(raw, start, stop))

    def _prepare_parts(self, raw: sp.csr_matrix, start: int, stop: int) -> list[sp.csr_matrix]:
        """Rows ``start:stop`` prepared from their ``raw`` rows, as consecutive row parts."""
        lib = None if self._lib_size is None else self._lib_size[start:stop]
        threads = read_threads()
        if threads > 1 and raw.nnz >= PIECE_VALUES:  # rows are independent: same bits on any thread count
            return prepare_parts(raw, self._col_map, self._divisor, self.gene_index.size, lib,
                                 threads, thread_pool(threads).map)
        return [_prepare_block(raw, self._col_map, self._divisor, self.gene_index.size, lib)]

    def _new_cache(self) -> _MemoryCache | DiskCache:
        if self.cache_mode == "memory":
            return _MemoryCache(self.gene_index.size)
        return DiskCache(self.gene_index.size, self.name, self._tmpdir)

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        check_range(self, start, stop)
        if self.cache_mode is None:
            return self._compute(start, stop)
        if self._cache is None:
            self.build_cache()
        return self._cache.read(start, stop)  # type: ignore[union-attr]  # built just above

    def _memory_cache_for(self, ranges) -> _MemoryCache | None:
        """The memory cache (built on first use) after checking ``ranges``; None with another mode."""
        if self.cache_mode == "memory" and self._cache is None:
            self.build_cache()
        if not isinstance(self._cache, _MemoryCache):
            return None
        for a, b in ranges:
            check_range(self, a, b)
        return self._cache

    def read_ranges(self, ranges) -> sp.csr_matrix:
        cache = self._memory_cache_for(ranges)
        return super().read_ranges(ranges) if cache is None else cache.read_ranges(ranges)

    def read_pieces(self, ranges) -> list:
        cache = self._memory_cache_for(ranges)
        return super().read_pieces(ranges) if cache is None else cache.read_pieces(ranges)

    def build_cache(self, *, block_size: int | None = None, progress: Progress = None) -> None:
        """Fill the cache in one pass over the raw source (no-op without ``cache`` or when built)."""
        if self.cache_mode is None:
            return
        with self._lock:  # a prefetch thread may call read_block at the same time
            if self._cache is not None:
                return
            logger.info("%s: caching prepared data (%s)", self.name, self.cache_mode)
            cache = self._new_cache()
            try:
                # the next raw block is read on a helper thread while this one is prepared
                for start, stop, raw in prefetch(self._iter_raw(block_size or self._block_size)):
                    for part in self._prepare_parts(raw, start, stop):
                        cache.append(part)
                    if progress is not None:
                        progress(stop - start)
                self._cache = cache.finish()
                self._drop_raw_copy()
            finally:
                if self._cache is not cache:
                    cache.close()

    def _iter_raw(self, block_size: int):
        for start in range(0, self.n_cells, block_size):
            stop = min(start + block_size, self.n_cells)
            yield start, stop, self._read_raw(start, stop)

    def _iter_computed(self, block_size: int):
        # the next raw block is read (and decoded) on a helper thread while this one is prepared
        for start, stop, raw in prefetch(self._iter_raw(block_size)):
            yield start, stop, self._prepare(raw, start, stop)

    def iter_blocks(self, block_size: int):
        """Yield ``(start, stop, block)`` over all cells; the first complete pass fills the cache."""
        check_block_size(block_size)
        if self.cache_mode is None or self._cache is not None:
            yield from super().iter_blocks(block_size)
            return
        cache = self._new_cache()
        try:
            for start, stop, block in self._iter_computed(block_size):
                cache.append(block)
                yield start, stop, block
            with self._lock:
                if self._cache is None:
                    self._cache = cache.finish()
                    self._drop_raw_copy()
        finally:
            if self._cache is not cache:
                cache.close()

    def close(self) -> None:
        """Drop the cache and any raw copy (deleting their files); the raw source is left open."""
        with self._lock:
            self._drop_raw_copy()
            if self._cache is not None:
                self._cache.close()
                self._cache = None


def build_caches(prepared: Sequence[PreparedSource], *, block_size: int | None = None,
                 progress: Progress = None) -> None:
    """Fill the caches of ``prepared`` sources not cached yet; batch splits of one file share one pass.

    With batches interleaved in a file, one pass per batch decodes the whole file once per batch
    (8 batches, 100k cells: 16.8 s; one shared pass: see benchmarks/README.md).
    """
    todo = [p for p in prepared if p.cache_mode is not None and not p.cached]
    # a source with a raw copy reads that copy on its own, not the file with its sibling splits
    for group in split_groups([p.source if p._raw_copy is None else None for p in todo]):
        members = [todo[g] for g in group]
        if len(members) == 1:
            members[0].build_cache(block_size=block_size, progress=progress)
            continue
        for member in members:
            logger.info("%s: caching prepared data (%s)", member.name, member.cache_mode)
        caches = [member._new_cache() for member in members]
        try:
            raws = [member.source for member in members]
            for i, start, stop, raw in prefetch(iter_split_blocks(raws, block_size or members[0]._block_size)):
                for part in members[i]._prepare_parts(raw, start, stop):
                    caches[i].append(part)
                if progress is not None:
                    progress(stop - start)
            for member, cache in zip(members, caches, strict=True):
                with member._lock:
                    member._cache = cache.finish()
        finally:
            for member, cache in zip(members, caches, strict=True):
                if member._cache is not cache:
                    cache.close()
