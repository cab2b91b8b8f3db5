"""Integration and clustering metrics: LIGER alignment and agreement, ARI, NMI.

ARI and NMI are computed from the contingency table with numpy/scipy, so they need no optional
dependency; ``agreement`` needs scikit-learn (the 'cluster' extra) for its per-dataset NMF.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from scipy import sparse

from ._errors import InputError
from ._validation import check_int, check_matrix, dataset_codes, require_extra

logger = logging.getLogger(__name__)


#: Up to this many rows the exact search uses faiss's brute force when installed (the 'knn' extra).
FAISS_EXACT_MAX_ROWS = 50_000


def _exact_knn(X: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each row's k nearest rows, itself included (exact search).

    faiss's float32 brute force when installed (Kang, 14k cells, k=140: alignment 3.1 s with the kd-tree,
    which degrades in ~20 dimensions), else scipy's kd-tree; the two differ only at float32 near-ties.
    """
    n = X.shape[0]
    try:
        import faiss
    except ImportError:
        faiss = None  # type: ignore[assignment]  # optional backend
    if faiss is None or n > FAISS_EXACT_MAX_ROWS:
        # imported here: 0.1 s that runs with faiss never use
        from scipy.spatial import cKDTree

        _, idx = cKDTree(X).query(X, k=k)
        return idx.reshape(n, k)
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    index = faiss.IndexFlatL2(X32.shape[1])
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # many short parallel regions: slower with threads on a busy machine
    try:
        index.add(X32)
        _, idx = index.search(X32, k)
    finally:
        faiss.omp_set_num_threads(previous)
    return idx.astype(np.int64, copy=False)


def _neighbors_without_self(X: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each row's k nearest other rows (exact search)."""
    idx = _exact_knn(X, k + 1)
    is_self = idx == np.arange(X.shape[0])[:, None]
    # A row whose self was pushed out by duplicates drops its farthest neighbour instead.
    is_self[~is_self.any(axis=1), -1] = True
    is_self[np.cumsum(is_self, axis=1) > 1] = False
    return idx[~is_self].reshape(X.shape[0], k)


def alignment(H_norm, datasets, *, k=None, random_state=1):
    """LIGER alignment score: 0 = datasets unmixed, 1 = perfectly mixed (can slightly exceed 1).

    Every dataset is downsampled (without replacement) to n_min, the size of the smallest one. For each
    sampled cell, x = number of its k nearest other sampled cells (in ``H_norm``) from its own dataset;
    the score is 1 - (mean(x) - k/D) / (k - k/D) with D datasets. Unlike rliger 2's ``calcAlignment``,
    which compares the neighbours against the dataset labels of the first cells of the *unsampled*
    object, the labels of the sampled cells are used (as legacy LIGER did).

    Parameters
    ----------
    H_norm : array-like of shape (n_cells, K)
    datasets : array-like of shape (n_cells,)
    k : int, optional
        Default max(floor(0.01 * n_cells), 10), capped at D * n_min - 1.
    random_state : int, numpy.random.Generator or None

    Returns
    -------
    float
    """
    X = check_matrix(H_norm, "H_norm")
    names, codes = dataset_codes(datasets, X.shape[0])
    n_datasets = len(names)
    if n_datasets < 2:
        msg = f"datasets: expected at least 2 datasets for alignment, found {n_datasets} ({names})"
        raise InputError(msg)
    n_min = int(np.bincount(codes).min())
    max_k = n_datasets * n_min - 1
    if k is None:
        k = min(max(int(np.floor(0.01 * X.shape[0])), 10), max_k)
    else:
        k = check_int(k, "k", 1)
        if k > max_k:
            msg = f"k: expected at most {max_k} (datasets x smallest dataset size - 1), found {k}"
            raise InputError(msg)
    rng = np.random.default_rng(random_state)
    sampled = np.concatenate([rng.choice(np.flatnonzero(codes == d), n_min, replace=False)
                              for d in range(n_datasets)])
    sampled_codes = codes[sampled]
    nn = _neighbors_without_self(X[sampled], k)
    same = (sampled_codes[nn] == sampled_codes[:, None]).sum(axis=1)
    k_over_d = k / n_datasets
    return float(1.0 - (same.mean() - k_over_d) / (k - k_over_d))


def agreement(H_norm, datasets, scaled_data_list, *, ndims=40, k=15, random_state=1):
    """LIGER agreement: how well ``H_norm`` keeps each dataset's own neighbourhoods (0..1, higher better).

    For each dataset, NMF (scikit-learn, ``ndims`` components capped by the data's shape) of its scaled
    data; for each cell, the Jaccard index of its ``k`` nearest other cells in that NMF space and in
    ``H_norm``; the mean over all cells.

    Parameters
    ----------
    H_norm : array-like of shape (n_cells, K)
    datasets : array-like of shape (n_cells,)
    scaled_data_list : mapping name -> matrix, or sequence of matrices
        Scaled data (cells x genes, dense or sparse, non-negative) of each dataset, its rows in the
        order of that dataset's cells in ``H_norm``; a sequence follows the order of first appearance
        in ``datasets``.
    ndims, k : int
    random_state : int or None
        Seed of every NMF.

    Returns
    -------
    float
    """
    X = check_matrix(H_norm, "H_norm")
    names, codes = dataset_codes(datasets, X.shape[0])
    ndims = check_int(ndims, "ndims", 1)
    k = check_int(k, "k", 1)
    if isinstance(scaled_data_list, Mapping):
        absent = [n for n in names if n not in scaled_data_list]
        if absent:
            msg = f"scaled_data_list: expected data for datasets {names}, found none for {absent}"
            raise InputError(msg)
        scaled = [scaled_data_list[n] for n in names]
    else:
        scaled = list(scaled_data_list)
        if len(scaled) != len(names):
            msg = f"scaled_data_list: expected {len(names)} matrices (datasets {names}), found {len(scaled)}"
            raise InputError(msg)
    (decomposition,) = require_extra("cluster", "agreement", ("sklearn.decomposition",))
    seed = int(random_state) if isinstance(random_state, (int, np.integer)) else None
    jaccard = []
    for d, (name, data) in enumerate(zip(names, scaled)):
        idx = np.flatnonzero(codes == d)
        data = sparse.csr_matrix(data) if sparse.issparse(data) else np.asarray(data, dtype=np.float64)
        if data.shape[0] != idx.size:
            msg = f"scaled_data_list[{name!r}]: expected {idx.size} rows (cells), found {data.shape[0]}"
            raise InputError(msg)
        if idx.size <= k:
            msg = f"datasets: expected more than k={k} cells in {name!r}, found {idx.size}"
            raise InputError(msg)
        n_comp = min(ndims, *data.shape)
        nmf = decomposition.NMF(n_components=n_comp, init="nndsvda", random_state=seed, max_iter=500)
        reduced = nmf.fit_transform(data)
        nn1 = _neighbors_without_self(reduced, k)
        nn2 = _neighbors_without_self(X[idx], k)
        # Sizes of row-wise intersections via sorted rows: each shared index appears once in each.
        both = np.sort(np.concatenate([nn1, nn2], axis=1), axis=1)
        shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
        jaccard.append(shared / (2 * k - shared))
    return float(np.concatenate(jaccard).mean())


def contingency(labels_true, labels_pred) -> np.ndarray:
    """Dense contingency table (n_true_classes, n_pred_classes) of two labelings of the same cells."""
    a = np.asarray(labels_true)
    b = np.asarray(labels_pred)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        msg = f"labels: expected two 1-D labelings of equal length, found shapes {a.shape} and {b.shape}"
        raise InputError(msg)
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    n_b = int(ib.max()) + 1 if ib.size else 0
    n_a = int(ia.max()) + 1 if ia.size else 0
    return np.bincount(ia.ravel() * n_b + ib.ravel(), minlength=n_a * n_b).reshape(n_a, n_b)


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert & Arabie), equal to ``sklearn.metrics.adjusted_rand_score``."""
    table = contingency(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    pairs = (table * (table - 1)).sum() / 2
    rows = table.sum(axis=1)
    cols = table.sum(axis=0)
    pairs_a = (rows * (rows - 1)).sum() / 2
    pairs_b = (cols * (cols - 1)).sum() / 2
    total = n * (n - 1) / 2
    expected = pairs_a * pairs_b / total if total > 0 else 0.0
    maximum = (pairs_a + pairs_b) / 2
    if maximum == expected:  # identical trivial partitions (all one cluster, or all singletons)
        return 1.0
    return float((pairs - expected) / (maximum - expected))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred) -> float:
    """Normalized mutual information with the arithmetic-mean normalizer (sklearn's default)."""
    table = contingency(labels_true, labels_pred).astype(np.float64)
    if table.shape[0] == table.shape[1] and table.shape[0] <= 1:
        return 1.0
    n = table.sum()
    rows = table.sum(axis=1, keepdims=True)
    cols = table.sum(axis=0, keepdims=True)
    nz = table > 0
    mi = float((table[nz] / n * np.log(table[nz] * n / (rows @ cols)[nz])).sum())
    mi = max(mi, 0.0)
    normalizer = max((_entropy(rows.ravel()) + _entropy(cols.ravel())) / 2, np.finfo(np.float64).eps)
    return float(mi / normalizer)


def evaluate(H_norm, datasets, *, clusters=None, labels=None, random_state=1) -> dict:
    """Gather the metrics that the given inputs allow.

    Parameters
    ----------
    H_norm : array-like of shape (n_cells, K)
    datasets : array-like of shape (n_cells,)
    clusters : array-like of shape (n_cells,), optional
        Predicted clusters; adds ``n_clusters`` (and ARI/NMI with ``labels``).
    labels : array-like of shape (n_cells,), optional
        Known cell types; cells whose label is None/NaN/"" are left out of ARI and NMI.

    Returns
    -------
    dict with ``n_cells``, ``n_datasets``, ``alignment`` (None for one dataset), and where possible
    ``n_clusters``, ``ari``, ``nmi``, ``n_labelled``.
    """
    X = check_matrix(H_norm, "H_norm")
    names, _ = dataset_codes(datasets, X.shape[0])
    out = {"n_cells": int(X.shape[0]), "n_datasets": len(names),
           "alignment": alignment(X, datasets, random_state=random_state) if len(names) > 1 else None}
    if clusters is not None:
        clusters = np.asarray(clusters)
        if clusters.shape != (X.shape[0],):
            msg = f"clusters: expected shape ({X.shape[0]},), found {clusters.shape}"
            raise InputError(msg)
        out["n_clusters"] = int(np.unique(clusters).size)
        if labels is not None:
            lab = np.asarray(labels, dtype=object)
            if lab.shape != clusters.shape:
                msg = f"labels: expected shape {clusters.shape}, found {lab.shape}"
                raise InputError(msg)
            known = ~(np.equal(lab, None) | (lab != lab) | np.equal(lab, ""))  # type: ignore[call-overload]
            if known.any():
                true = lab[known].astype(str)
                out.update(ari=ari(true, clusters[known]), nmi=nmi(true, clusters[known]),
                           n_labelled=int(known.sum()))
    return out
