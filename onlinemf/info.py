"""Human-readable descriptions of input, model and results files (``onlinemf info`` / ``evaluate``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._errors import InputError


def _is_model(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "format_version" in f.attrs and "W" in f
    except OSError:
        return False


def describe_path(path: str | os.PathLike, *, batch_key: str | None = None) -> str:
    """One screenful about ``path``: format, cells, genes, layers, batches (or a model's contents).

    Parameters
    ----------
    path : path
        An ``.h5ad``, a 10x ``.h5``, an AnnData ``.zarr`` store or an onlinemf model file.
    batch_key : str or None
        Also list the categories of this obs column and their cell counts.

    Returns
    -------
    str
        Lines of ``name  value``.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: file not found"
        raise InputError(msg)
    from .readers import batch_rows, describe, is_zarr_store

    zarr = is_zarr_store(path)
    if path.is_dir() and not zarr:
        msg = f"{path}: expected an .h5ad, a 10x .h5, a model file or an AnnData .zarr store, found a folder"
        raise InputError(msg)
    if not zarr and _is_model(path):
        return _describe_model(path)

    info = describe(path)
    lines = [f"file      {path}", f"format    {info['format']}", f"cells     {info['n_cells']:,}", f"genes     {info['n_genes']:,}"]
    if info.get("encoding"):
        lines.append(f"X         {info['encoding']}")
    if info.get("layers"):
        lines.append(f"layers    {', '.join(info['layers'])}")
    if info.get("has_raw"):
        lines.append("raw       yes")
    if info.get("genomes"):
        lines.append(f"genomes   {', '.join(info['genomes'])}")
    cats = info.get("obs_columns") or {}
    if cats:
        lines.append("obs       " + ", ".join(f"{k} ({v})" if v else k for k, v in cats.items()))
    if batch_key is not None:
        lines.append(f"batches of '{batch_key}':")
        lines.extend(f"  {name}\t{len(rows):,} cells" for name, rows in batch_rows(path, batch_key))
    elif cats:
        from .readers import guess_batch_key

        key = guess_batch_key(cats, info["n_cells"])
        if key:
            lines.append(f"batch key  '{key}' would be used by `onlinemf fit` (override with --batch-key)")
    return "\n".join(lines)


def _describe_model(path: Path) -> str:
    from .model_io import load_model

    saved = load_model(path)
    est = saved.estimator
    lines = [
        f"file      {path}",
        "format    onlinemf model",
        f"factors   K={est.W_.shape[0]}, lambda={est.lam}",
        f"genes     {est.W_.shape[1]:,}",
        f"steps     {getattr(est, 'n_steps_', '?')}",
        "datasets:",
    ]
    for name in est.dataset_names_:
        n = getattr(est, "n_cells_", {}).get(name, "?")
        frozen = " (frozen)" if name in getattr(est, "frozen_", ()) else ""
        if name in est.U_:
            frozen += f", {est.U_[name].shape[1]:,} unshared features"
        lines.append(f"  {name}\t{n:,} cells{frozen}" if isinstance(n, int | np.integer) else f"  {name}{frozen}")
    return "\n".join(lines)


def evaluate_results(path: str | os.PathLike, *, batch_key: str = "inmf_dataset",
                     label_key: str | None = None) -> dict[str, Any]:
    """Alignment (LIGER), and ARI/NMI of ``inmf_cluster`` against ``label_key`` for a results file.

    Parameters
    ----------
    path : path
        A results ``.h5ad`` written by ``onlinemf fit``, ``update`` or ``project``.
    batch_key : str
        obs column of the datasets.
    label_key : str or None
        obs column of known cell labels, for ARI and NMI.

    Returns
    -------
    dict
        Metric name -> value, as :func:`onlinemf.metrics.evaluate` returns.
    """
    import anndata as ad

    from . import _keys
    from .metrics import evaluate

    path = Path(path)
    if not path.exists():
        msg = f"{path}: file not found"
        raise InputError(msg)
    from .readers import open_h5

    with open_h5(path) as h5:  # clear errors for files that are not HDF5 or not AnnData
        is_results = "obsm" in h5 and _keys.OBSM_H in h5["obsm"] and "obs" in h5
    if not is_results:
        msg = f"{path}: expected an onlinemf results .h5ad (with obsm['{_keys.OBSM_H}']), found none; run `onlinemf fit` first"
        raise InputError(msg)
    adata = ad.read_h5ad(path, backed="r")
    obs = adata.obs
    for key in (batch_key, label_key):
        if key is not None and key not in obs:
            msg = f"{path}: no obs column '{key}'; columns: {', '.join(map(str, obs.columns))}"
            raise InputError(msg)
    basis = _keys.OBSM_H_NORM if _keys.OBSM_H_NORM in adata.obsm else _keys.OBSM_H
    H = np.asarray(adata.obsm[basis])
    clusters = obs[_keys.OBS_CLUSTER].to_numpy() if _keys.OBS_CLUSTER in obs else None
    labels = obs[label_key].to_numpy() if label_key else None
    return evaluate(H, obs[batch_key].astype(str).to_numpy(), clusters=clusters, labels=labels)
