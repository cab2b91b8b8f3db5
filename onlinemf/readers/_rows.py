"""Row readers: contiguous file-row ranges of one on-disk matrix element, returned as CSR float32.

Compressed (gzip) datasets are decoded on several threads by :func:`._decode.read_range`.

Each reader reads only what a range needs (the indptr window and one data/indices range for
CSR, a row slice for dense) and exposes ``span_rows``, a row count that keeps one read bounded
in memory. :func:`read_rows` gathers arbitrary sorted file rows through such bounded spans.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._errors import InputError
from .._source import check_indices, check_values
from ._decode import read_range

# About 4 M stored values (~32-48 MB with indices) per read: bounded, yet large enough that
# HDF5's per-call overhead does not matter.
SPAN_VALUES = 1 << 22
# Wanted rows further apart than this start a new span, so gaps between them are not read.
MAX_GAP_ROWS = 256


def as_float32(values) -> np.ndarray:
    """Stored values as float32. Values beyond float32's range (about 3.4e38) become inf, which the
    readers' value check refuses; numpy's overflow warning is silenced so the user sees that one error."""
    with np.errstate(over="ignore"):
        return np.asarray(values).astype(np.float32, copy=False)


def _empty(n_cols: int, n_rows: int = 0) -> sp.csr_matrix:
    return sp.csr_matrix((n_rows, n_cols), dtype=np.float32)


class CsrRows:
    """Rows of a compressed-row layout: ``data``, ``indices`` and ``indptr`` datasets (or arrays).

    Also serves 10x files, whose per-cell compressed columns are cells x genes rows.
    """

    def __init__(self, data, indices, indptr, shape: tuple[int, int]):
        self._data, self._indices, self._indptr = data, indices, indptr
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = data.dtype
        mean_row_nnz = data.shape[0] / max(1, self.shape[0])
        self.span_rows = max(64, int(SPAN_VALUES / max(1.0, mean_row_nnz)))

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        """Rows ``lo:hi`` as CSR float32, shape (hi - lo, n_cols); indices as stored."""
        if hi <= lo:
            return _empty(self.shape[1])
        ptr = np.asarray(read_range(self._indptr, lo, hi + 1), dtype=np.int64)
        first, last = int(ptr[0]), int(ptr[-1])
        data = as_float32(read_range(self._data, first, last))
        indices = np.asarray(read_range(self._indices, first, last))
        if indices.dtype.kind == "u":  # 10x stores uint32; scipy wants signed indices
            # uint32 values >= 2**31 turn negative in int32 and uint64 ones >= 2**63 in int64, which the per-block
            # index check refuses; uint64 must not go to int32, where 2**32 + i would wrap back to a valid i.
            small = self.shape[1] < 2**31 and indices.dtype.itemsize <= 4
            indices = indices.astype(np.int32 if small else np.int64)
        return sp.csr_matrix((data, indices, ptr - first), shape=(hi - lo, self.shape[1]))


class DenseRows:
    """Rows of a dense 2-D dataset, converted to CSR span by span."""

    def __init__(self, dataset):
        self._dataset = dataset
        self.shape = (int(dataset.shape[0]), int(dataset.shape[1]))
        self.dtype = dataset.dtype
        self.span_rows = max(1, SPAN_VALUES // max(1, self.shape[1]))

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        if hi <= lo:
            return _empty(self.shape[1])
        block = as_float32(read_range(self._dataset, lo, hi))
        return sp.csr_matrix(block)


def spans(file_rows: np.ndarray, span_rows: int, max_gap: int | None = None):
    """Split sorted ``file_rows`` into reads: yield ``(lo, hi, i0, i1)`` where the file-row range
    ``lo:hi`` (at most ``span_rows`` long) covers ``file_rows[i0:i1]``; wanted rows more than ``max_gap`` apart (default ``MAX_GAP_ROWS``)
    go to separate reads."""
    max_gap = MAX_GAP_ROWS if max_gap is None else max_gap
    n = len(file_rows)
    if n == 0:
        return
    breaks = np.flatnonzero(np.diff(file_rows) > max_gap) + 1
    bounds = np.concatenate(([0], breaks, [n]))
    for seg_start, seg_stop in zip(bounds[:-1], bounds[1:], strict=True):
        i0 = int(seg_start)
        while i0 < seg_stop:
            lo = int(file_rows[i0])
            i1 = int(np.searchsorted(file_rows[i0:seg_stop], lo + span_rows, side="left")) + i0
            hi = int(file_rows[i1 - 1]) + 1
            yield lo, hi, i0, i1
            i0 = i1


def read_rows(reader, file_rows: np.ndarray | None, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of the source as CSR float32, read in spans of at most ``stop - start``
    (or ``reader.span_rows`` if larger) file rows.

    ``file_rows`` (sorted) maps source rows to file rows; None means the identity.
    """
    n_cols = reader.shape[1]
    if stop <= start:
        return _empty(n_cols)
    # A read may cover as many rows as the caller asked for: the block is held whole anyway, and
    # stacking span-sized pieces copied every block once more (0.1 s per 14 M values).
    span_rows = max(reader.span_rows, stop - start)
    pieces = []
    if file_rows is None:
        for lo in range(start, stop, span_rows):
            pieces.append(reader.read(lo, min(lo + span_rows, stop)))
    else:
        wanted = file_rows[start:stop]
        for lo, hi, i0, i1 in spans(wanted, span_rows):
            block = reader.read(lo, hi)
            if i1 - i0 != hi - lo:  # the span has rows we do not want
                block = block[wanted[i0:i1] - lo]
            pieces.append(block)
    block = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
    return sp.csr_matrix(block, dtype=np.float32)


def read_checked_rows(reader, file_rows: np.ndarray | None, start: int, stop: int, label: str,
                      hint: str = "") -> sp.csr_matrix:
    """:func:`read_rows`, then the per-block checks every reader makes: an unreadable span is an InputError
    naming ``label`` (and ``hint``), indices must lie within the genes, values finite and non-negative; the
    block comes back canonical (duplicates summed, indices sorted)."""
    try:
        block = read_rows(reader, file_rows, start, stop)
    except OSError as exc:
        msg = f"{label}: could not read cells {start}:{stop}{hint}: {exc}"
        raise InputError(msg) from None
    check_indices(block.indices, block.shape[1], label)
    block.sum_duplicates()  # also sorts indices
    check_values(block.data, label)
    return block
