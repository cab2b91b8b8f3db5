"""Read what reference mapping needs from a results ``.h5ad`` of ``onlinemf fit``: read-only, nothing else.

The file is opened read-only and only ``obsm['X_inmf']``, ``varm['W_inmf']``, ``var`` and ``obs`` are read; the
counts and every other slot stay on disk. No math here: the vote is in
:mod:`onlinemf.mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from . import _keys
from ._errors import InputError
from .readers import open_h5, read_obs


@dataclass
class ReferenceCells:
    """The labelled cells of a reference results file.

    Attributes
    ----------
    H : ndarray of shape (n_labelled, K), float32
        ``obsm['X_inmf']`` of the cells that carry a label.
    labels : ndarray of shape (n_labelled,), object (str)
    n_cells : int
        All cells of the reference, labelled or not.
    label_key : str
    path : str
        The results file they were read from.
    """

    H: np.ndarray
    labels: np.ndarray
    n_cells: int
    label_key: str
    path: str = ""


def _matrix(h5: h5py.File, group: str, key: str, rows: int | None, path: Path) -> h5py.Dataset:
    item = h5.get(f"{group}/{key}")
    ok = isinstance(item, h5py.Dataset) and item.ndim == 2 and item.dtype.kind == "f"
    if not ok or (rows is not None and item.shape[0] != rows):
        found = "none" if item is None else (f"shape {item.shape}" if isinstance(item, h5py.Dataset) else "a group")
        expected = f"{rows} rows of numbers" if rows is not None else "a 2-D array of numbers"
        msg = f"--reference {path}: expected a results .h5ad of onlinemf fit with {group}['{key}'] ({expected}), found {found}"
        raise InputError(msg)
    return item


def _column(obs: pd.DataFrame, label_key: str, path) -> pd.Series:
    if label_key not in obs.columns:
        msg = f"--label-key {label_key}: not an obs column of {path}; columns: {', '.join(map(str, obs.columns)) or 'none'}"
        raise InputError(msg)
    return obs[label_key]


def read_reference(path, *, label_key: str, W: np.ndarray, genes) -> ReferenceCells:
    """Read the labelled cells of reference results ``path`` after checking they were made with model ``W``.

    Parameters
    ----------
    path : str or PathLike
        Results ``.h5ad`` written by ``onlinemf fit`` (``obsm['X_inmf']``, ``varm['W_inmf']``).
    label_key : str
        obs column with the reference labels; cells without a label (NaN) are left out.
    W : ndarray of shape (K, G)
        The model's shared factors; the results' ``varm['W_inmf']`` must hold the same values (float32).
    genes : array of str of shape (G,)
        The model's genes.

    Returns
    -------
    ReferenceCells
    """
    path = Path(path)
    genes = np.asarray(genes).astype(str)
    K = W.shape[0]
    with open_h5(path) as h5:
        if "obs" not in h5 or "var" not in h5:
            msg = f"--reference {path}: expected a results .h5ad of onlinemf fit, found an HDF5 file without obs/var"
            raise InputError(msg)
        from anndata.io import read_elem

        var_names = np.asarray(read_elem(h5["var"]).index).astype(str)
        W_res = _matrix(h5, "varm", _keys.VARM_W, len(var_names), path)
        H_d = _matrix(h5, "obsm", _keys.OBSM_H, None, path)
        pos = pd.Index(var_names).get_indexer(genes)
        same = W_res.shape[1] == K and H_d.shape[1] == K and bool((pos >= 0).all())
        if same:
            W_file = np.asarray(W_res[...], dtype=np.float64)[pos].T
            W_model = np.asarray(W, dtype=np.float32).astype(np.float64)
            same = np.allclose(W_file, W_model, rtol=1e-5, atol=1e-6 * max(float(np.abs(W_model).max()), 1e-30))
        if not same:
            msg = (f"--reference {path}: expected results written with this model (the same W on its {len(genes)} genes, "
                   f"K={K}), found results of another model; give the results file of the fit that wrote the model")
            raise InputError(msg)
        H_all = np.asarray(H_d[...], dtype=np.float32)
    obs = read_obs(path)
    if len(obs) != H_all.shape[0]:
        msg = f"--reference {path}: expected obsm['{_keys.OBSM_H}'] to have one row per cell ({len(obs)}), found {H_all.shape[0]}"
        raise InputError(msg)
    labels = _column(obs, label_key, path)
    labelled = ~labels.isna().to_numpy()
    if not labelled.any():
        msg = f"--label-key {label_key}: expected labels in {path}, found the column empty (all missing)"
        raise InputError(msg)
    n_cells, H = len(obs), H_all[labelled]
    return ReferenceCells(H=H, labels=labels[labelled].astype(str).to_numpy(dtype=object), n_cells=n_cells,
                          label_key=label_key, path=str(path))


def input_labels(inputs, label_key: str) -> tuple[str, ...]:
    """The labels (sorted, missing values left out) of obs column ``label_key`` across the ``.h5ad`` ``inputs``.

    Read before ``onlinemf fit`` does any work, so that a misspelt key fails at once.
    """
    found: set[str] = set()
    for path in inputs:
        found.update(_column(read_obs(path), label_key, path).dropna().astype(str))
    return tuple(sorted(found))
