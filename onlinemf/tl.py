"""scanpy-style API: AnnData in, results into ``obsm``/``obs``/``varm``/``var``/``uns``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import _keys
from ._daskarray import DaskArraySource, is_dask_array
from ._errors import InputError
from .engine import OnlineINMF
from .pipelines import OutputOptions, align_cluster_embed, umap_helper, unshared_uns
from .preprocess import prepare
from .readers import MemorySource

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anndata import AnnData

    from ._source import Source


def _split(adata: AnnData, batch_key: str | None, layer: str | None) -> tuple[list[Source], list[np.ndarray]]:
    """One source per category of ``obs[batch_key]`` (all cells when None), and its rows (a dask X stays lazy)."""
    if layer is not None and layer not in adata.layers:
        msg = f"layer '{layer}' is not in adata.layers; layers: {', '.join(map(str, adata.layers)) or 'none'}"
        raise InputError(msg)
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        msg = "adata.X is empty; pass layer= to read counts from a layer"
        raise InputError(msg)
    # A dask X (a lazy AnnData) is read block by block; MemorySource would compute all of it.
    make_source: Callable[..., Source] = DaskArraySource if is_dask_array(X) else MemorySource
    if batch_key is None:
        return [make_source(X, name="dataset", var_names=adata.var_names, obs_names=adata.obs_names)], [np.arange(adata.n_obs)]
    if batch_key not in adata.obs:
        msg = f"batch_key '{batch_key}' is not an obs column; columns: {', '.join(map(str, adata.obs.columns))}"
        raise InputError(msg)
    labels = adata.obs[batch_key]
    missing = int(labels.isna().sum())
    if missing:
        msg = f"batch_key '{batch_key}': expected a batch for every cell, found {missing} cells without one"
        raise InputError(msg)
    cats = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else pd.unique(labels.astype(str))
    values = labels.astype(str).to_numpy()
    sources: list[Source] = []
    rows: list[np.ndarray] = []
    for cat in cats:
        idx = np.flatnonzero(values == str(cat))
        if len(idx) == 0:
            continue
        sources.append(make_source(X[idx], name=str(cat), var_names=adata.var_names, obs_names=adata.obs_names[idx]))
        rows.append(idx)
    if len(sources) < 2:
        msg = f"batch_key '{batch_key}' has a single category; pass batch_key=None to factorise one dataset"
        raise InputError(msg)
    return sources, rows


def _check_free(adata: AnnData, targets: list[tuple[str, str]]) -> None:
    """Refuse to replace what ``adata`` already has, unless the caller named the slots (``key_added``)."""
    taken = [f"{attr}['{key}']" for attr, key in targets
             if key in (adata.obs.columns if attr == "obs" else adata.var.columns if attr == "var"
                        else getattr(adata, attr))]
    if taken:
        msg = (f"adata already has {', '.join(taken)}; pass key_added='NAME' to write under other names, "
               f"or key_added='{_keys.UNS}' to replace them")
        raise InputError(msg)


def integrate(
    adata: AnnData,
    batch_key: str | None = "batch",
    *,
    k: int = 20,
    lam: float = 5.0,
    epochs: int = 5,
    batch_size: int = 5000,
    n_genes: int | None = None,
    var_thresh: float = 0.1,
    unshared: Sequence[str] | None = None,
    unshared_thresh: float = 0.1,
    layer: str | None = None,
    seed: int | None = 1,
    cluster: bool = True,
    umap: bool = False,
    resolution: float = 1.0,
    key_added: str | None = None,
    copy: bool = False,
    return_model: bool = False,
) -> AnnData | OnlineINMF | tuple[AnnData, OnlineINMF] | None:
    """Integrate the batches of ``adata`` with online iNMF (rliger's recipe and defaults).

    Counts in ``adata.X`` (or ``adata.layers[layer]``) are normalised by library size, variable genes are
    selected per batch, scaled without centring and factorised; H is then quantile-normalised, and
    optionally clustered (Leiden) and embedded (UMAP). ``adata.X`` is not changed.

    Parameters
    ----------
    adata : AnnData
        Cells x genes, raw counts (non-negative).
    batch_key : str or None, default "batch"
        obs column naming each cell's dataset (batch); None factorises all cells as one dataset.
    k : int, default 20
        Number of factors K.
    lam : float, default 5.0
        Regularisation lambda of the dataset-specific factors V_i.
    epochs : int, default 5
        Passes over the data.
    batch_size : int, default 5000
        Cells per mini-batch, all datasets together.
    n_genes : int or None, default None
        Select this many variable genes; None: rliger's variance threshold ``var_thresh``.
    var_thresh : float, default 0.1
        rliger's ``selectGenes`` variance threshold (used when ``n_genes`` is None).
    unshared : sequence of str or None, default None
        UINMF: batches that also keep their variable genes without counts in some other batch, learned as
        unshared factors U_i (rliger's ``useUnsharedDatasets``); ``uns['<key>']['unshared']`` gets them.
    unshared_thresh : float, default 0.1
        Variance threshold of those genes (rliger's ``unsharedThresh``).
    layer : str or None, default None
        Read counts from ``adata.layers[layer]`` instead of ``adata.X``.
    seed : int or None, default 1
        Seed of the initialisation, the mini-batch order, quantile normalisation, Leiden and UMAP;
        None: not reproducible.
    cluster : bool, default True
        Leiden clustering of the normalised H (needs the ``cluster`` extra).
    umap : bool, default False
        UMAP of the normalised H (needs the ``umap`` extra).
    resolution : float, default 1.0
        Leiden resolution.
    key_added : str or None, default None
        Name of every slot written (see Returns), ``"inmf"`` when None. With None, nothing ``adata`` already
        has is replaced: a slot that exists raises InputError. Naming a key writes under it, replacing
        what is there.
    copy : bool, default False
        Work on a copy of ``adata`` and return it, leaving ``adata`` unchanged.
    return_model : bool, default False
        Also return the fitted :class:`~onlinemf.OnlineINMF` (its ``W_`` covers the selected genes only).

    Returns
    -------
    ``None``; or the AnnData copy if ``copy``; or the model if ``return_model``; or ``(adata_copy, model)`` if
    both. The AnnData gets, with ``key = key_added or "inmf"``:

    ``obsm['X_<key>']``
        H, shape (n_cells, K), float32.
    ``obsm['X_<key>_norm']``
        Quantile-normalised H, shape (n_cells, K).
    ``obs['<key>_cluster']``
        Leiden clusters, categorical (when ``cluster``).
    ``obsm['X_<key>_umap']``
        UMAP of the normalised H, shape (n_cells, 2) (when ``umap``).
    ``varm['W_<key>']``
        Shared factors W transposed, shape (n_genes, K), zeros for genes not selected.
    ``var['<key>_selected']``
        Whether each gene was selected, bool.
    ``uns['<key>']``
        ``params`` (this call's parameters), ``objective`` (final, exact), ``objective_per_epoch``,
        ``timings`` (seconds per step).

    Raises
    ------
    InputError
        Unknown ``batch_key`` or ``layer``, a single batch, cells without a batch, an unusable ``key_added``,
        or (with ``key_added=None``) a slot that already exists.
    """
    if key_added is not None and (not isinstance(key_added, str) or not key_added or "/" in key_added):
        msg = f"key_added: expected a non-empty name without '/', found {key_added!r}"
        raise InputError(msg)
    key = _keys.UNS if key_added is None else key_added
    names = _keys.slots(key)
    writes = [(attr, name) for attr, name in names.items()
              if (name != names.obs_cluster or cluster) and (name != names.obsm_umap or umap)]
    if key_added is None:
        _check_free(adata, writes)
    sources, rows = _split(adata, batch_key, layer)
    adata = adata.copy() if copy else adata
    outputs = OutputOptions(cluster=cluster, umap=umap, resolution=resolution, seed=seed)
    with umap_helper(outputs, None) as helper:  # UMAP beside Leiden: started now, its imports overlap the fit
        prepared = prepare(sources, thresh=var_thresh, n_genes=n_genes, cache=None, unshared=list(unshared or ()),
                           unshared_thresh=unshared_thresh)
        est = OnlineINMF(n_components=k, lam=lam, batch_size=batch_size, max_epochs=epochs, random_state=seed)
        est.fit(prepared.sources, unshared={name: g.size for name, g in prepared.unshared.items()})
        H = np.zeros((adata.n_obs, k), dtype=np.float32)
        datasets = np.empty(adata.n_obs, dtype=object)
        objective = 0.0
        for src, idx in zip(prepared.sources, rows, strict=True):
            H_i, obj = est.transform_source(src, dataset=src.name, with_objective=True)
            H[idx] = H_i
            datasets[idx] = src.name
            if obj is not None:
                objective += obj
        timings: dict[str, float] = {}
        H_norm, clusters, embedding = align_cluster_embed(H, datasets, outputs, timings, umap_process=helper)
    adata.obsm[names.obsm_h] = H
    adata.obsm[names.obsm_h_norm] = H_norm.astype(np.float32)
    if clusters is not None:
        adata.obs[names.obs_cluster] = pd.Categorical(np.asarray(clusters).astype(str))
    if embedding is not None:
        adata.obsm[names.obsm_umap] = np.asarray(embedding, dtype=np.float32)
    pos = adata.var_names.get_indexer(prepared.genes)
    W = np.zeros((adata.n_vars, k), dtype=np.float32)
    W[pos] = est.W_.T
    adata.varm[names.varm_w] = W
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[pos] = True
    adata.var[names.var_selected] = selected
    adata.uns[names.uns] = {
        "params": {"k": k, "lam": lam, "epochs": epochs, "batch_size": batch_size,
                   "seed": "" if seed is None else seed, "batch_key": batch_key or "", "layer": layer or "",
                   "n_genes": n_genes or 0, "var_thresh": var_thresh, "n_genes_selected": len(prepared.genes),
                   "cluster": cluster, "umap": umap, "resolution": resolution, "key_added": key},
        "objective": float(objective),
        "objective_per_epoch": np.asarray(getattr(est, "objective_", []), dtype=float),
        "timings": timings,
        **unshared_uns(est),
    }
    if copy and return_model:
        return adata, est
    if return_model:
        return est
    return adata if copy else None


__all__ = ["integrate"]
