"""Low-level HDF5 helpers shared by the readers: opening with clear errors, format detection,
string and obs-column decoding across anndata on-disk layouts (0.6 to 0.13), unique names."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .._errors import InputError
from ._checks import string_array_length

logger = logging.getLogger("onlinemf.readers")

FORMATS = ("h5ad", "10x-v3", "10x-v2")


def open_h5(path) -> h5py.File:
    """Open ``path`` read-only, turning every way it can fail into one-line :class:`InputError`.

    HDF5's default file locking is kept on purpose: read-only opens take a shared lock, so several
    processes can read one file at once, and HDF5 refuses to reopen an already open file with
    different locking flags, which would break ``anndata.read_h5ad`` on the same file in-process.
    Set ``HDF5_USE_FILE_LOCKING=FALSE`` on file systems without locks.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: file not found"
        raise InputError(msg)
    if path.is_dir():
        msg = f"{path}: expected an HDF5 file (.h5ad or 10x .h5), found a directory (AnnData .zarr stores: open_sources or ZarrSource)"
        raise InputError(msg)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        text = str(exc)
        if "truncated" in text:
            msg = f"{path}: the HDF5 file is truncated (incomplete download or copy?): {text}"
        elif "signature" in text:
            msg = f"{path}: expected an HDF5 file (.h5ad or 10x .h5), found a file without an HDF5 signature"
        else:
            msg = f"{path}: could not open as HDF5: {text}"
        raise InputError(msg) from None


def detect_format(h5: h5py.File) -> str:
    """Return ``"h5ad"``, ``"10x-v3"`` or ``"10x-v2"`` from the file's content (not its name).

    Detection is lenient on purpose (an ``.h5ad`` missing ``var``, a 10x ``matrix`` missing ``features``): the
    readers then name the missing piece, which says more than "not a known format".
    """
    if _decode(h5.attrs.get("encoding-type")) == "anndata" or ("obs" in h5 and "var" in h5):
        return "h5ad"
    if isinstance(h5.get("matrix"), h5py.Group):
        return "10x-v3"
    if tenx_v2_genomes(h5):
        return "10x-v2"
    keys = ", ".join(sorted(h5.keys())[:8]) or "none"
    msg = f"{h5.filename}: expected an AnnData .h5ad or a 10x Genomics .h5, found an HDF5 file with top-level keys: {keys}"
    raise InputError(msg)


def tenx_v2_genomes(h5: h5py.File) -> list[str]:
    """Top-level groups laid out as a Cell Ranger v2 matrix (one per genome)."""
    return [
        key
        for key, item in h5.items()
        if isinstance(item, h5py.Group) and {"data", "indices", "indptr"} <= set(item.keys())
    ]


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_strings(dataset: h5py.Dataset, sel=()) -> np.ndarray:
    """Decode a string (or other scalar) dataset to a numpy ``str`` array."""
    if isinstance(dataset, h5py.Group):
        # anndata >= 0.13 with pandas 3 writes strings as a "nullable-string-array" group (values + mask).
        from anndata.io import read_elem

        return np.asarray(read_elem(dataset), dtype=object)[sel].astype(str)
    if h5py.check_string_dtype(dataset.dtype) is not None:
        values = dataset.asstr()[sel]
    else:
        values = dataset[sel]
    return np.asarray(values, dtype=object).astype(str)


def _index_key(element: h5py.Group, group_name: str) -> str:
    key = element.attrs.get("_index", "_index")
    if isinstance(key, bytes):
        key = key.decode()
    if not isinstance(key, str):
        msg = f"{element.file.filename}: expected the _index attribute of {group_name} to name its index, found {key!r}"
        raise InputError(msg)
    return key


def dataframe(h5: h5py.File, group_name: str) -> h5py.Group | h5py.Dataset:
    """The anndata dataframe ``group_name`` (a group; a compound dataset before anndata 0.7), checked."""
    element = h5.get(group_name)
    if isinstance(element, h5py.Dataset) and element.dtype.names is not None and "index" in element.dtype.names:
        return element
    if not isinstance(element, h5py.Group):
        found = "none" if element is None else f"a dataset of dtype {element.dtype}"
        msg = f"{h5.filename}: expected a dataframe {group_name} (cell or gene annotations), found {found}"
        raise InputError(msg)
    return element


def index_length(h5: h5py.File, group_name: str) -> int:
    """Number of rows of the anndata dataframe ``group_name``, from its index's metadata (nothing read)."""
    element = dataframe(h5, group_name)
    if isinstance(element, h5py.Dataset):
        if element.ndim != 1:
            msg = f"{h5.filename}: expected {group_name} to be 1-D, found {element.ndim} dimension(s)"
            raise InputError(msg)
        return element.shape[0]
    key = _index_key(element, group_name)
    if key not in element:
        msg = f"{h5.filename}: expected the index dataset {group_name}/{key}, found none"
        raise InputError(msg)
    return string_array_length(element, key)


def read_index(h5: h5py.File, group_name: str) -> np.ndarray:
    """The index (names) of an anndata dataframe ``obs``/``var``/``raw/var``, as a str array."""
    index_length(h5, group_name)  # checks it is there, 1-D, of names
    element = h5[group_name]
    try:
        if isinstance(element, h5py.Dataset):  # anndata < 0.7: a compound (record) dataset
            return np.asarray(element["index"], dtype=object).astype(str)
        return read_strings(element[_index_key(element, group_name)])
    except OSError as exc:
        msg = f"{h5.filename}: could not read the index of {group_name} (damaged or truncated file?): {exc}"
        raise InputError(msg) from None


def dataframe_columns(h5: h5py.File, group_name: str = "obs") -> list[str]:
    """Column names of an anndata dataframe, in stored order (the index excluded)."""
    element = dataframe(h5, group_name)
    if isinstance(element, h5py.Dataset):
        return [name for name in element.dtype.names if name != "index"]
    order = np.atleast_1d(element.attrs.get("column-order", []))
    if order.size:
        return [_decode(c) for c in order.ravel()]
    index_key = element.attrs.get("_index", "_index")
    return [k for k in element.keys() if k not in (index_key, "__categories")]


def read_column(h5: h5py.File, key: str, group_name: str = "obs", *, n_rows: int | None = None):
    """One dataframe column as a :class:`pandas.Categorical` (categorical/string columns) or a numpy array.

    Handles anndata >= 0.8 (categorical group with ``codes``/``categories``), anndata 0.7 (codes dataset whose
    ``categories`` attribute references ``__categories/<key>``) and anndata < 0.7 (compound dataset).
    A column that cannot be read as 1-D values of ``n_rows`` cells (missing, damaged, codes outside their
    categories, ...) raises :class:`InputError` naming it.
    """
    try:
        column = _read_column(h5, key, group_name)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged column can fail in h5py, numpy, pandas or anndata
        msg = f"{h5.filename}: could not read {group_name} column {key!r}: {failure_reason(exc, h5, f'{group_name}/{key}')}"
        raise InputError(msg) from None
    if np.ndim(column) != 1 or (n_rows is not None and len(column) != n_rows):
        expected = "1-D values" if n_rows is None else f"{n_rows} values (one per name in {group_name})"
        msg = f"{h5.filename}: expected {group_name} column {key!r} to hold {expected}, found shape {np.shape(column)}"
        raise InputError(msg)
    return column


def failure_reason(exc: BaseException, h5: h5py.File, name: str) -> str:
    """One line saying why reading ``name`` failed (anndata's registry errors span several lines)."""
    if type(exc).__name__ == "IORegistryError":
        item = h5.get(name)
        attrs = dict(item.attrs) if item is not None else {}
        return (f"an encoding this anndata cannot read (encoding-type {_decode(attrs.get('encoding-type', ''))!r}, "
                f"encoding-version {_decode(attrs.get('encoding-version', ''))!r})")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _categorical(h5, where: str, codes, categories, ordered=False) -> pd.Categorical:
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        msg = f"{h5.filename}: expected the codes of {where} to be 1-D integers, found dtype {codes.dtype} with shape {codes.shape}"
        raise InputError(msg)
    categories = np.asarray(categories)
    if categories.ndim != 1:
        msg = f"{h5.filename}: expected the categories of {where} to be 1-D, found shape {categories.shape}"
        raise InputError(msg)
    if pd.Index(categories).has_duplicates:
        msg = f"{h5.filename}: expected unique categories in {where}, found duplicates such as {duplicates(categories, 1)[0]!r}"
        raise InputError(msg)
    if codes.size and (codes.min() < -1 or codes.max() >= len(categories)):
        bad = codes.min() if codes.min() < -1 else codes.max()
        msg = f"{h5.filename}: expected the codes of {where} within -1:{len(categories)} ({len(categories)} categories), found {bad}"
        raise InputError(msg)
    return pd.Categorical.from_codes(codes, categories=categories, ordered=bool(ordered))


def _read_column(h5: h5py.File, key: str, group_name: str):
    element = dataframe(h5, group_name)
    if isinstance(element, h5py.Dataset):  # anndata < 0.7
        values = element[key]
        categories = h5.get(f"uns/{key}_categories")
        if categories is not None:
            return _categorical(h5, f"{group_name}/{key}", values, read_strings(categories))
        return _as_column(values)
    item = element.get(key)
    if item is None:
        msg = f"{h5.filename}: expected {group_name} column {key!r} (listed in column-order), found none"
        raise InputError(msg)
    where = f"{group_name}/{key}"
    if isinstance(item, h5py.Dataset) and "categories" in item.attrs:  # anndata 0.7
        categories = read_strings(h5[item.attrs["categories"]])
        return _categorical(h5, where, item[()], categories, item.attrs.get("ordered", False))
    if isinstance(item, h5py.Group) and _decode(item.attrs.get("encoding-type")) == "categorical":
        for part in ("codes", "categories"):
            if part not in item:
                msg = f"{h5.filename}: expected {where}/{part} (a categorical column), found none"
                raise InputError(msg)
        categories = read_strings(item["categories"])
        return _categorical(h5, where, item["codes"][()], categories, item.attrs.get("ordered", False))
    if isinstance(item, h5py.Group):  # nullable integer/boolean/string arrays and later encodings
        from anndata.io import read_elem

        return _as_column(np.asarray(read_elem(item)))
    return _as_column(read_strings(item) if h5py.check_string_dtype(item.dtype) is not None else item[()])


def _as_column(values: np.ndarray):
    values = np.asarray(values)
    if values.dtype.kind in "OSU":
        return pd.Categorical(np.asarray(values, dtype=object).astype(str))
    return values


def n_categories(column) -> int | None:
    """Number of categories of a categorical/string column; None for numeric columns."""
    if isinstance(column, pd.Categorical):
        return len(column.categories)
    return None


def make_unique(names: np.ndarray, join: str = "-") -> np.ndarray:
    """Make names unique as scanpy's ``var_names_make_unique`` does: later duplicates get ``-1``, ``-2``, ...

    Returns a new str array; the first occurrence of a name keeps it.
    """
    names = np.asarray(names).astype(str)
    duplicated = pd.Index(names).duplicated(keep="first")
    if not duplicated.any():
        return names
    taken = set(names.tolist())
    counter: collections.Counter[str] = collections.Counter()
    out = names.astype(object)
    for i in np.flatnonzero(duplicated):
        base = out[i]
        while True:
            counter[base] += 1
            candidate = f"{base}{join}{counter[base]}"
            if candidate not in taken:
                taken.add(candidate)
                out[i] = candidate
                break
    return out.astype(str)


def duplicates(names: np.ndarray, n: int = 5) -> list[str]:
    """Up to ``n`` names that occur more than once, in first-seen order."""
    index = pd.Index(names)
    return list(dict.fromkeys(index[index.duplicated()].tolist()))[:n]


def category_rows(column, path, batch_key: str) -> list[tuple[str, np.ndarray]]:
    """``(category, sorted rows)`` of each category of a batch column with cells, in category order.

    Cells without a value are left out with a warning; fewer than 2 categories with cells is an InputError.
    """
    column = column if isinstance(column, pd.Categorical) else pd.Categorical(np.asarray(column))
    codes = np.asarray(column.codes)
    if (codes < 0).any():
        logger.warning("%s: %d cells with a missing %r are left out", path, int((codes < 0).sum()), batch_key)
    present = [(str(cat), np.flatnonzero(codes == i)) for i, cat in enumerate(column.categories)]
    present = [(cat, rows) for cat, rows in present if len(rows)]
    if len(present) < 2:
        found = present[0][0] if present else "none"
        msg = f"{path}: expected batch key {batch_key!r} to have at least 2 categories with cells, found one ({found})"
        raise InputError(msg)
    return present
