"""Streaming reader for AnnData ``.zarr`` stores (``anndata.AnnData.write_zarr``): CSR or dense X, batches in obs.

The rows are read by the same row readers as ``.h5ad`` (:mod:`._rows`: an indptr window and one data/indices
range for CSR, a row slice for dense), on zarr arrays instead of HDF5 datasets, so a store gives the same blocks,
to the bit, as the ``.h5ad`` it was written from. Names and obs columns are decoded with ``anndata.io.read_elem``
(only those elements, never X). The command line takes a store wherever it takes an ``.h5ad`` (:func:`onlinemf.readers.open_sources`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import InputError
from .._source import Source, check_range
from ._checks import check_compressed, read_shape, string_array_length
from ._h5 import category_rows, duplicates, failure_reason
from ._h5ad import check_numeric, check_rows
from ._rows import CsrRows, DenseRows, read_checked_rows

logger = logging.getLogger(__name__)


def _open_group(path: Path):
    import zarr

    if not path.exists():
        msg = f"{path}: no such zarr store"
        raise InputError(msg)
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for a folder that is not a store
        msg = f"{path}: expected an AnnData .zarr store, could not open it as zarr ({type(exc).__name__}: {exc})"
        raise InputError(msg) from None
    if root.attrs.get("encoding-type") != "anndata":
        msg = f"{path}: expected an AnnData .zarr store (encoding-type 'anndata'), found {root.attrs.get('encoding-type')!r}"
        raise InputError(msg)
    return root


def _read_elem(root, key: str, path: Path):
    """``anndata.io.read_elem`` of one element; any failure of a damaged element is an :class:`InputError` naming it."""
    import warnings

    from anndata.io import read_elem

    try:
        element = root[key]
    except KeyError:
        msg = f"{path}: expected an element {key!r} in the store, found none"
        raise InputError(msg) from None
    try:
        with warnings.catch_warnings():  # e.g. anndata's OldFormatWarning: nothing the user must act on here
            warnings.simplefilter("ignore")
            return read_elem(element)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged element fails in zarr, numpy, pandas or anndata, in many ways
        msg = f"{path}: could not read {key}: {failure_reason(exc, root, key)}"
        raise InputError(msg) from None


def _index_key(root, frame: str, path: Path) -> str:
    """Where the index of dataframe ``frame`` ("obs" or "var") is stored, e.g. ``"obs/_index"``."""
    group = root.get(frame)
    if group is None or not hasattr(group, "members"):
        msg = f"{path}: expected a dataframe group {frame!r} in the store, found {'none' if group is None else 'an array'}"
        raise InputError(msg)
    name = group.attrs.get("_index", "_index")
    if not isinstance(name, str) or not name:
        msg = f"{path}: expected the attribute {frame}@_index to name the index array, found {name!r}"
        raise InputError(msg)
    return f"{frame}/{name}"


def _read_names(root, frame: str, n_expected: int | None, path: Path) -> np.ndarray:
    """The index of ``frame`` ("obs": cell names, "var": gene names) as strings, checked 1-D of ``n_expected``."""
    key = _index_key(root, frame, path)
    names = _read_elem(root, key, path)
    if np.ndim(names) != 1 or (n_expected is not None and len(names) != n_expected):
        msg = f"{path}: expected {n_expected or 'a 1-D array of'} names in {key}, found shape {np.shape(names)}"
        raise InputError(msg)
    return _strings(names)


def _n_names(root, frame: str, path: Path) -> int:
    """Length of the index of ``frame``, from its metadata (nothing read)."""
    key = _index_key(root, frame, path)
    parent, _, name = key.rpartition("/")
    return int(string_array_length(root[parent], name))


def _read_column(root, column: str, n_rows: int, path: Path):
    """One obs column as anndata reads it, checked 1-D with one value per cell."""
    values = _read_elem(root, f"obs/{column}", path)
    if np.ndim(values) != 1 or len(values) != n_rows:
        msg = f"{path}: expected obs column {column!r} to hold {n_rows} values (one per cell), found shape {np.shape(values)}"
        raise InputError(msg)
    return values


def _obs_columns(root) -> list[str]:
    obs = root.get("obs")
    if obs is None or not hasattr(obs, "members"):
        return []
    order = obs.attrs.get("column-order")
    if isinstance(order, list) and all(isinstance(c, str) for c in order):
        return order  # anndata's column order; a listed column that is missing fails when read
    index = obs.attrs.get("_index", "_index")
    return sorted(str(k) for k in obs if k != index)


def _strings(values) -> np.ndarray:
    # via object: numpy's variable-width StringDType (what zarr v3 strings read as) does not cast to str directly
    return np.asarray(values, dtype=object).astype(str)


class ZarrSource(Source):
    """Stream cells x genes row blocks of an AnnData ``.zarr`` store without loading it.

    Parameters
    ----------
    path : str or Path
        The store (a folder).
    layer : str, optional
        Read ``layers/<layer>`` instead of ``X``.
    rows : ndarray of int, shape (n_selected,), optional
        Sorted store rows: the source exposes only these cells (one dataset of a batch split).
    name : str, optional
        Dataset name; default the store's name without ``.zarr``.

    Notes
    -----
    X must be CSR (``csr_matrix``) or dense (``array``); a CSC X is refused (write the store from a CSR AnnData).
    Blocks are canonical CSR float32, checked like the ``.h5ad`` reader's (finite, non-negative, indices in range).
    """

    def __init__(self, path, *, layer: str | None = None, rows=None, name: str | None = None):
        self.path = Path(path)
        self.name = str(name) if name is not None else self.path.name.removesuffix(".zarr")
        self.layer = layer
        root = _open_group(self.path)
        key = "X" if layer is None else f"layers/{layer}"
        self._label = f"{self.path} ({key})"
        try:
            element = root[key]
        except KeyError:
            msg = f"{self.path}: expected a matrix at {key!r}, found none"
            raise InputError(msg) from None
        encoding = element.attrs.get("encoding-type", "array")
        self._reader: CsrRows | DenseRows
        shape: tuple[int, ...]
        if encoding == "csr_matrix":
            # the .h5ad reader's structural checks (readers/_checks.py), on zarr arrays: metadata and indptr only
            if not hasattr(element, "members"):
                msg = f"{self._label}: expected a group (encoding-type 'csr_matrix'), found an array"
                raise InputError(msg)
            shape = read_shape(element.attrs.get("shape"), str(self.path), f"{key}@shape")
            indptr = check_compressed(element, shape[0], "rows")
            check_numeric(element["data"].dtype, self._label)
            self._reader = CsrRows(element["data"], element["indices"], indptr, shape)
        elif encoding == "array":
            if hasattr(element, "members"):
                msg = f"{self._label}: expected a dense array (encoding-type 'array'), found a group"
                raise InputError(msg)
            shape = tuple(int(n) for n in element.shape)
            check_numeric(element.dtype, self._label)
            self._reader = DenseRows(element)
        else:
            msg = f"{self._label}: expected a CSR or dense matrix, found {encoding!r} (write the store from CSR data)"
            raise InputError(msg)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            msg = f"{self._label}: expected a non-empty 2-D matrix, found shape {shape}"
            raise InputError(msg)
        self._var = _read_names(root, "var", shape[1], self.path)
        n_obs = _n_names(root, "obs", self.path)
        if n_obs != shape[0]:
            msg = f"{self._label}: expected {shape[0]} cell names in obs (one per row), found {n_obs}"
            raise InputError(msg)
        dups = duplicates(self._var)
        if dups:
            msg = f"{self._label}: expected unique gene names, found duplicates such as {', '.join(dups)}"
            raise InputError(msg)
        self._root = root
        self._n_file_rows = shape[0]
        self._rows = None if rows is None else check_rows(rows, shape[0], self._label)
        if self._rows is not None and len(self._rows) == 0:
            msg = f"{self._label}: expected at least one cell in rows=, found none"
            raise InputError(msg)
        self._obs: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return self._n_file_rows if self._rows is None else len(self._rows)

    @property
    def var_names(self) -> np.ndarray:
        return self._var

    @property
    def obs_names(self) -> np.ndarray:
        if self._obs is None:
            names = _read_names(self._root, "obs", self._n_file_rows, self.path)
            self._obs = names if self._rows is None else names[self._rows]
        return self._obs

    @property
    def rows(self) -> np.ndarray | None:
        """Store rows exposed by this source (None: all)."""
        return self._rows

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        check_range(self, start, stop)
        return read_checked_rows(self._reader, self._rows, start, stop, self._label)


def zarr_batch_rows(path, batch_key: str) -> list[tuple[str, np.ndarray]]:
    """``(category, sorted store rows)`` for each category of ``obs[batch_key]`` with cells, in category order."""
    path = Path(path)
    root = _open_group(path)
    columns = _obs_columns(root)
    if batch_key not in columns:
        msg = f"{path}: unknown batch key {batch_key!r}; obs columns are: {', '.join(sorted(columns)) or 'none'}"
        raise InputError(msg)
    column = _read_column(root, batch_key, _n_names(root, "obs", path), path)
    return category_rows(column, path, batch_key)


def open_zarr_sources(path, *, batch_key: str | None = None, layer: str | None = None, name: str | None = None,
                      prefix: str = "") -> list[ZarrSource]:
    """The datasets of one store: the whole store (named ``name``, default the store's name), or one source per
    category of ``obs[batch_key]`` named ``prefix + category``, as :func:`onlinemf.readers.open_sources` names
    the splits of one ``.h5ad``."""
    if batch_key is None:
        return [ZarrSource(path, layer=layer, name=name)]
    return [ZarrSource(path, layer=layer, rows=rows, name=prefix + category)
            for category, rows in zarr_batch_rows(path, batch_key)]


def is_zarr_store(path) -> bool:
    """Whether ``path`` is a zarr store (a folder with zarr v2 or v3 metadata), by its files only."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs"))


def zarr_n_obs(path) -> int:
    """Rows of a store's obs (its cells), from the obs index's length (nothing else read)."""
    path = Path(path)
    return _n_names(_open_group(path), "obs", path)


def zarr_read_obs(path) -> pd.DataFrame:
    """The store's ``obs`` dataframe (never X), index as strings.

    As :func:`onlinemf.readers.read_obs` for an ``.h5ad``: the cell names must be readable; a column that
    cannot be read (damaged, of another length, codes outside their categories, an encoding this anndata does
    not know) is left out with a one-line warning naming it.
    """
    path = Path(path)
    root = _open_group(path)
    index = _read_names(root, "obs", None, path)
    index_name = root["obs"].attrs.get("_index", "_index")
    columns = {}
    for column in _obs_columns(root):
        try:
            columns[column] = _read_column(root, column, len(index), path)
        except InputError as err:
            logger.warning("%s (left out of the results)", err)
    return pd.DataFrame(columns, index=pd.Index(index, name=None if index_name == "_index" else str(index_name)))


def zarr_describe(path) -> dict:
    """:func:`onlinemf.readers.describe` for a store: format "zarr", shape, X encoding, layers, obs columns."""
    path = Path(path)
    root = _open_group(path)
    element = root.get("X")
    if element is None:
        n_cells, n_genes, encoding, dtype = zarr_n_obs(path), _n_names(root, "var", path), None, None
    elif element.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
        n_cells, n_genes = read_shape(element.attrs.get("shape"), str(path), "X@shape")
        data = element.get("data") if hasattr(element, "members") else None
        encoding, dtype = element.attrs["encoding-type"][:3], None if data is None else str(data.dtype)
    elif hasattr(element, "members"):
        msg = f"{path}: expected X to be a CSR, CSC or dense matrix, found a group of encoding {element.attrs.get('encoding-type')!r}"
        raise InputError(msg)
    else:
        n_cells, n_genes = (int(n) for n in element.shape) if element.ndim == 2 else (element.shape[0], 0)
        encoding, dtype = "dense", str(element.dtype)
    obs_columns: dict = {}
    for column in _obs_columns(root):
        try:
            values = _read_elem(root, f"obs/{column}", path)
        except InputError:  # an unreadable column is simply not a batch-key candidate
            continue
        obs_columns[column] = len(values.categories) if isinstance(values, pd.Categorical) else None
    layers = root.get("layers")
    return {"format": "zarr", "n_cells": int(n_cells), "n_genes": int(n_genes), "encoding": encoding, "dtype": dtype,
            "layers": sorted(layers) if layers is not None and hasattr(layers, "members") else [], "has_raw": False,
            "obs_columns": obs_columns, "genomes": []}
