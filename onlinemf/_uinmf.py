"""UINMF (Kriebel & Welch 2022): datasets with unshared features, learned online. Pure functions, no I/O.

A dataset i with u_i unshared features is given as one cells x (genes + u_i) matrix ``[E_i, P_i]``: the model's
genes first, then its own features. Its dataset factor is stored stacked, ``[V_i, U_i]`` of shape
(K, genes + u_i), and so are its statistics ``B_i = [B_i, B^U_i]``. With W read as zero on the unshared columns,
every formula of online iNMF is UINMF's (``reference/uinmf.md``):

- H: ``L = [W + V_i, U_i]``, ``G = L L^T + lam [V_i, U_i][V_i, U_i]^T`` (``_step.dataset_factors``);
- statistics: ``X^T H`` over the stacked columns gives ``[B_i; B^U_i]`` (unchanged code);
- HALS: W from the shared columns only; the V_i row update on the unshared columns, where W is 0, is exactly
  ``U_i[j] += (B^U_i[:, j] - (1 + lam) A_i[j] U_i) / ((1 + lam) A_i[jj])`` (``_solvers.hals_update``).

A dataset without unshared features has u_i = 0 and goes through the same code as before UINMF.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._errors import InputError


def pad_columns(W: np.ndarray, width: int) -> np.ndarray:
    """``W`` (K, genes) followed by zero columns up to ``width``: W on a dataset's stacked columns."""
    out = np.zeros((W.shape[0], width), dtype=W.dtype)
    out[:, : W.shape[1]] = W
    return out


def unshared_counts(unshared: Mapping[str, int] | None, names: list[str]) -> dict[str, int]:
    """``{name: u_i}`` for every dataset of ``names`` (0 when not given), checked.

    Parameters
    ----------
    unshared : mapping dataset name -> number of unshared features (trailing columns), or None
    names : the datasets being added
    """
    if unshared is None:
        return dict.fromkeys(names, 0)
    if not isinstance(unshared, Mapping):
        msg = f"unshared: expected a dict dataset name -> number of unshared features, found {type(unshared).__name__}"
        raise InputError(msg)
    unknown = sorted(set(map(str, unshared)) - set(names))
    if unknown:
        msg = f"unshared: expected names of the datasets being added {names}, found {unknown}"
        raise InputError(msg)
    counts = dict.fromkeys(names, 0)
    for name, u in unshared.items():
        if isinstance(u, bool) or not isinstance(u, int | np.integer) or u < 0:
            msg = f"unshared[{name!r}]: expected a number of unshared features >= 0, found {u!r}"
            raise InputError(msg)
        counts[str(name)] = int(u)
    return counts


def n_shared_genes(n_columns: int, n_unshared: int, name: str) -> int:
    """Genes shared with the model, from a dataset's column count; at least one must remain."""
    if n_unshared >= n_columns:
        msg = f"{name}: expected shared genes before its {n_unshared} unshared features, found {n_columns} columns in all"
        raise InputError(msg)
    return n_columns - n_unshared


def unshared_names(var_names: np.ndarray | None, n_shared: int) -> np.ndarray | None:
    """Names of the unshared features (columns after the shared genes), None when there are none or no names."""
    if var_names is None or len(var_names) == n_shared:
        return None
    return np.asarray(var_names).astype(str)[n_shared:]


def has_shared_counts(row: Any, n_shared: int | None) -> bool:
    """Whether a one-row CSR block has a non-zero value (on the shared genes when ``n_shared`` is given)."""
    if n_shared is None or row.shape[1] == n_shared:
        return bool(row.nnz and row.data.any())
    return bool(row.data[row.indices < n_shared].any())


def factors_from_cells(rows: Any, n_shared: int, dtype: np.dtype) -> np.ndarray:
    """``[V_i, U_i]`` (K, genes + u) from K cells: each part's rows scaled to unit L2 norm separately.

    The shared part is exactly ``_solvers.v_from_cells``; an unshared row that is all zero stays zero (HALS
    revives it from the statistics).
    """
    dense = rows.toarray() if sp.issparse(rows) else np.array(rows)
    dense = dense.astype(np.float64)
    for part in (dense[:, :n_shared], dense[:, n_shared:]):
        norm = np.linalg.norm(part, axis=1, keepdims=True)
        np.divide(part, norm, out=part, where=norm > 0)
    return dense.astype(dtype)


def split(stacked: np.ndarray, n_shared: int) -> tuple[np.ndarray, np.ndarray]:
    """A stacked (K, genes + u) array as its shared (K, genes) and unshared (K, u) views."""
    return stacked[:, :n_shared], stacked[:, n_shared:]


def stacked(shared: np.ndarray, unshared: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """``[shared, unshared]`` in ``dtype`` (C-contiguous); just ``shared`` when there is no unshared part."""
    if unshared is None or np.shape(unshared)[1] == 0:
        return np.asarray(shared, dtype=dtype)
    return np.ascontiguousarray(np.hstack([np.asarray(shared), np.asarray(unshared)]), dtype=dtype)


#: The state keys of a dataset's unshared parts, by the key of the array they extend.
_UNSHARED_KEYS = {"V": "U", "B": "B_U", "B_old": "B_U_old"}


def split_state(arrays: dict[str, np.ndarray], n_shared: int, names: np.ndarray | None) -> dict[str, Any]:
    """A dataset's state arrays with the stacked ones split: ``V``/``B``/``B_old`` on the model's genes, and
    ``U``/``B_U``/``B_U_old`` plus ``unshared_names`` when it has unshared features (unchanged otherwise)."""
    if arrays["V"].shape[1] == n_shared:
        return arrays
    out: dict[str, Any] = dict(arrays)
    for key, ukey in _UNSHARED_KEYS.items():
        out[key], out[ukey] = split(arrays[key], n_shared)
    out["unshared_names"] = names
    return out


def join_state(d: dict[str, Any], keys: tuple[str, ...], dtype: np.dtype) -> dict[str, np.ndarray]:
    """The inverse of :func:`split_state`: every key of ``keys`` as one array in ``dtype``, stacked when split."""
    return {key: stacked(d[key], d.get(_UNSHARED_KEYS.get(key, "")), dtype) for key in keys}
