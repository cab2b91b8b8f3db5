"""Structural checks of an input file at open, before any pass over its data.

A damaged or hand-made file must be refused with one clear line, never reach scipy's kernels (which trust
their arrays and may read or write out of bounds) and never fail late, after hours of work. Here: the arrays a
reader needs exist with the right kind of dtype and rank, the compressed-matrix pointers are consistent with
the declared shape and with each other, and name arrays have the lengths the shape declares. All of it reads
metadata and the pointer array only (one integer per cell or gene); the checks that cost a pass over the
stored values (indices within range, finite non-negative counts) are made block by block as the data are read
(:func:`onlinemf._source.check_indices`, :func:`onlinemf._source.check_values`).

The checks take h5py groups and datasets, or zarr groups and arrays (an AnnData ``.zarr`` store, :mod:`._zarr`).
"""

from __future__ import annotations

import sys

import h5py
import numpy as np

from .._errors import InputError

_KINDS = {
    "numeric": ("numeric", "biuf"),
    "integer": ("integer", "iu"),
    "string": ("string", "SUOT"),  # T: numpy's variable-width strings, as zarr v3 reads them
    "names": ("string or integer", "SUOTiu"),
}


def _is_zarr(item, kind: str) -> bool:
    # zarr groups and arrays are checked like h5py's (same .get/.shape/.dtype/.ndim/slicing); zarr is optional,
    # and an object can only be a zarr one if zarr is already imported
    zarr = sys.modules.get("zarr")
    return zarr is not None and isinstance(item, getattr(zarr, kind))


def _is_group(item) -> bool:
    return isinstance(item, h5py.Group) or _is_zarr(item, "Group")


def _is_array(item) -> bool:
    return isinstance(item, h5py.Dataset) or _is_zarr(item, "Array")


def _path(node) -> str:
    if isinstance(node, h5py.HLObject):
        return node.file.filename
    store = node.store
    return str(getattr(store, "root", store))  # a zarr LocalStore's folder


def _name(node, key: str | None = None) -> str:
    name = node.name.lstrip("/")
    return f"{name}/{key}" if key and name else (key or name or "/")


def dtype_kind(dataset: h5py.Dataset) -> str:
    """numpy's dtype kind, with HDF5 variable-length strings as ``"O"``."""
    return "O" if h5py.check_string_dtype(dataset.dtype) is not None else dataset.dtype.kind


def require_group(parent: h5py.Group, key: str) -> h5py.Group:
    """``parent[key]`` if it is a group; else :class:`InputError` naming what was found."""
    item = parent.get(key)
    if not _is_group(item):
        found = "none" if item is None else "a dataset"
        msg = f"{_path(parent)}: expected a group {_name(parent, key)}, found {found}"
        raise InputError(msg)
    return item


def require_array(parent: h5py.Group, key: str, kind: str, *, ndim: int = 1) -> h5py.Dataset:
    """``parent[key]`` if it is an ``ndim``-D dataset of dtype ``kind`` ("numeric", "integer", "string" or "names")."""
    item = parent.get(key)
    what, kinds = _KINDS[kind]
    where = _name(parent, key)
    if not _is_array(item):
        found = "none" if item is None else "a group"
        msg = f"{_path(parent)}: expected a {ndim}-D {what} array {where}, found {found}"
        raise InputError(msg)
    if item.ndim != ndim:
        msg = f"{_path(parent)}: expected a {ndim}-D {what} array {where}, found {item.ndim} dimension(s) {item.shape}"
        raise InputError(msg)
    if dtype_kind(item) not in kinds:
        msg = f"{_path(parent)}: expected a {ndim}-D {what} array {where}, found dtype {item.dtype}"
        raise InputError(msg)
    return item


def string_array_length(parent: h5py.Group, key: str, kind: str = "names") -> int:
    """Length of a 1-D name array: a dataset, or anndata's nullable-string-array group (``values``, ``mask``)."""
    item = parent.get(key)
    if _is_group(item) and "values" in item:
        return require_array(item, "values", kind).shape[0]
    return require_array(parent, key, kind).shape[0]


def expect_length(n_found: int, n_expected: int, node, key: str, what: str) -> None:
    if n_found != n_expected:
        msg = f"{_path(node)}: expected {n_expected} {what} in {_name(node, key)}, found {n_found}"
        raise InputError(msg)


def read_shape(values, path: str, where: str) -> tuple[int, int]:
    """A declared 2-D shape (the value of attribute or dataset ``where`` of file ``path``) as two non-negative ints."""
    try:
        array = np.asarray(values)
        ok = array.dtype.kind in "iu" and array.shape == (2,) and (array >= 0).all()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        msg = f"{path}: expected {where} to be two non-negative integers (a 2-D shape), found {values!r}"
        raise InputError(msg.replace("\n", " "))
    return int(array[0]), int(array[1])


def check_compressed(group: h5py.Group, n_major: int, major: str) -> np.ndarray:
    """Check the ``data``/``indices``/``indptr`` arrays of a compressed matrix and return ``indptr`` (int64).

    ``n_major`` is the number of compressed rows (CSR: cells) or columns (CSC, 10x: genes or cells), named
    ``major`` in messages. Checks, reading only ``indptr``: numeric data, integer indices and pointers, all 1-D;
    ``len(indptr) == n_major + 1``; ``indptr[0] == 0``; ``indptr`` non-decreasing; ``indptr[-1] == len(indices)
    == len(data)``. The indices themselves are checked per block as they are read.
    """
    data = require_array(group, "data", "numeric")
    indices = require_array(group, "indices", "integer")
    pointers = require_array(group, "indptr", "integer")
    path, name = _path(group), _name(group)
    if pointers.shape[0] != n_major + 1:
        msg = f"{path}: expected {name}/indptr of length {n_major + 1} ({n_major} {major} + 1), found {pointers.shape[0]}"
        raise InputError(msg)
    if data.shape[0] != indices.shape[0]:
        msg = f"{path}: expected {name}/data and {name}/indices of the same length, found {data.shape[0]} and {indices.shape[0]}"
        raise InputError(msg)
    try:
        indptr = np.asarray(pointers[:]).astype(np.int64)  # uint64 beyond int64 wraps negative: refused below
    except OSError as exc:
        msg = f"{path}: could not read {name}/indptr (damaged or truncated file?): {exc}"
        raise InputError(msg) from None
    if indptr[0] != 0:
        msg = f"{path}: expected {name}/indptr to start at 0, found {indptr[0]}"
        raise InputError(msg)
    steps = np.diff(indptr)
    if (steps < 0).any():
        at = int(np.flatnonzero(steps < 0)[0])
        msg = f"{path}: expected {name}/indptr non-decreasing, found {indptr[at]} then {indptr[at + 1]} at position {at}"
        raise InputError(msg)
    if indptr[-1] != indices.shape[0]:
        msg = f"{path}: expected {name}/indptr to end at the {indices.shape[0]} stored values, found {indptr[-1]}"
        raise InputError(msg)
    return indptr
