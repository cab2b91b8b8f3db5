"""A :class:`~onlinemf._source.Source` over a 2-D dask array (an AnnData's lazy ``X``), read one row block at a time.

``anndata.experimental.read_lazy`` / ``anndata.io.read_elem_lazy`` (or ``adata.X = dask.array.from_array(...)``)
give ``X`` as a dask array of scipy sparse or numpy chunks. Wrapping it in a
:class:`~onlinemf._source.MemorySource` would compute the whole matrix; this source computes only the rows
asked for (``X[a:b].compute()``), so memory stays bounded by the block. It sits beside ``MemorySource`` (not in
``readers``) because the engine's :func:`~onlinemf._training.as_sources` uses it, and the engine depends on
no reader. dask is never imported here: the array is recognised by its type's module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ._errors import InputError
from ._source import Source, check_indices, check_range, check_values, matrix_names


def is_dask_array(X: Any) -> bool:
    """Whether ``X`` is a ``dask.array.Array`` (checked without importing dask)."""
    return any(cls.__module__.startswith("dask.array") and cls.__name__ == "Array" for cls in type(X).__mro__)


class DaskArraySource(Source):
    """Cells x genes counts held by a 2-D dask array, read with ``X[start:stop].compute()`` per block.

    Each block is returned as canonical CSR float32 and its values are checked (finite, non-negative) as it
    is read, as the file readers do; nothing is computed when the source is made.

    Parameters
    ----------
    X : dask.array.Array of shape (n_cells, n_genes)
        Chunks of scipy sparse matrices/arrays or numpy arrays, of a real numeric dtype.
    name : str
        Dataset name, used in error messages.
    var_names : array-like of str, shape (n_genes,), optional
        Gene names; placeholders ``gene0...`` when None.
    obs_names : array-like of str, shape (n_cells,), optional
        Cell names; ``<name>_0...`` when None.
    """

    def __init__(self, X: Any, *, name: str = "dataset", var_names=None, obs_names=None):
        self.name = str(name)
        if getattr(X, "ndim", None) != 2:
            msg = f"{self.name}: expected a 2-D cells x genes dask array, found {getattr(X, 'ndim', '?')} dimension(s)"
            raise InputError(msg)
        dtype = np.dtype(X.dtype)
        if dtype.kind not in "biuf":
            msg = f"{self.name}: expected numeric values, found dtype {dtype}"
            raise InputError(msg)
        if any(np.isnan(c) for c in X.shape):
            msg = f"{self.name}: expected a dask array of known shape, found {X.shape} (call X.compute_chunk_sizes())"
            raise InputError(msg)
        self._X = X
        self.placeholder_genes = var_names is None
        self._obs, self._var = matrix_names(self.name, X.shape, obs_names, var_names)

    @property
    def n_cells(self) -> int:
        return int(self._X.shape[0])

    @property
    def var_names(self) -> np.ndarray:
        return self._var

    @property
    def obs_names(self) -> np.ndarray:
        return self._obs

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        check_range(self, start, stop)
        return as_csr_block(self._X[start:stop].compute(), self.name, self.n_genes)


def as_csr_block(block: Any, name: str, n_genes: int) -> sp.csr_matrix:
    """A computed block (scipy sparse or numpy) as canonical CSR float32, values and indices checked."""
    if sp.issparse(block):
        block = sp.csr_matrix(block, dtype=np.float32)
        check_indices(block.indices, n_genes, name)
    else:
        block = np.asarray(block)
        if block.ndim != 2:
            msg = f"{name}: expected 2-D blocks from the dask array, found {block.ndim} dimension(s)"
            raise InputError(msg)
        block = sp.csr_matrix(block.astype(np.float32, copy=False))
    block.sum_duplicates()
    block.sort_indices()
    check_values(block.data, name)
    return block
