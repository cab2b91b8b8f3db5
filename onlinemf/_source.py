"""The :class:`Source` contract that readers implement and the engine and preprocessing consume, and the in-memory source.

It lives at the package root (not in ``readers``) so the engine can depend on the contract without depending on any reader.

A source is one dataset: ``n_cells`` x ``n_genes`` counts, read as contiguous row blocks.
Readers do I/O only; no normalisation or other math happens here.
"""

from __future__ import annotations

import abc

import numpy as np
import scipy.sparse as sp

from ._errors import InputError
from ._rowrange import CsrRowRange


class Source(abc.ABC):
    """One dataset, cells x genes, read in contiguous row blocks.

    Attributes
    ----------
    name : str
        Dataset name (file stem, batch category, ...).
    var_names : ndarray of str, shape (n_genes,)
    obs_names : ndarray of str, shape (n_cells,)
    """

    name: str
    #: True when ``var_names`` are placeholders (a wrapped matrix without gene names): never compared with a model's.
    placeholder_genes: bool = False

    @property
    @abc.abstractmethod
    def n_cells(self) -> int: ...

    @property
    @abc.abstractmethod
    def var_names(self) -> np.ndarray: ...

    @property
    @abc.abstractmethod
    def obs_names(self) -> np.ndarray: ...

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    @abc.abstractmethod
    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as canonical CSR float32 of shape (stop - start, n_genes).

        Only those rows are read from disk.
        """

    def read_ranges(self, ranges) -> sp.csr_matrix:
        """The rows of several contiguous ``(start, stop)`` ranges, stacked in that order (a mini-batch)."""
        blocks = self.read_pieces(ranges)
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")

    def read_pieces(self, ranges) -> list:
        """The rows of several contiguous ``(start, stop)`` ranges as a list of blocks, in that order.

        The engine's fit loop computes on the blocks without stacking them; in-memory sources return
        :class:`~onlinemf._rowrange.CsrRowRange` references into their matrix, so a mini-batch costs no copy.
        """
        return [self.read_block(a, b) for a, b in ranges]

    def iter_blocks(self, block_size: int):
        """Yield ``(start, stop, block)`` over all cells in order."""
        for start in range(0, self.n_cells, block_size):
            stop = min(start + block_size, self.n_cells)
            yield start, stop, self.read_block(start, stop)

    def close(self) -> None:  # noqa: B027 - optional for in-memory sources
        """Release file handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_cells={self.n_cells}, n_genes={self.n_genes})"


def check_range(source: Source, start: int, stop: int) -> None:
    if not (0 <= start <= stop <= source.n_cells):
        msg = f"{source.name}: block {start}:{stop} is outside 0:{source.n_cells}"
        raise IndexError(msg)


class MemorySource(Source):
    """A source over an in-memory matrix (scipy sparse or numpy), cells x genes.

    Values are checked once here (finite, non-negative) so the engine never sees bad data.
    """

    def __init__(self, X, *, name: str = "dataset", var_names=None, obs_names=None, check: bool = True):
        X = as_matrix(X, name, check=check)
        self._X = X
        self.name = str(name)
        self.placeholder_genes = var_names is None
        self._obs, self._var = matrix_names(self.name, X.shape, obs_names, var_names)

    @property
    def n_cells(self) -> int:
        return self._X.shape[0]

    @property
    def var_names(self) -> np.ndarray:
        return self._var

    @property
    def obs_names(self) -> np.ndarray:
        return self._obs

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        check_range(self, start, stop)
        return csr_rows(self._X, start, stop)

    def read_ranges(self, ranges) -> sp.csr_matrix:
        for a, b in ranges:
            check_range(self, a, b)
        return csr_ranges(self._X, ranges)

    def read_pieces(self, ranges) -> list[CsrRowRange]:
        for a, b in ranges:
            check_range(self, a, b)
        return [CsrRowRange(self._X, int(a), int(b)) for a, b in ranges]


def matrix_names(name: str, shape: tuple[int, int], obs_names, var_names) -> tuple[np.ndarray, np.ndarray]:
    """Cell and gene names of an in-memory matrix as str arrays (placeholders where None), checked against its shape."""
    n, m = (int(c) for c in shape)
    obs = np.asarray(obs_names if obs_names is not None else [f"{name}_{i}" for i in range(n)], dtype=object).astype(str)
    var = np.asarray(var_names if var_names is not None else [f"gene{i}" for i in range(m)], dtype=object).astype(str)
    if len(var) != m or len(obs) != n:
        msg = f"{name}: names do not match the matrix shape {(n, m)}"
        raise InputError(msg)
    return obs, var


def csr_rows(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a canonical CSR matrix, without scipy's fancy row slicing.

    scipy's constructor still copies a slice smaller than half of the matrix (``check_format`` prunes
    views); the fit loop avoids that with :class:`~onlinemf._rowrange.CsrRowRange`.
    """
    lo, hi = X.indptr[start], X.indptr[stop]
    out = sp.csr_matrix((X.data[lo:hi], X.indices[lo:hi], X.indptr[start:stop + 1] - lo), shape=(stop - start, X.shape[1]))
    out.has_canonical_format = True
    return out


def csr_ranges(X: sp.csr_matrix, ranges) -> sp.csr_matrix:
    """Rows of several ``(start, stop)`` ranges of a canonical CSR matrix, stacked, in one copy."""
    ip = X.indptr
    data = np.concatenate([X.data[ip[a]:ip[b]] for a, b in ranges])
    indices = np.concatenate([X.indices[ip[a]:ip[b]] for a, b in ranges])
    counts = np.concatenate([np.diff(ip[a:b + 1]) for a, b in ranges])
    indptr = np.zeros(counts.size + 1, dtype=ip.dtype)
    np.cumsum(counts, out=indptr[1:])
    out = sp.csr_matrix((data, indices, indptr), shape=(counts.size, X.shape[1]))
    out.has_canonical_format = True
    return out


def as_matrix(X, name: str, *, dtype=np.float32, check: bool = True) -> sp.csr_matrix:
    """A cells x genes scipy matrix or array as canonical CSR of ``dtype`` (values checked when ``check``)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=dtype)
    else:
        X = np.asarray(X)
        if X.dtype == object:  # e.g. a nested list or object array of numbers
            try:
                X = X.astype(np.float64)
            except (TypeError, ValueError):
                msg = f"{name}: expected numeric values, found dtype object with non-numeric entries"
                raise InputError(msg) from None
        if X.ndim != 2:
            msg = f"{name}: expected a 2-D cells x genes matrix, found {X.ndim} dimension(s)"
            raise InputError(msg)
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            msg = f"{name}: expected numeric values, found dtype {X.dtype}"
            raise InputError(msg)
        X = sp.csr_matrix(X.astype(dtype, copy=False))
    X.sum_duplicates()
    X.sort_indices()
    if check:
        check_values(X.data, name)
    return X


def check_values(values: np.ndarray, name: str) -> None:
    """Raise :class:`InputError` if ``values`` has NaN/inf or negative entries."""
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        if np.isnan(values).any():
            msg = f"{name}: expected finite counts, found NaN values"
        else:
            msg = f"{name}: expected finite counts, found infinite values (or values above 3.4e38, too large for float32)"
        raise InputError(msg)
    if values.min() < 0:
        msg = f"{name}: expected non-negative counts, found a minimum of {values.min():g}"
        raise InputError(msg)


def check_indices(indices: np.ndarray, n: int, name: str, what: str = "gene") -> None:
    """Raise :class:`InputError` if a stored index of a compressed matrix lies outside ``0:n``.

    Out-of-range indices (a damaged or hand-made file) would make scipy's kernels read and write out of
    bounds; readers check each block as they read it (one max: cheap next to decompressing it).
    """
    if indices.size == 0:
        return
    # One reduction, not two: seen as unsigned, a negative index is larger than any valid one.
    unsigned = indices.view(f"u{indices.dtype.itemsize}") if indices.dtype.kind == "i" else indices
    if unsigned.max() >= n:
        low, high = indices.min(), indices.max()
        msg = f"{name}: expected {what} indices within 0:{n}, found {low if low < 0 else high} (damaged file?)"
        raise InputError(msg)
