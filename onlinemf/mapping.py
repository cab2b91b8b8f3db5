"""Reference mapping: align a query's H to a reference's quantile-normalised space and transfer labels.

Pure functions on arrays (no I/O). Three steps:

1. :func:`reference_quantiles` summarises what rliger's quantile normalisation maps every dataset onto: per
   cluster (largest RMS-scaled factor, kNN-refined, as :func:`~onlinemf.postprocess.quantile_norm`) and per
   factor, the R type-7 quantiles of the reference dataset's H. That is K x K x (q + 1) numbers, stored with a
   model, so a query can be aligned without the reference's cells.
2. :func:`align_to_reference` maps each query dataset's H onto those quantiles exactly as ``quantile_norm``
   maps a dataset onto its reference: the query lands in the reference's normalised space.
3. :func:`transfer_labels` votes among the query cell's k nearest reference cells: the label, the share of
   neighbours agreeing (confidence) and the mean distance to them in units of the reference's own neighbour
   distances (mapping distance: about 1 for a cell like the reference's, larger for a cell type the reference
   lacks).

Which space to vote in was measured (``benchmarks/bench_mapping.py``, leave one batch out on CellBench and
Baron): cosine distance on H as projected (``obsm['X_inmf']`` of query and reference) was as accurate as or more
accurate than any vote in the quantile-normalised space (cosine or Euclidean), separated absent cell types
better and gave better-calibrated confidences, so ``onlinemf project --reference`` votes there; the aligned H
is what the results file keeps as ``obsm['X_inmf_norm']`` (query and reference in one normalised space, for
joint clustering and embedding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ._cores import usable_cores
from ._errors import InputError
from ._validation import check_factors, check_int, dataset_codes
from .postprocess import (
    piecewise_map,
    quantiles_type7,
    refined_labels,
    subsample,
)

logger = logging.getLogger(__name__)

#: Reference cells (a seeded sample) whose own neighbour distances set the unit of the mapping distance.
SCALE_SAMPLE = 5000
METRICS = ("euclidean", "cosine")

__all__ = ["LabelTransfer", "MappingRecord", "ReferenceQuantiles", "align_to_reference", "reference_quantiles", "transfer_labels"]


@dataclass(frozen=True)
class ReferenceQuantiles:
    """Per-cluster, per-factor quantiles of the reference dataset's H, and the settings that made them.

    Attributes
    ----------
    values : ndarray of shape (K, K, q + 1), float64
        ``values[c, j]``: type-7 quantiles at 0, 1/q, ..., 1 of factor j over the reference cells of cluster c
        (NaN for clusters with fewer than ``min_cells`` reference cells: ``quantile_norm`` maps nothing there).
    n_cells : ndarray of shape (K,), int64
        Reference cells per cluster.
    reference : str
        Name of the reference dataset.
    min_cells, n_neighbors, max_sample : int
    refine_knn : bool
    eps : float
        ``quantile_norm``'s settings; alignment uses the same ones.
    """

    values: np.ndarray
    n_cells: np.ndarray
    reference: str
    min_cells: int = 20
    n_neighbors: int = 20
    max_sample: int = 1000
    refine_knn: bool = True
    eps: float = 0.9

    def __post_init__(self):
        v = np.asarray(self.values)
        if v.ndim != 3 or v.shape[0] != v.shape[1] or v.shape[2] < 2 or np.asarray(self.n_cells).shape != (v.shape[0],):
            msg = (f"reference quantiles: expected values of shape (K, K, q+1) and n_cells of shape (K,), "
                   f"found {v.shape} and {np.asarray(self.n_cells).shape}")
            raise InputError(msg)

    @property
    def n_factors(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_quantiles(self) -> int:
        return int(self.values.shape[2] - 1)

    def settings(self) -> dict:
        """The scalar attributes, JSON-able (for a model file)."""
        return {"reference": str(self.reference), "min_cells": int(self.min_cells), "n_neighbors": int(self.n_neighbors),
                "max_sample": int(self.max_sample), "refine_knn": bool(self.refine_knn), "eps": float(self.eps)}


@dataclass(frozen=True)
class MappingRecord:
    """What a model file keeps so that queries can be mapped onto its reference without the reference's cells.

    Attributes
    ----------
    quantiles : ReferenceQuantiles
    label_key : str or None
        The obs column named by ``onlinemf fit --label-key`` (the default label column for ``project``).
    labels : tuple of str
        The labels that column held in the reference (sorted).
    """

    quantiles: ReferenceQuantiles
    label_key: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelTransfer:
    """Labels voted for query cells.

    Attributes
    ----------
    labels : ndarray of shape (n_query,), object (str)
    confidence : ndarray of shape (n_query,), float32
        Share of the ``n_neighbors`` reference neighbours carrying the winning label (1/k .. 1).
    distance : ndarray of shape (n_query,), float32
        Mean distance to those neighbours divided by the median of the same quantity for reference cells
        among themselves (``scale``).
    scale : float
        The reference's median mean-neighbour distance (in the metric's units).
    """

    labels: np.ndarray
    confidence: np.ndarray
    distance: np.ndarray
    scale: float


def _faiss():
    """faiss (the 'knn' extra) or None: an accelerator, never a requirement."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def reference_quantiles(H, datasets, *, reference=None, quantiles: int = 50, min_cells: int = 20,
                        n_neighbors: int = 20, max_sample: int = 1000, refine_knn: bool = True, eps: float = 0.9,
                        random_state=1, labels=None) -> ReferenceQuantiles:
    """The quantiles ``quantile_norm`` maps every dataset onto, per cluster and factor of the reference dataset.

    Parameters
    ----------
    H : array-like of shape (n_cells, K)
        Cell factors of all datasets stacked (as for :func:`~onlinemf.postprocess.quantile_norm`).
    datasets : array-like of shape (n_cells,)
        Dataset name of each cell.
    reference : optional
        Reference dataset; default the largest (the first one on ties), as ``quantile_norm``.
    quantiles, min_cells, n_neighbors, max_sample, refine_knn, eps, random_state
        As ``quantile_norm``. Clusters larger than ``max_sample`` are summarised from a seeded sample of
        ``max_sample`` cells (``quantile_norm`` draws one such sample per dataset; below it both are exact).
    labels : array-like of shape (n_reference_cells,), optional
        The reference dataset's clusters from :func:`~onlinemf.postprocess.refined_labels` with the same
        settings, when already computed.

    Returns
    -------
    ReferenceQuantiles
    """
    H = check_factors(H)
    names, codes = dataset_codes(datasets, H.shape[0])
    quantiles = check_int(quantiles, "quantiles", 1)
    min_cells = check_int(min_cells, "min_cells", 0)
    n_neighbors = check_int(n_neighbors, "n_neighbors", 1)
    max_sample = check_int(max_sample, "max_sample", 1)
    if reference is None:
        ref = int(np.bincount(codes, minlength=len(names)).argmax())
    elif reference in names:
        ref = names.index(reference)
    else:
        msg = f"reference: expected one of the datasets {names}, found {reference!r}"
        raise InputError(msg)
    H_ref = H[codes == ref]
    if labels is None:
        labels = refined_labels(H_ref, n_neighbors, refine_knn=refine_knn, eps=eps, random_state=random_state)
    elif np.shape(labels) != (H_ref.shape[0],):
        msg = f"labels: expected one label per reference cell ({H_ref.shape[0]}), found shape {np.shape(labels)}"
        raise InputError(msg)
    labels = np.asarray(labels)
    K = H.shape[1]
    n_cells = np.bincount(labels[labels >= 0], minlength=K).astype(np.int64)
    values = np.full((K, K, quantiles + 1), np.nan)
    rng = np.random.default_rng(random_state)
    for c in np.flatnonzero(n_cells >= max(min_cells, 1)):
        cells = H_ref[labels == c].astype(np.float64)
        samples = np.column_stack([subsample(cells[:, j], max_sample, rng) for j in range(K)])
        values[c] = quantiles_type7(samples, quantiles).T
    return ReferenceQuantiles(values=values, n_cells=n_cells, reference=str(names[ref]), min_cells=min_cells,
                              n_neighbors=n_neighbors, max_sample=max_sample, refine_knn=bool(refine_knn),
                              eps=float(eps))


def align_to_reference(H, reference: ReferenceQuantiles, *, datasets=None, random_state=1):
    """Map query H onto the reference's quantile-normalised space, one query dataset at a time.

    Each dataset is clustered as ``quantile_norm`` clusters it (largest RMS-scaled factor, kNN-refined); for
    every cluster c with at least ``min_cells`` cells in both the dataset and the reference, factor j is mapped
    piecewise-linearly from the dataset's quantiles onto ``reference.values[c, j]`` (values become 0 where
    either quantile vector is all zero or constant). Other cells keep their H, as in ``quantile_norm``. Applied
    to the datasets ``quantile_norm`` was given, it reproduces its output (exactly when no cluster exceeds
    ``max_sample`` cells).

    Parameters
    ----------
    H : array-like of shape (n_cells, K)
        Query cell factors (e.g. projected on W).
    reference : ReferenceQuantiles
    datasets : array-like of shape (n_cells,), optional
        Query dataset of each cell (each is aligned on its own); default: one dataset.
    random_state : int, numpy.random.Generator or None
        Seeds the samples of query clusters larger than ``max_sample``.

    Returns
    -------
    H_norm : ndarray of shape (n_cells, K), H's float dtype
    clusters : ndarray of shape (n_cells,), int64, -1 for cells with all-zero factors
    """
    H = check_factors(H)
    n_cells, K = H.shape
    if K != reference.n_factors:
        msg = f"H: expected {reference.n_factors} factors (the reference's), found {K}"
        raise InputError(msg)
    if datasets is None:
        datasets = np.zeros(n_cells, dtype=np.int64)
    _, codes = dataset_codes(datasets, n_cells)
    rng = np.random.default_rng(random_state)
    ref_ok = reference.n_cells >= reference.min_cells
    H_norm = H.copy()
    clusters = np.empty(n_cells, dtype=np.int64)
    n_mapped = 0
    for d in range(int(codes.max()) + 1 if n_cells else 0):
        idx = np.flatnonzero(codes == d)
        H_d = H[idx]
        labels = refined_labels(H_d, reference.n_neighbors, refine_knn=reference.refine_knn, eps=reference.eps,
                                random_state=random_state)
        clusters[idx] = labels
        for c in range(K):
            cells = idx[labels == c]
            if cells.size == 0 or cells.size < reference.min_cells or not ref_ok[c]:
                continue
            n_mapped += cells.size
            values = H[cells].astype(np.float64)
            q2s = quantiles_type7(np.column_stack([subsample(values[:, j], reference.max_sample, rng)
                                                   for j in range(K)]), reference.n_quantiles)
            for j in range(K):
                q2, q1 = q2s[:, j], reference.values[c, j]
                if q1.sum() == 0 or q2.sum() == 0 or np.unique(q1).size < 2 or np.unique(q2).size < 2:
                    H_norm[cells, j] = 0.0
                else:
                    H_norm[cells, j] = piecewise_map(values[:, j], q2, q1)
    logger.info("align_to_reference: %d of %d query cells mapped onto %r's quantiles", n_mapped, n_cells,
                reference.reference)
    return H_norm, clusters


def _neighbours(reference: np.ndarray, query: np.ndarray, k: int, metric: str, eps: float):
    """k nearest reference rows of each query row: (distances (n, k) float64, indices (n, k) int64).

    faiss's exact float32 search when installed (the 'knn' extra), else scipy's kd-tree: kd-trees degrade in ~20
    dimensions (200k reference x 20k query unit vectors, K=20, 1 thread on a busy 2-core machine: kd-tree 187 s,
    faiss 19 s, the same neighbours).
    """
    if metric == "cosine":
        # On unit vectors the Euclidean neighbours are the cosine neighbours; report 1 - cos = d^2 / 2.
        reference, query = _unit(reference), _unit(query)
    faiss = _faiss()
    if faiss is not None and eps == 0:
        index = faiss.IndexFlatL2(reference.shape[1])
        previous = faiss.omp_get_max_threads()
        # Many queries are one long parallel region (worth every core); a few are short ones (one thread).
        faiss.omp_set_num_threads(usable_cores() if query.shape[0] >= 10_000 else 1)
        try:
            index.add(np.ascontiguousarray(reference, dtype=np.float32))
            sq, idx = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        finally:
            faiss.omp_set_num_threads(previous)
        sq = np.maximum(sq.astype(np.float64), 0.0)
    else:
        # imported here: 0.1 s that runs with faiss never use
        from scipy.spatial import cKDTree

        dist, idx = cKDTree(reference).query(query, k=k, eps=eps)
        dist, idx = dist.reshape(query.shape[0], k), idx.reshape(query.shape[0], k)
        sq = dist * dist
    dist = sq / 2 if metric == "cosine" else np.sqrt(sq)
    return dist, idx.astype(np.int64)


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


def transfer_labels(H_query, H_reference, labels, *, n_neighbors: int = 20, metric: str = "cosine",
                    eps: float = 0.0, random_state=1) -> LabelTransfer:
    """Vote each query cell's label among its ``n_neighbors`` nearest reference cells.

    Parameters
    ----------
    H_query : array-like of shape (n_query, K)
        Query H aligned to the reference (:func:`align_to_reference`).
    H_reference : array-like of shape (n_reference, K)
        The reference's quantile-normalised H (``obsm['X_inmf_norm']`` of its results).
    labels : array-like of shape (n_reference,)
        Reference labels (no missing values: drop unlabelled cells first).
    n_neighbors : int
        Capped at the number of reference cells.
    metric : {"euclidean", "cosine"}
    eps : float
        Error bound of the kd-tree search (0 = exact).
    random_state : int, Generator or None
        Seeds the sample of reference cells that sets the distance unit.

    Returns
    -------
    LabelTransfer
        Ties between labels go to the label that sorts first.
    """
    H_query = check_factors(H_query, "H_query").astype(np.float64, copy=False)
    H_reference = check_factors(H_reference, "H_reference").astype(np.float64, copy=False)
    if H_query.shape[1] != H_reference.shape[1]:
        msg = f"H_query: expected {H_reference.shape[1]} factors (the reference's), found {H_query.shape[1]}"
        raise InputError(msg)
    if metric not in METRICS:
        msg = f"metric: expected one of {METRICS}, found {metric!r}"
        raise InputError(msg)
    seen, codes = dataset_codes(np.asarray(labels).astype(object), H_reference.shape[0], "labels")
    names = np.asarray([str(n) for n in seen], dtype=object)
    order = np.argsort(names.astype(str), kind="stable")  # codes in sorted-label order: ties go to the first
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    codes, names = rank[codes], names[order]
    n_ref = H_reference.shape[0]
    k = min(check_int(n_neighbors, "n_neighbors", 1), n_ref)

    dist, idx = _neighbours(H_reference, H_query, k, metric, eps)
    votes = codes[idx]
    counts = np.zeros((H_query.shape[0], names.size), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(H_query.shape[0]), k), votes.ravel()), 1)
    winner = counts.argmax(axis=1)
    confidence = counts[np.arange(winner.size), winner] / k

    # Unit: how far reference cells sit from their own k nearest other reference cells (median of the mean).
    rng = np.random.default_rng(random_state)
    sample = rng.choice(n_ref, SCALE_SAMPLE, replace=False) if n_ref > SCALE_SAMPLE else np.arange(n_ref)
    k_self = min(k + 1, n_ref)
    ref_dist, _ = _neighbours(H_reference, H_reference[sample], k_self, metric, eps)
    own = ref_dist[:, 1:].mean(axis=1) if k_self > 1 else ref_dist[:, 0]
    scale = float(np.median(own))
    distance = dist.mean(axis=1) / scale if scale > 0 else dist.mean(axis=1)
    logger.info("transfer_labels: %d query cells, %d reference cells, k=%d, %s; median confidence %.2f",
                H_query.shape[0], n_ref, k, metric, float(np.median(confidence)) if confidence.size else float("nan"))
    return LabelTransfer(labels=names[winner], confidence=confidence.astype(np.float32),
                         distance=distance.astype(np.float32), scale=scale)
