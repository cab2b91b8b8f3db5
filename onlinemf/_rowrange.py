"""Row ranges of a CSR matrix used in place, and the sparse x dense products over them.

A mini-batch is a few contiguous 1000-cell chunks of a dataset. Building a ``csr_matrix`` over a
slice of the dataset's arrays does not give a view: scipy's constructor runs ``check_format``,
whose ``prune`` copies any array that is a view of less than half of its base. That copy of every
non-zero, once per iteration, was 15 % of a fit. A :class:`CsrRowRange` keeps the matrix and the
range instead, and the products call the kernels scipy's own ``@`` calls (``csr_matvecs`` /
``csc_matvecs`` from ``scipy.sparse._sparsetools``) with the slice of ``indptr``, which indexes
the full ``indices``/``data`` arrays directly. Those kernels accumulate into their output, so the
products over consecutive ranges of one mini-batch add up in the same order, and to the same
bits, as one product over the stacked rows. Should a scipy release drop that private module or change
how its kernels are called (checked once at import on a small matrix), the products fall back to
building the sub-matrix (a copy, same results).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

try:  # the kernels behind scipy's CSR/CSC @ dense since scipy 0.7
    from scipy.sparse._sparsetools import csc_matvecs, csr_matvecs
except ImportError:  # pragma: no cover - depends on the scipy release
    csc_matvecs = csr_matvecs = None


def _kernels_agree_with_scipy() -> bool:
    """Whether the private kernels, called as below, give scipy's public products on a small matrix."""
    X = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 5.0]], dtype=np.float32))
    dense = np.arange(6, dtype=np.float32).reshape(3, 2)
    try:
        y, z = np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32)
        csr_matvecs(2, 3, 2, X.indptr[1:4], X.indices, X.data, dense.ravel(), y.ravel())
        csc_matvecs(3, 2, 2, X.indptr[1:4], X.indices, X.data, dense[:2].ravel(), z.ravel())
    except Exception:  # noqa: BLE001 - any change of signature means: do not use them
        return False
    return np.array_equal(y, X[1:3] @ dense) and np.array_equal(z, X[1:3].T @ dense[:2])


if csr_matvecs is not None and not _kernels_agree_with_scipy():  # pragma: no cover - scipy-dependent
    csc_matvecs = csr_matvecs = None


@dataclass(frozen=True, slots=True)
class CsrRowRange:
    """Rows ``start:stop`` of the canonical CSR matrix ``matrix``, referenced without a copy.

    Not a tuple, so a list of blocks is never mistaken for one block or the reverse.
    """

    matrix: sp.csr_matrix
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.matrix.shape[1])

    @property
    def dtype(self):
        return self.matrix.dtype

    @property
    def data(self) -> np.ndarray:
        """The non-zero values of the rows (a view)."""
        ip = self.matrix.indptr
        return self.matrix.data[ip[self.start]:ip[self.stop]]

    def tocsr(self) -> sp.csr_matrix:
        """The rows as their own CSR matrix (a copy)."""
        X, a, b = self.matrix, self.start, self.stop
        lo, hi = X.indptr[a], X.indptr[b]
        out = sp.csr_matrix((X.data[lo:hi].copy(), X.indices[lo:hi].copy(), X.indptr[a:b + 1] - lo),
                            shape=self.shape)
        out.has_canonical_format = True
        return out

    def _kernel_args(self, dense: np.ndarray):
        """``(indptr, indices, data)`` for the in-place kernels, or None when they cannot be used."""
        X = self.matrix
        if (csr_matvecs is None or X.data.dtype != dense.dtype or X.indices.dtype != X.indptr.dtype
                or not dense.flags.c_contiguous):
            return None
        return X.indptr[self.start:self.stop + 1], X.indices, X.data


def materialize(block):
    """A :class:`CsrRowRange` as its own CSR matrix (a copy); any other block unchanged."""
    return block.tocsr() if isinstance(block, CsrRowRange) else block


def add_rows_times(block: CsrRowRange, dense: np.ndarray, out: np.ndarray) -> None:
    """``out += block @ dense`` with ``dense`` (genes, K) and ``out`` (rows, K), both C-contiguous."""
    args = block._kernel_args(dense)
    if args is None or not out.flags.c_contiguous or out.dtype != dense.dtype:
        out += block.tocsr() @ dense
        return
    n, m = block.shape
    csr_matvecs(n, m, dense.shape[1], *args, dense.ravel(), out.reshape(-1))


def add_rows_transposed_times(block: CsrRowRange, dense: np.ndarray, out: np.ndarray) -> None:
    """``out += block.T @ dense`` with ``dense`` (rows, K) and ``out`` (genes, K), both C-contiguous."""
    args = block._kernel_args(dense)
    if args is None or not out.flags.c_contiguous or out.dtype != dense.dtype:
        out += block.tocsr().T @ dense
        return
    n, m = block.shape
    csc_matvecs(m, n, dense.shape[1], *args, dense.ravel(), out.reshape(-1))
