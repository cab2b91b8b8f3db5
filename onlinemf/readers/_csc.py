"""One-off conversion of an on-disk CSC matrix to a temporary CSR HDF5 file, in bounded memory.

Row blocks of a CSC matrix touch every column, so streaming cells from it directly would re-read
the whole file per block. Instead we pass over the columns once in blocks of about ``budget``
stored values, append each block's entries to per-row-chunk bucket files, then turn each bucket
into CSR rows (an external bucket sort). Memory stays near one column block plus one row chunk.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .._source import check_indices
from ._decode import read_range
from ._rows import SPAN_VALUES, CsrRows, as_float32

logger = logging.getLogger(__name__)


def _column_blocks(colptr: np.ndarray, budget: int):
    """Yield ``(c0, c1)`` column ranges holding about ``budget`` stored values each (at least one column)."""
    n_cols = len(colptr) - 1
    c0 = 0
    while c0 < n_cols:
        c1 = int(np.searchsorted(colptr, colptr[c0] + budget, side="right")) - 1
        c1 = min(max(c1, c0 + 1), n_cols)
        yield c0, c1
        c0 = c1


_TRIPLET = np.dtype([("row", "<i4"), ("col", "<i4"), ("val", "<f4")])


def _appendable(group: h5py.Group, name: str, dtype) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 18,))


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    n = dataset.shape[0]
    dataset.resize((n + len(values),))
    dataset[n:] = values


def default_budget(nnz: int) -> int:
    """Values held at once: ``SPAN_VALUES / 4`` (~32 MB of scratch), more for huge matrices so that
    the number of pieces (column blocks x row chunks) stays below about 256 x 256."""
    return int(min(max(SPAN_VALUES // 4, nnz // 256), 2 * SPAN_VALUES))


def convert_csc(group: h5py.Group, shape: tuple[int, int], out_path: Path, *, progress=None, budget: int | None = None) -> None:
    """Write the CSC ``group`` (``data``, ``indices`` = row ids, ``indptr`` per column) of ``shape``
    (n_rows, n_cols) as CSR float32 datasets ``data``/``indices``/``indptr`` in a new file ``out_path``.

    ``budget`` bounds the stored values held at once (default :func:`default_budget`); scratch
    memory peaks near 32 bytes per budgeted value.
    ``progress(done, total)``, if given, is called after each of the ``total`` steps.
    Values are copied as float32 without checks (the reader checks every block it serves).
    """
    n_rows, n_cols = shape
    colptr = np.asarray(group["indptr"][()], dtype=np.int64)
    data, row_ids = group["data"], group["indices"]
    nnz = int(colptr[-1])
    budget = default_budget(nnz) if budget is None else budget
    rows_per_chunk = max(1, math.ceil(n_rows * budget / max(1, nnz)))
    chunk_starts = np.arange(0, n_rows, rows_per_chunk)
    col_blocks = list(_column_blocks(colptr, budget))
    total, done = len(col_blocks) + len(chunk_starts), 0
    # Buckets are plain append-only files of (row, col, value) records: appending to many HDF5
    # datasets in turn thrashes its chunk cache, and HDF5 never reclaims deleted space.
    buckets = [out_path.with_name(f"{out_path.name}.bucket{i}") for i in range(len(chunk_starts))]
    for c0, c1 in col_blocks:
        first, last = int(colptr[c0]), int(colptr[c1])
        ids = np.asarray(read_range(row_ids, first, last))
        check_indices(ids, n_rows, f"{group.file.filename} ({group.name.lstrip('/')})", what="cell")  # before scipy's kernels
        block = sp.csc_matrix(
            (as_float32(read_range(data, first, last)), ids, colptr[c0 : c1 + 1] - first),
            shape=(n_rows, c1 - c0),
        ).tocsr()  # the rows of each chunk are now one contiguous range
        for bucket, r0 in zip(buckets, chunk_starts, strict=True):
            r1 = min(int(r0) + rows_per_chunk, n_rows)
            a, b = int(block.indptr[r0]), int(block.indptr[r1])
            if b > a:
                records = np.empty(b - a, dtype=_TRIPLET)
                records["row"] = np.repeat(np.arange(r1 - r0, dtype=np.int32), np.diff(block.indptr[r0 : r1 + 1]))
                records["col"] = block.indices[a:b] + c0
                records["val"] = block.data[a:b]
                with open(bucket, "ab") as handle:
                    records.tofile(handle)
        del block
        done += 1
        if progress is not None:
            progress(done, total)
    with h5py.File(out_path, "w") as out:
        out_data, out_indices = _appendable(out, "data", np.float32), _appendable(out, "indices", np.int32)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        for bucket, r0 in zip(buckets, chunk_starts, strict=True):
            r1 = min(int(r0) + rows_per_chunk, n_rows)
            records = np.fromfile(bucket, dtype=_TRIPLET) if bucket.exists() else np.empty(0, dtype=_TRIPLET)
            chunk = sp.coo_matrix((records["val"], (records["row"], records["col"])), shape=(r1 - r0, n_cols)).tocsr()
            del records
            bucket.unlink(missing_ok=True)
            chunk.sum_duplicates()
            indptr[r0 + 1 : r1 + 1] = indptr[r0] + chunk.indptr[1:]
            _append(out_data, chunk.data)
            _append(out_indices, chunk.indices.astype(np.int32))
            done += 1
            if progress is not None:
                progress(done, total)
        out.create_dataset("indptr", data=indptr)


def _remove(h5: h5py.File, folder: str) -> None:
    try:
        h5.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ConvertedCsc:
    """A temporary CSR copy of a CSC element, shared by the sources split from one file.

    The temporary folder is removed when the last user calls :meth:`release` (or at garbage
    collection / interpreter exit, whichever comes first).
    """

    def __init__(self, group: h5py.Group, shape: tuple[int, int], *, tmp_dir=None, progress=None):
        folder = tempfile.mkdtemp(prefix="onlinemf-csr-", dir=tmp_dir)
        try:
            path = Path(folder) / "X.csr.h5"
            logger.info("converting CSC %s%s %s to a temporary CSR file in %s", group.file.filename, group.name, shape, folder)
            convert_csc(group, shape, path, progress=progress)
            self._h5 = h5py.File(path, "r")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.folder = folder
        self.rows = CsrRows(self._h5["data"], self._h5["indices"], self._h5["indptr"], shape)
        self.rows.dtype = group["data"].dtype  # report the source dtype, not the copy's
        self._users = 1
        self._finalizer = weakref.finalize(self, _remove, self._h5, folder)

    def acquire(self) -> ConvertedCsc:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._finalizer()
