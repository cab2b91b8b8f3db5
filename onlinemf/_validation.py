"""Checks shared by the analysis modules: factor matrices, labels, integers, optional extras.

The one home for validation helpers, so that ``metrics``, ``plotting`` and ``postprocess`` depend on it and
not on each other. Every check raises :class:`~onlinemf._errors.InputError` with a one-line message.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ._errors import InputError

__all__ = [
    "MissingExtraError", "check_distinct_names", "check_factors", "check_int", "check_matrix", "dataset_codes",
    "require_extra",
]


class MissingExtraError(InputError):
    """An optional dependency group ("extra") needed by the requested step is not installed."""


def require_extra(extra: str, what: str, modules: tuple[str, ...]):
    """Import ``modules`` and return them, or raise :class:`MissingExtraError` naming ``extra``."""
    import importlib

    try:
        return tuple(importlib.import_module(m) for m in modules)
    except ImportError as exc:
        msg = f"{what} needs the '{extra}' extra: pip install 'onlinemf[{extra}]' (missing: {exc.name})"
        raise MissingExtraError(msg) from exc


def _float_array(X) -> np.ndarray:
    # float32 stays float32 (no float64 copy of a cells x K matrix: 80 MB per million cells at K=20).
    arr = np.asarray(X)
    return arr if arr.dtype == np.float32 else np.asarray(arr, dtype=np.float64)


def check_factors(H, name: str = "H") -> np.ndarray:
    """Return ``H`` as a finite, non-negative array of shape (n_cells, K) or raise InputError.

    float32 input stays float32 (not copied); anything else becomes float64.
    """
    try:
        arr = check_matrix(H, name, dims="K")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        msg = f"{name}: expected a numeric array of shape (n_cells, K), found {type(H).__name__} ({exc})"
        raise InputError(msg) from exc
    if (arr < 0).any():
        msg = f"{name}: expected non-negative factors, found minimum {arr.min():.3g}"
        raise InputError(msg)
    return arr


def dataset_codes(datasets, n_cells: int, name: str = "datasets") -> tuple[list, np.ndarray]:
    """Return (names in order of first appearance, integer code per cell) for a per-cell label array."""
    labels = np.asarray(datasets)
    if labels.ndim != 1 or labels.shape[0] != n_cells:
        msg = f"{name}: expected one label per cell, shape ({n_cells},), found shape {labels.shape}"
        raise InputError(msg)
    if labels.dtype == object or labels.dtype.kind == "f":
        missing = np.equal(labels, None) | (labels != labels)  # type: ignore[call-overload]  # None or NaN
        if missing.any():
            msg = f"{name}: expected a label for every cell, found {int(missing.sum())} missing"
            raise InputError(msg)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [uniq[i].item() if hasattr(uniq[i], "item") else uniq[i] for i in order], rank[inverse]


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        msg = f"{name}: expected an integer >= {minimum}, found {value!r}"
        raise InputError(msg)
    return int(value)


def check_matrix(X, name: str = "X", *, dims: str = "n_dims") -> np.ndarray:
    """``X`` as a float (32 or 64) 2-D array, non-empty and finite, else InputError."""
    arr = _float_array(X)  # pynndescent and umap-learn work in float32 anyway
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        msg = f"{name}: expected a non-empty 2-D array of shape (n_cells, {dims}), found shape {arr.shape}"
        raise InputError(msg)
    if not np.isfinite(arr).all():
        msg = f"{name}: expected finite values, found {int((~np.isfinite(arr)).sum())} NaN/inf"
        raise InputError(msg)
    return arr


def check_distinct_names(names: list[str], what: str = "dataset names", where: str = "sources") -> None:
    """Raise :class:`InputError` when ``names`` repeat (dataset names, batch categories, ...), naming the repeats."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        msg = f"{where}: expected distinct {what}, found {repeated} more than once among {names[:20]}"
        raise InputError(msg)
