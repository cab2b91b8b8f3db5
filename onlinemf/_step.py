"""The mini-batch step of online iNMF as pure functions of (factors, statistics, row blocks).

A step of :class:`~onlinemf.engine.OnlineINMF` has two parts:

1. **map** (:func:`unit_stats`): for each *work unit* (a block of at most :data:`UNIT_ROWS` rows of one
   dataset) H by NNLS on the K x K normal equations, and the unit's contributions to the sufficient statistics
   (``H^T H``, ``X^T H``) and to the loss. Units are independent of each other and touch no shared state, so an
   executor (:mod:`onlinemf._executor`) may run them in-process, on threads (scipy's sparse kernels, BLAS and
   numpy's ufuncs release the GIL) or on Dask workers; only factors (K x genes) go in and statistics come out.
2. **reduce and update** (:func:`sum_stats`, then ``_solvers.update_stats`` and ``_solvers.hals_update``,
   sequential and cheap): add the contributions in unit order, apply rliger's A/B schedule, HALS of W and V_i.

The units are a fixed partition of the mini-batch (:func:`work_units`: never a function of the number of threads
or workers) and their contributions are added in unit order, so a fit gives the same model, to the bit, whatever
runs the units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._rowrange import CsrRowRange
from ._solvers import gram, nnls_cd, rhs, row_blocks, squared_norm, xt_times
from ._uinmf import pad_columns

#: Rows per work unit. Fixed, so that results do not depend on the thread count; large enough that the
#: per-call overhead of the H solve's numpy calls stays small next to their work, small enough that a
#: 5000-cell mini-batch of two datasets gives 2 threads about 6 units to share.
UNIT_ROWS = 1024


@dataclass(frozen=True)
class DatasetFactors:
    """What a unit of one dataset needs from the model, computed once per step.

    Attributes
    ----------
    L : ndarray of shape (K, genes)
        ``W + V_i`` (``W`` when projecting on the shared factors only).
    G : ndarray of shape (K, K)
        Gram matrix of the H problem, ``L L^T + lam V_i V_i^T``.
    """

    L: np.ndarray
    G: np.ndarray


def dataset_factors(W: np.ndarray, V: np.ndarray | None, lam: float) -> DatasetFactors:
    """The per-dataset factors of a step: ``L = W + V`` and the Gram matrix (``V=None``: project on W).

    A ``V`` wider than ``W`` is UINMF's ``[V_i, U_i]`` (:mod:`onlinemf._uinmf`): W is zero on the unshared
    columns, so ``L = [W + V_i, U_i]`` and the penalty is on ``[V_i, U_i]``.
    """
    if V is not None and V.shape[1] != W.shape[1]:
        W = pad_columns(W, V.shape[1])
    L = W if V is None else W + V
    return DatasetFactors(L=L, G=gram(W, V, lam))


@dataclass(frozen=True)
class UnitStats:
    """One unit's contributions: ``HtH`` (K, K) and ``XtH`` (genes, K) in the working dtype, its loss
    ``||X - H L||^2 + lam ||H V||^2`` (float64) and its number of rows."""

    HtH: np.ndarray
    XtH: np.ndarray
    loss: float
    n_rows: int


def work_units(X) -> list:
    """Split a mini-batch (a matrix or a list of row blocks) into blocks of at most :data:`UNIT_ROWS` rows.

    CSR blocks become :class:`~onlinemf._rowrange.CsrRowRange` references (no copy); dense blocks are sliced
    (views). The split depends only on the blocks' sizes.
    """
    units: list = []
    for block in row_blocks(X):
        n = block.shape[0]
        if hasattr(block, "split_units"):  # rows described, not read: a Dask worker reads each unit (onlinemf._dask)
            units.extend(block.split_units(UNIT_ROWS))
            continue
        if isinstance(block, CsrRowRange):
            matrix, offset = block.matrix, block.start
        elif sp.issparse(block):
            matrix, offset = sp.csr_matrix(block), 0  # no copy for CSR input
        else:
            arr = np.asarray(block)
            units.extend(arr[a:a + UNIT_ROWS] for a in range(0, n, UNIT_ROWS))
            continue
        units.extend(CsrRowRange(matrix, offset + a, offset + min(a + UNIT_ROWS, n)) for a in range(0, n, UNIT_ROWS))
    return units


def _solve(X, factors: DatasetFactors, n_sweeps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H^T of shape (K, n), X L^T of shape (n, K))`` for one unit."""
    XL = rhs(X, factors.L)
    Ht = nnls_cd(factors.G, XL.T, n_sweeps=n_sweeps)
    return Ht, XL


def _loss(X, Ht: np.ndarray, XL: np.ndarray, G: np.ndarray) -> float:
    """``||X||^2 - 2 tr(H^T X L^T) + tr(H^T H G)`` in float64 (no cells x genes reconstruction)."""
    Ht64 = np.asarray(Ht, dtype=np.float64)
    cross = float(np.vdot(Ht64.T, np.asarray(XL, dtype=np.float64)))
    quad = float(np.vdot(Ht64 @ Ht64.T, np.asarray(G, dtype=np.float64)))
    return squared_norm(X) - 2.0 * cross + quad


def unit_stats(X, factors: DatasetFactors, n_sweeps: int) -> UnitStats:
    """H of one unit and its contributions to the statistics and the loss (the map of a step).

    Parameters
    ----------
    X : CsrRowRange, CSR matrix or ndarray of shape (n, genes)
        One work unit of prepared data, in the working dtype.
    factors : DatasetFactors
    n_sweeps : int
        Coordinate-descent sweeps of the H solve.
    """
    XL = rhs(X, factors.L)
    return _finish_stats(X, XL, nnls_cd(factors.G, XL.T, n_sweeps=n_sweeps), factors)


def _finish_stats(X, XL: np.ndarray, Ht: np.ndarray, factors: DatasetFactors) -> UnitStats:
    return UnitStats(HtH=Ht @ Ht.T, XtH=xt_times(X, Ht.T), loss=_loss(X, Ht, XL, factors.G), n_rows=X.shape[0])


def unit_h(X, factors: DatasetFactors, n_sweeps: int, with_loss: bool = False) -> tuple[np.ndarray, float | None]:
    """H of one unit, shape (n, K) C-contiguous, and its loss when ``with_loss`` (final H, projection)."""
    Ht, XL = _solve(X, factors, n_sweeps)
    loss = _loss(X, Ht, XL, factors.G) if with_loss else None
    return np.ascontiguousarray(Ht.T), loss


class _Phased:
    """A unit function in three phases, ``finish(item, XL, solve(item, XL))`` with ``XL = products(item)``.

    Local threads run ``products`` (the sparse ``X L^T``) and ``finish`` (the sparse ``X^T H`` and the loss) on
    the pool: scipy's kernels release the GIL, so they scale. ``solve``, the coordinate-descent H solve, is
    hundreds of short numpy calls that drop and retake the GIL each time; two threads running it at once
    thrash the GIL (measured: 2-3x *slower* than one thread), so an executor runs it in one thread, overlapped
    with the pool's sparse work (:class:`onlinemf._executor.ThreadExecutor`). Calling the object runs the three
    phases in a row: the same operations, so the same bits, whatever runs them.
    """

    factors: dict[str, DatasetFactors]
    n_sweeps: int

    def products(self, item: tuple) -> np.ndarray:
        name, X = item
        return rhs(X, self.factors[name].L)

    def solve(self, item: tuple, XL: np.ndarray) -> np.ndarray:
        return nnls_cd(self.factors[item[0]].G, XL.T, n_sweeps=self.n_sweeps)

    def finish(self, item: tuple, XL: np.ndarray, Ht: np.ndarray):  # pragma: no cover - subclasses
        raise NotImplementedError

    def __call__(self, item: tuple):
        XL = self.products(item)
        return self.finish(item, XL, self.solve(item, XL))


@dataclass(frozen=True)
class UnitTask(_Phased):
    """The map of a step as a picklable function of ``(dataset name, unit)``: :func:`unit_stats` with that
    dataset's factors (a Dask executor sends it once per step to every worker)."""

    factors: dict[str, DatasetFactors]
    n_sweeps: int

    def finish(self, item: tuple, XL: np.ndarray, Ht: np.ndarray) -> UnitStats:
        name, X = item
        return _finish_stats(X, XL, Ht, self.factors[name])


@dataclass(frozen=True)
class HTask(_Phased):
    """:func:`unit_h` as a function of ``(dataset name, unit)``: H (n, K) and the unit's loss if ``with_loss``."""

    factors: dict[str, DatasetFactors]
    n_sweeps: int
    with_loss: bool = False

    def finish(self, item: tuple, XL: np.ndarray, Ht: np.ndarray) -> tuple[np.ndarray, float | None]:
        name, X = item
        loss = _loss(X, Ht, XL, self.factors[name].G) if self.with_loss else None
        return np.ascontiguousarray(Ht.T), loss


def sum_stats(parts: list[UnitStats]) -> UnitStats:
    """The contributions of one dataset's units added in the given (unit) order."""
    HtH = parts[0].HtH.copy()
    XtH = parts[0].XtH.copy()
    for part in parts[1:]:
        HtH += part.HtH
        XtH += part.XtH
    return UnitStats(HtH=HtH, XtH=XtH, loss=float(sum(p.loss for p in parts)), n_rows=sum(p.n_rows for p in parts))
