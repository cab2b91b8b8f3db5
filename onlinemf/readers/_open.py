"""Opening inputs as sources: dispatch on file content, split one file by a batch column,
describe a file for ``onlinemf info``, guess the batch column, wrap in-memory data, shared genes."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import InputError
from .._source import MemorySource, Source
from ._checks import read_shape, require_array
from ._h5 import (
    category_rows,
    dataframe_columns,
    detect_format,
    duplicates,
    failure_reason,
    index_length,
    make_unique,
    n_categories,
    open_h5,
    read_column,
    read_index,
    read_strings,
)
from ._h5ad import H5adSource, layer_names, matrix_encoding, matrix_shape
from ._tenx import TenxH5Source, tenx_layout
from ._zarr import is_zarr_store, open_zarr_sources, zarr_batch_rows, zarr_describe, zarr_read_obs

logger = logging.getLogger(__name__)

# Columns rliger / Seurat / scanpy users usually keep their batches in, most likely first.
BATCH_KEY_CANDIDATES = (
    "batch", "dataset", "sample_batch", "orig.ident", "sample", "donor", "condition",
    "batch_id", "dataset_id", "sample_id", "donor_id", "library", "library_id", "orig_ident",
    "individual", "patient", "tech", "protocol", "platform", "plate", "stim", "species",
)  # fmt: skip


def file_format(path) -> str:
    """``"h5ad"``, ``"10x-v3"``, ``"10x-v2"`` (read from the file's content) or ``"zarr"`` (an AnnData store)."""
    if is_zarr_store(path):
        return "zarr"
    with open_h5(path) as h5:
        return detect_format(h5)


def open_source(path, *, layer=None, use_raw=False, genome=None, name=None, **h5ad_options) -> Source:
    """Open one file as a :class:`Source`, choosing the reader from the file's content.

    Parameters
    ----------
    path : str or Path
        An AnnData ``.h5ad`` or a 10x Genomics ``.h5`` file (v2 or v3).
    layer, use_raw : see :class:`H5adSource` (h5ad only).
    genome : str, optional
        See :class:`TenxH5Source` (10x only).
    name : str, optional
        Dataset name; default the file stem.
    **h5ad_options
        ``rows``, ``tmp_dir``, ``progress`` for :class:`H5adSource`.
    """
    fmt = file_format(path)
    if fmt == "h5ad":
        return H5adSource(path, layer=layer, use_raw=use_raw, name=name, **h5ad_options)
    if layer is not None or use_raw:
        msg = f"{path}: layer= and use_raw= apply to .h5ad files, found a {fmt} file"
        raise InputError(msg)
    return TenxH5Source(path, genome=genome, name=name)


def batch_rows(path, batch_key: str) -> list[tuple[str, np.ndarray]]:
    """``(category, sorted file rows)`` for each category of ``obs[batch_key]`` with cells, in category order.

    Reads only that obs column (cheap: use it to count cells per batch without opening sources). ``path`` may
    be an ``.h5ad`` or an AnnData ``.zarr`` store.
    """
    if is_zarr_store(path):
        return zarr_batch_rows(path, batch_key)
    with open_h5(path) as h5:
        if detect_format(h5) != "h5ad":
            msg = f"{path}: batch_key= needs an .h5ad file with obs columns, found a {detect_format(h5)} file"
            raise InputError(msg)
        columns = dataframe_columns(h5, "obs")
        if batch_key not in columns:
            msg = f"{path}: unknown batch key {batch_key!r}; obs columns are: {', '.join(columns) or 'none'}"
            raise InputError(msg)
        column = read_column(h5, batch_key, n_rows=index_length(h5, "obs"))
    return category_rows(column, path, batch_key)


def open_sources(paths, *, batch_key=None, layer=None, use_raw=False, genome=None, tmp_dir=None, progress=None) -> list[Source]:
    """Open the datasets of a run.

    Parameters
    ----------
    paths : str, Path or sequence of them
        Several files: one dataset each, named by file stem (made unique with "-1", "-2", ...).
    batch_key : str, optional
        Split each ``.h5ad`` into one dataset per category of ``obs[batch_key]`` (category order),
        streamed through ``rows=``. Datasets are named by category (``"<stem>:<category>"`` when
        several files are split).
    layer, use_raw, genome, tmp_dir, progress : see :func:`open_source`.

    Returns
    -------
    list of Source
        Close them when done (or use each as a context manager).
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        msg = "open_sources: expected at least one input file, found none"
        raise InputError(msg)
    stems = make_unique(np.array([Path(p).stem for p in paths], dtype=object))
    sources: list[Source] = []
    try:
        for path, stem in zip(paths, stems, strict=True):
            if is_zarr_store(path):  # an AnnData .zarr store (readers/_zarr.py)
                if use_raw or genome is not None:
                    msg = f"{path}: use_raw= and genome= apply to .h5ad and 10x files, found a zarr store"
                    raise InputError(msg)
                sources.extend(open_zarr_sources(path, batch_key=batch_key, layer=layer, name=stem,
                                                 prefix=f"{stem}:" if len(paths) > 1 else ""))
                continue
            if batch_key is None:
                sources.append(open_source(path, layer=layer, use_raw=use_raw, genome=genome, name=stem, tmp_dir=tmp_dir, progress=progress))
                continue
            batches = batch_rows(path, batch_key)
            prefix = f"{stem}:" if len(paths) > 1 else ""
            first = H5adSource(path, layer=layer, use_raw=use_raw, rows=batches[0][1], name=prefix + batches[0][0], tmp_dir=tmp_dir, progress=progress)
            sources.append(first)
            for category, rows in batches[1:]:  # share one CSC->CSR conversion (or one checked indptr) between the splits
                sources.append(H5adSource(path, layer=layer, use_raw=use_raw, rows=rows, name=prefix + category,
                                          _converted=first._converted, _indptr=first._indptr))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


def read_obs(path) -> pd.DataFrame:
    """The ``obs`` dataframe of an ``.h5ad`` (without reading X); for a 10x file, the barcodes only.

    The cell names must be readable; a column that cannot be read (damaged, of another length, codes outside
    their categories, an encoding this anndata does not know) is left out with a one-line warning naming it:
    a run never fails for a column it does not use. A zarr store is read the same way (:func:`zarr_read_obs`).
    """
    if is_zarr_store(path):
        return zarr_read_obs(path)
    with open_h5(path) as h5:
        fmt = detect_format(h5)
        if fmt != "h5ad":
            group = _tenx_any_layout(h5)["group"]
            return pd.DataFrame(index=pd.Index(read_strings(require_array(group, "barcodes", "names")), name="barcode"))
        index = read_index(h5, "obs")
        element = h5["obs"]
        index_name = None
        if isinstance(element, h5py.Group) and element.attrs.get("_index", "_index") not in ("_index", b"_index"):
            index_name = str(element.attrs["_index"])
        columns = {}
        for column in dataframe_columns(h5, "obs"):
            try:
                columns[column] = _obs_column(h5, column, len(index))
            except InputError as err:
                logger.warning("%s (left out of the results)", err)
        return pd.DataFrame(columns, index=pd.Index(index, name=index_name))


def _obs_column(h5: h5py.File, column: str, n_rows: int):
    """One obs column as anndata reads it (its own dtype: nullable, categorical, strings), checked."""
    element = h5["obs"]
    item = element.get(column) if isinstance(element, h5py.Group) else None
    if item is None or "encoding-type" not in item.attrs:  # anndata < 0.8 layouts, or missing
        return read_column(h5, column, n_rows=n_rows)
    from anndata.io import read_elem

    try:
        with warnings.catch_warnings():  # e.g. anndata's OldFormatWarning: nothing the user must act on here
            warnings.simplefilter("ignore")
            values = read_elem(item)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged column fails in h5py, numpy, pandas or anndata, in many ways
        msg = f"{h5.filename}: could not read obs column {column!r}: {failure_reason(exc, h5, f'obs/{column}')}"
        raise InputError(msg) from None
    if np.ndim(values) != 1 or len(values) != n_rows:
        msg = f"{h5.filename}: expected obs column {column!r} to hold {n_rows} values (one per cell), found shape {np.shape(values)}"
        raise InputError(msg)
    return values


def _tenx_any_layout(h5) -> dict:
    """The 10x layout, of the first genome when there are several (for summaries)."""
    return tenx_layout(h5, first_genome=True)


def describe(path) -> dict:
    """Summary of a file without reading its matrix.

    Returns
    -------
    dict
        ``format`` ("h5ad" / "10x-v3" / "10x-v2"), ``n_cells``, ``n_genes``, ``encoding`` of X
        ("csr" / "csc" / "dense"; None without X), ``dtype``, ``layers`` (list), ``has_raw``, ``obs_columns``
        ({column: number of categories, or None for numeric columns}), ``genomes`` (list; with
        several, ``n_genes`` counts the first genome's). A zarr store gives format "zarr".
    """
    if is_zarr_store(path):
        return zarr_describe(path)
    with open_h5(path) as h5:
        fmt = detect_format(h5)
        if fmt == "h5ad":
            raw = h5.get("raw")
            info = {"format": fmt, "layers": layer_names(h5), "has_raw": isinstance(raw, h5py.Group) and "X" in raw, "genomes": []}
            n_obs = index_length(h5, "obs")
            if "X" in h5:
                element = h5["X"]
                n_cells, n_genes = matrix_shape(element)
                encoding = matrix_encoding(element)
                data = element if encoding == "dense" else element.get("data")
                dtype = data.dtype if isinstance(data, h5py.Dataset) else None
            else:
                n_cells, n_genes, encoding, dtype = n_obs, index_length(h5, "var"), None, None
            info["obs_columns"] = _obs_categories(h5, n_obs)
        else:
            layout = _tenx_any_layout(h5)
            group = layout["group"]
            _, n_cells = read_shape(require_array(group, "shape", "integer")[()], str(path), f"{group.name}/shape")
            n_genes = int(layout["keep"].sum()) if layout["keep"] is not None else len(layout["names"])
            data = group.get("data")
            encoding, dtype = "csc (genes x cells)", data.dtype if isinstance(data, h5py.Dataset) else None
            info = {"format": fmt, "layers": [], "has_raw": False, "obs_columns": {}, "genomes": layout["genomes"]}
        info.update(n_cells=int(n_cells), n_genes=int(n_genes), encoding=encoding, dtype=None if dtype is None else str(dtype))
        return info


def _obs_categories(h5: h5py.File, n_cells: int) -> dict:
    """obs column -> number of categories (None for numeric columns); unreadable columns are left out."""
    out = {}
    for column in dataframe_columns(h5, "obs"):
        try:
            out[column] = n_categories(read_column(h5, column, n_rows=n_cells))
        except InputError as err:
            logger.info("%s; not considered as a batch column", err)
    return out


def guess_batch_key(obs_columns: Mapping[str, int | None], n_cells: int) -> str | None:
    """The most likely batch column, or None.

    Parameters
    ----------
    obs_columns : mapping of str to int or None
        Column name -> number of categories (None for numeric columns), as in ``describe(path)["obs_columns"]``.
    n_cells : int

    Returns
    -------
    str or None
        The first of :data:`BATCH_KEY_CANDIDATES` (exact name first, then case-insensitive) that is a
        categorical/string column with 2 to ``n_cells / 10`` categories.
    """

    def fits(column: str) -> bool:
        count = obs_columns[column]
        return count is not None and 2 <= count <= n_cells / 10

    lowered = {c.lower(): c for c in obs_columns}
    for candidate in BATCH_KEY_CANDIDATES:
        if candidate in obs_columns and fits(candidate):
            return candidate
        column = lowered.get(candidate.lower())
        if column is not None and fits(column):
            return column
    return None


def shared_genes(sources: Sequence[Source]) -> np.ndarray:
    """Gene names present in every source, in the first source's order.

    Returns
    -------
    ndarray of str, shape (n_shared,)
    """
    if not sources:
        msg = "shared_genes: expected at least one dataset, found none"
        raise InputError(msg)
    first = np.asarray(sources[0].var_names)
    keep = np.ones(len(first), dtype=bool)
    for source in sources[1:]:
        keep &= np.isin(first, np.asarray(source.var_names))
    if not keep.any():
        listing = ", ".join(f"{s.name}: {s.n_genes} genes" for s in sources)
        msg = f"no genes shared by the {len(sources)} datasets ({listing})"
        raise InputError(msg)
    return first[keep]


def as_source(obj, *, name: str = "dataset", layer: str | None = None) -> Source:
    """Wrap in-memory data (or a backed AnnData) as a :class:`Source`.

    Parameters
    ----------
    obj : AnnData, scipy sparse matrix, ndarray or Source
        Cells x genes. A backed AnnData streams from its file; other AnnData use ``.X`` (or
        ``.layers[layer]``) with their var/obs names.
    name : str
    layer : str, optional
        AnnData only.
    """
    if isinstance(obj, Source):
        return obj
    import anndata

    if isinstance(obj, anndata.AnnData):
        if obj.isbacked:
            return H5adSource(obj.filename, layer=layer, name=name)
        dups = duplicates(np.asarray(obj.var_names))
        if dups:
            msg = f"{name}: expected unique gene names, found duplicates such as {', '.join(dups)}"
            raise InputError(msg)
        if layer is not None:
            if layer not in obj.layers:
                names = [str(k) for k in obj.layers.keys() if k is not None]  # anndata 0.13 may list None
                msg = f"{name}: unknown layer {layer!r}; layers are: {', '.join(names) or 'none'}"
                raise InputError(msg)
            matrix = obj.layers[layer]
        else:
            matrix = obj.X
        if matrix is None:
            msg = f"{name}: expected an AnnData with X, found X = None"
            raise InputError(msg)
        if obj.n_obs == 0 or obj.n_vars == 0:
            msg = f"{name}: expected a non-empty matrix, found {obj.n_obs} cells x {obj.n_vars} genes"
            raise InputError(msg)
        return MemorySource(matrix, name=name, var_names=np.asarray(obj.var_names), obs_names=np.asarray(obj.obs_names))
    if sp.issparse(obj) or isinstance(obj, np.ndarray):
        if min(obj.shape) == 0:
            msg = f"{name}: expected a non-empty matrix, found shape {obj.shape}"
            raise InputError(msg)
        return MemorySource(obj, name=name)
    msg = f"{name}: expected an AnnData, scipy sparse matrix or numpy array, found {type(obj).__name__}"
    raise InputError(msg)
