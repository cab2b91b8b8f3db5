"""scanpy-style API: AnnData in, results into ``obsm``/``varm``/``obs``/``uns``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _keys
from ._errors import InputError
from .engine import OnlineINMF
from .pipelines import FitOptions, align_cluster_embed
from .preprocess import prepare
from .readers import MemorySource


def _split(adata, batch_key, layer):
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        msg = "adata.X is empty; pass layer= to read counts from a layer"
        raise InputError(msg)
    if batch_key is None:
        return [MemorySource(X, name="dataset", var_names=adata.var_names, obs_names=adata.obs_names)], [np.arange(adata.n_obs)]
    if batch_key not in adata.obs:
        msg = f"batch_key '{batch_key}' is not an obs column; columns: {', '.join(map(str, adata.obs.columns))}"
        raise InputError(msg)
    labels = adata.obs[batch_key]
    cats = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else pd.unique(labels.astype(str))
    values = labels.astype(str).to_numpy()
    sources, rows = [], []
    for cat in cats:
        idx = np.flatnonzero(values == str(cat))
        if len(idx) == 0:
            continue
        sources.append(MemorySource(X[idx], name=str(cat), var_names=adata.var_names, obs_names=adata.obs_names[idx]))
        rows.append(idx)
    if len(sources) < 2:
        msg = f"batch_key '{batch_key}' has a single category; pass batch_key=None to factorise one dataset"
        raise InputError(msg)
    return sources, rows


def integrate(
    adata,
    batch_key: str | None = "batch",
    *,
    k: int = 20,
    lam: float = 5.0,
    epochs: int = 5,
    batch_size: int = 5000,
    n_genes: int | None = None,
    var_thresh: float = 0.1,
    layer: str | None = None,
    seed: int = 1,
    cluster: bool = True,
    umap: bool = False,
    resolution: float = 1.0,
    key_added: str = _keys.UNS,
    copy: bool = False,
    return_model: bool = False,
):
    """Integrate the batches of ``adata`` with online iNMF (rliger's recipe and defaults).

    Counts in ``adata.X`` (or ``layers[layer]``) are normalised by library size, variable genes selected per
    batch, scaled without centring, factorised, quantile-normalised, and (optionally) clustered and embedded.

    Parameters
    ----------
    adata : AnnData, cells x genes, raw counts.
    batch_key : obs column naming each cell's dataset; None = one dataset.
    k, lam, epochs, batch_size, seed : online iNMF parameters (``OnlineINMF``).
    n_genes, var_thresh : gene selection (top-N or rliger's variance threshold).

    Returns
    -------
    None, or the AnnData when ``copy=True``, or the fitted ``OnlineINMF`` when ``return_model=True``.
    Writes ``obsm['X_inmf']`` (H, cells x K), ``obsm['X_inmf_norm']``, ``obs['inmf_cluster']``,
    ``obsm['X_umap']`` (when ``umap``), ``varm['W_inmf']`` (genes x K, zeros for genes not selected),
    ``var['inmf_selected']`` and ``uns[key_added]`` (parameters, objective).
    """
    adata = adata.copy() if copy else adata
    sources, rows = _split(adata, batch_key, layer)
    opts = FitOptions(k=k, lam=lam, epochs=epochs, batch_size=batch_size, seed=seed, n_genes=n_genes, var_thresh=var_thresh, cluster=cluster, umap=umap, resolution=resolution)
    prepared = prepare(sources, thresh=var_thresh, n_genes=n_genes, cache=None)
    est = OnlineINMF(n_components=k, lam=lam, batch_size=batch_size, max_epochs=epochs, random_state=seed)
    est.fit(prepared.sources)
    H = np.zeros((adata.n_obs, k), dtype=np.float32)
    objective = 0.0
    for src, idx in zip(prepared.sources, rows, strict=True):
        H_i, obj = est.transform_source(src, dataset=src.name, with_objective=True)
        H[idx] = H_i
        objective += obj
    datasets = np.empty(adata.n_obs, dtype=object)
    for src, idx in zip(prepared.sources, rows, strict=True):
        datasets[idx] = src.name
    timings: dict = {}
    H_norm, clusters, embedding = align_cluster_embed(H, datasets, opts, timings)
    adata.obsm[_keys.OBSM_H] = H
    adata.obsm[_keys.OBSM_H_NORM] = H_norm.astype(np.float32)
    if clusters is not None:
        adata.obs[_keys.OBS_CLUSTER] = pd.Categorical(np.asarray(clusters).astype(str))
    if embedding is not None:
        adata.obsm[_keys.OBSM_UMAP] = np.asarray(embedding, dtype=np.float32)
    pos = adata.var_names.get_indexer(prepared.genes)
    W = np.zeros((adata.n_vars, k), dtype=np.float32)
    W[pos] = est.W_.T
    adata.varm[_keys.VARM_W] = W
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[pos] = True
    adata.var[_keys.VAR_SELECTED] = selected
    adata.uns[key_added] = {
        "params": {"k": k, "lam": lam, "epochs": epochs, "batch_size": batch_size, "seed": seed, "batch_key": batch_key or "", "n_genes_selected": len(prepared.genes)},
        "objective": float(objective),
        "objective_per_epoch": np.asarray(getattr(est, "objective_", []), dtype=float),
        "timings": timings,
    }
    if return_model:
        return est
    return adata if copy else None


__all__ = ["integrate"]
