"""Post-processing of iNMF cell factors: quantile normalization, Leiden clustering, UMAP.

All functions take plain arrays: ``H`` of shape (n_cells, K) holding the cell factors of every dataset
stacked, and ``datasets`` of shape (n_cells,) naming the dataset of each cell. Datasets are ordered by
first appearance in ``datasets``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import warnings

import numpy as np
from scipy import sparse

from ._cores import usable_cores
from ._errors import InputError
from ._validation import check_factors, check_int, check_matrix, dataset_codes, require_extra

logger = logging.getLogger(__name__)
# faiss logs at INFO each CPU-specific build it fails to load ("Could not load library with AVX512 support
# due to: ModuleNotFoundError ..."): noise in every CLI run, which shows INFO. Warnings still come through.
if logging.getLogger("faiss.loader").level == logging.NOTSET:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

#: Up to this many cells neighbour searches are exact; above, faiss's inverted-file index (or pynndescent).
EXACT_KNN_MAX_CELLS = 50_000
#: rliger's SNN prune threshold: Jaccard weights below it are dropped.
SNN_PRUNE = 1.0 / 15.0
#: faiss inverted-file search above EXACT_KNN_MAX_CELLS: n / IVF_CELLS_PER_LIST lists, IVF_PROBES of them
#: searched per query. 467k resampled Kang cells x 20 factors, 1 thread: recall@20 0.990, search 10.5 s
#: CPU (8 probes: 0.998, 17.7 s; sqrt(n)-sized lists cost O(n^1.5) and took 51 s).
IVF_CELLS_PER_LIST = 250
IVF_PROBES = 4
#: Edges converted to Python ints at a time while igraph reads them (two lists of ints, ~70 bytes an edge).
LEIDEN_EDGE_SLICE = 1_000_000
#: UMAP starts from the spectral embedding of its graph up to this many cells, from PCA above: umappp's spectral
#: start (irlba on the graph Laplacian) grows much faster than the cells (resampled Kang H: 14k cells 0.16 s,
#: 40k 2.5 s, 100k 78 s), while one epoch of the layout costs ~0.15 s per 100k cells.
SPECTRAL_INIT_MAX_CELLS = 50_000


def _optional(module: str):
    """The module, or None when it is not installed (an accelerator, never a requirement)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def max_factor_labels(H: np.ndarray) -> np.ndarray:
    """Label each cell by its largest RMS-scaled factor (rliger ``max_factor``), -1 when none is > 0.

    Parameters
    ----------
    H : ndarray of shape (n_cells, K)
        Factors of ONE dataset; each column is divided by its root mean square with n-1.

    Returns
    -------
    ndarray of shape (n_cells,), int64, values in -1..K-1 (ties go to the lowest factor).
    """
    # float64 arithmetic whatever H's dtype, in row chunks so float32 H never gets a whole float64 copy.
    chunk = 65536
    n = H.shape[0]
    sumsq = np.zeros(H.shape[1])
    for start in range(0, n, chunk):
        part = np.asarray(H[start:start + chunk], dtype=np.float64)
        sumsq += (part * part).sum(axis=0)
    rms = np.sqrt(sumsq / (n - 1)) if n > 1 else np.full(H.shape[1], np.inf)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.nan_to_num(np.asarray(H[start:start + chunk], dtype=np.float64) / rms, nan=0.0)
        part = scaled.argmax(axis=1)
        part[scaled.max(axis=1) <= 0] = -1
        labels[start:start + chunk] = part
    return labels


def knn_vote(neighbors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Relabel each cell by the majority label among its ``neighbors`` rows; ties go to the smallest label.

    Parameters
    ----------
    neighbors : ndarray of shape (n_cells, k), int
        Indices into ``labels`` (include the cell itself to count its own vote).
    labels : ndarray of shape (n_cells,), int, values >= -1
    """
    n_labels = int(labels.max()) + 2
    shifted = labels[neighbors] + 1  # -1 becomes column 0, so it wins ties like rliger's std::map order
    flat = np.arange(neighbors.shape[0])[:, None] * n_labels + shifted
    counts = np.bincount(flat.ravel(), minlength=neighbors.shape[0] * n_labels)
    return counts.reshape(neighbors.shape[0], n_labels).argmax(axis=1).astype(np.int64) - 1


def quantiles_type7(values: np.ndarray, n_quantiles: int) -> np.ndarray:
    """R type-7 quantiles of ``values`` at 0, 1/q, ..., 1: shape (q+1,), or (q+1, m) for the m columns of a
    2-D ``values`` (one call for all factors of a cluster: the same numbers as one call per column)."""
    probs = np.minimum(np.arange(n_quantiles + 1) * (1.0 / n_quantiles), 1.0)
    return np.quantile(values, probs, axis=0, method="linear")


def piecewise_map(values: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """R ``approxfun(x, y, rule=2)`` applied to ``values``: tied x averaged, clamped outside the range."""
    xu, inverse = np.unique(x, return_inverse=True)
    yu = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return np.interp(values, xu, yu)


def subsample(values: np.ndarray, max_sample: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_sample`` of ``values`` (rows), drawn without replacement; all of them without a draw
    (quantiles ignore order)."""
    if values.shape[0] <= max_sample:
        return values
    return values[rng.choice(values.shape[0], max_sample, replace=False)]


def refined_labels(H: np.ndarray, n_neighbors: int = 20, *, refine_knn: bool = True, eps: float = 0.9,
                   random_state=1) -> np.ndarray:
    """The clusters ``quantile_norm`` gives the cells of ONE dataset: max-factor labels (:func:`max_factor_labels`),
    then (``refine_knn``) the majority label of each cell's ``n_neighbors`` nearest cells, itself included."""
    labels = max_factor_labels(H)
    if refine_knn:
        nn = knn_indices(H, min(n_neighbors, H.shape[0]), eps=eps, random_state=random_state)
        labels = knn_vote(nn, labels)
    return labels


def quantile_norm(H, datasets, *, reference=None, quantiles=50, min_cells=20, n_neighbors=20,
                  max_sample=1000, refine_knn=True, eps=0.9, random_state=1, labels=None):
    """Quantile-normalize iNMF cell factors across datasets, as rliger's ``quantileNorm``.

    1. Per dataset, scale each factor by its RMS (n-1) and label each cell by its largest factor
       (-1 when all are 0).
    2. ``refine_knn``: within each dataset, relabel each cell by the majority label of its
       ``n_neighbors`` nearest neighbours (itself included) in the *unscaled* factors; ties go to the
       smallest label. All cells vote at once from the step-1 labels (rliger updates them in place, so
       its later cells see earlier cells' new labels, and breaks ties in the string order of 1-based
       labels). Neighbours: see :func:`knn_indices` (kd-tree with RANN's eps up to 50k cells per
       dataset, pynndescent above).
    3. For every dataset (the reference included), every cluster c in 0..K-1 and every factor, when both
       the dataset and the reference have >= ``min_cells`` cells in c: subsample <= ``max_sample``
       values from each side, take R type-7 quantiles at 0, 1/q, ..., 1 and map the dataset's values
       piecewise-linearly onto the reference quantiles (tied x averaged, clamped). If either quantile
       vector sums to 0 or has < 2 distinct values, the values become 0. Other cells keep raw H.

    Parameters
    ----------
    H : array-like of shape (n_cells, K)
        Non-negative cell factors of all datasets stacked.
    datasets : array-like of shape (n_cells,)
        Dataset name of each cell.
    reference : optional
        Name of the reference dataset; default the largest (the first one on ties).
    quantiles, min_cells, n_neighbors, max_sample : int
        rliger's ``quantiles``, ``minCells``, ``nNeighbors`` (capped at each dataset's size), ``maxSample``.
    refine_knn : bool
        Whether to run step 2.
    eps : float
        Error bound of the approximate neighbour search (0 = exact).
    random_state : int, numpy.random.Generator or None
        Seeds the one Generator used for all subsampling, in the order dataset, cluster, factor,
        then (dataset sample, reference sample); only groups larger than ``max_sample`` draw.
    labels : dict, optional
        Dataset name -> that dataset's cluster labels from :func:`refined_labels` with the same settings,
        computed before (the pipeline computes the reference's once for the model and for this call).

    Returns
    -------
    H_norm : ndarray of shape (n_cells, K), float32 when H is float32, else float64
        The quantile mapping runs in float64 per (dataset, cluster, factor) group either way, so float32
        input gives the float64 result rounded to float32.
    clusters : ndarray of shape (n_cells,), int64
        Cluster (factor) label per cell after refinement, -1 for cells with all-zero factors.
    """
    H = check_factors(H)
    n_cells, n_factors = H.shape
    names, codes = dataset_codes(datasets, n_cells)
    quantiles = check_int(quantiles, "quantiles", 1)
    min_cells = check_int(min_cells, "min_cells", 0)
    n_neighbors = check_int(n_neighbors, "n_neighbors", 1)
    max_sample = check_int(max_sample, "max_sample", 1)
    if not np.isfinite(eps) or eps < 0:
        msg = f"eps: expected a finite number >= 0, found {eps!r}"
        raise InputError(msg)
    sizes = np.bincount(codes, minlength=len(names))
    if reference is None:
        ref = int(sizes.argmax())
    elif reference in names:
        ref = names.index(reference)
    else:
        msg = f"reference: expected one of the datasets {names}, found {reference!r}"
        raise InputError(msg)
    rng = np.random.default_rng(random_state)

    known = dict(labels or {})
    unknown = sorted(set(known) - set(names))
    if unknown:
        msg = f"labels: expected names among the datasets {names}, found {unknown}"
        raise InputError(msg)
    labels = np.empty(n_cells, dtype=np.int64)
    for d, name in enumerate(names):
        idx = np.flatnonzero(codes == d)
        given = known.get(name)
        if given is not None and np.shape(given) != (idx.size,):
            msg = f"labels[{name!r}]: expected one label per cell of the dataset ({idx.size}), found shape {np.shape(given)}"
            raise InputError(msg)
        labels[idx] = given if given is not None else refined_labels(H[idx], n_neighbors, refine_knn=refine_knn,
                                                                      eps=eps, random_state=random_state)

    # Group cells by (dataset, cluster) once, keeping file order inside a group.
    key = codes * (n_factors + 1) + (labels + 1)
    order = np.argsort(key, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(key, minlength=len(names) * (n_factors + 1)))[:-1])
    H_norm = H.copy()
    n_mapped = 0
    for d in range(len(names)):
        for c in range(n_factors):
            cells = groups[d * (n_factors + 1) + c + 1]
            ref_cells = groups[ref * (n_factors + 1) + c + 1]
            if cells.size < min_cells or ref_cells.size < min_cells or cells.size == 0:
                continue
            n_mapped += cells.size
            values = H[cells].astype(np.float64)
            ref_values = H[ref_cells].astype(np.float64)
            # Draws per factor, dataset sample then reference sample (the documented order); the quantiles of all
            # factors in one call each.
            samples = [(subsample(values[:, j], max_sample, rng), subsample(ref_values[:, j], max_sample, rng))
                       for j in range(n_factors)]
            q2s = quantiles_type7(np.column_stack([a for a, _ in samples]), quantiles)
            q1s = quantiles_type7(np.column_stack([b for _, b in samples]), quantiles)
            for j in range(n_factors):
                q2, q1 = q2s[:, j], q1s[:, j]
                if q1.sum() == 0 or q2.sum() == 0 or np.unique(q1).size < 2 or np.unique(q2).size < 2:
                    H_norm[cells, j] = 0.0
                else:
                    H_norm[cells, j] = piecewise_map(values[:, j], q2, q1)
    logger.info("quantile_norm: %d datasets, reference %r, %d of %d cells mapped",
                len(names), names[ref], n_mapped, n_cells)
    return H_norm, labels


def knn_indices(X: np.ndarray, k: int, *, eps: float = 0.0, random_state=1) -> np.ndarray:
    """Indices (n, k) of each row's k nearest rows (itself included) in Euclidean distance.

    With faiss installed (the 'knn' extra): exact float32 brute force (BLAS) up to ``EXACT_KNN_MAX_CELLS``
    rows, an inverted-file index above (recall@20 about 0.99). Without faiss, or with ``eps=0`` up to
    ``EXACT_KNN_MAX_CELLS`` rows (exact in float64, so near-ties rank as in a float64 reference): scipy's
    kd-tree with RANN's (1+eps)-approximate search; above ``EXACT_KNN_MAX_CELLS`` rows without faiss,
    pynndescent when installed.
    kd-trees degrade in ~20 dimensions: Kang H_norm (14k x 20, 2-core machine, CPU seconds) kd-tree
    2.4 s, faiss exact 0.36 s; 47k resampled Kang cells: kd-tree eps=0.9 ~5 s, pynndescent 6.7 s,
    faiss IVF 0.8 s. See benchmarks/bench_postprocess.py.
    """
    n = X.shape[0]
    faiss = _optional("faiss")
    if faiss is not None and not (eps == 0 and n <= EXACT_KNN_MAX_CELLS):
        return _faiss_knn(faiss, X, k, random_state=random_state)[0]
    if n > EXACT_KNN_MAX_CELLS and k < n:
        pynndescent = _optional("pynndescent")
        if pynndescent is None:
            logger.info("neither faiss nor pynndescent installed: kd-tree kNN on %d cells (slow)", n)
        else:
            seed = int(random_state) if isinstance(random_state, (int, np.integer)) else None
            index = pynndescent.NNDescent(X, n_neighbors=k, random_state=seed, n_jobs=1)
            return index.neighbor_graph[0]
    # imported here: 0.1 s that runs with faiss never use
    from scipy.spatial import cKDTree

    _, idx = cKDTree(X).query(X, k=k, eps=eps)
    return idx.reshape(n, k)


def _faiss_knn(faiss, X: np.ndarray, k: int, *, random_state=1) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-NN of the rows of X among themselves: indices (n, k) int64, squared distances (n, k) float32.

    Exact (``IndexFlatL2``) up to ``EXACT_KNN_MAX_CELLS`` rows, else ``IndexIVFFlat`` trained on a seeded
    sample; float32 either way (H is float32; the ranking of float64 distances differs only at near-ties).
    """
    n, dims = X.shape
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    k = min(k, n)
    # Exact search: one OpenMP thread. Its many short parallel regions made 2 threads 2.4x slower in
    # wall time on a busy 2-core machine (Kang, 14k cells: 1.2 s vs 2.9 s); the IVF search is one long
    # region and gets every core this process may use.
    threads = 1
    if n <= EXACT_KNN_MAX_CELLS:
        index = faiss.IndexFlatL2(dims)
    else:
        threads = usable_cores()
        n_lists = max(1, n // IVF_CELLS_PER_LIST)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dims), dims, n_lists)
        seed = int(random_state) if isinstance(random_state, (int, np.integer)) else None
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, min(n, 40 * n_lists), replace=False))  # faiss's own cap is 256/list
        index.cp.seed = int(rng.integers(2**31))
        index.train(X32[sample])
        index.nprobe = IVF_PROBES
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        index.add(X32)
        dist, idx = index.search(X32, k)
    finally:
        faiss.omp_set_num_threads(previous)
    # A row whose probed lists hold fewer than k others gets -1: fall back to the row itself (harmless for
    # a vote or a graph: it only repeats the row's own label or weight).
    missing = idx < 0
    if missing.any():
        rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
        idx[missing] = rows[missing]
        dist[missing] = 0.0
    return idx.astype(np.int64, copy=False), np.maximum(dist, 0.0)


def snn_graph(neighbors: np.ndarray, prune: float = SNN_PRUNE, chunk: int = 20_000) -> sparse.csr_matrix:
    """Shared-nearest-neighbour graph with Jaccard weights, like Seurat/rliger ``ComputeSNN``.

    Weight(i, j) = s / (2k - s) with s = |N(i) & N(j)| (neighbour sets include the cell itself);
    weights < ``prune`` are dropped. Returns the strict upper triangle (n, n); rows are processed in
    chunks so the unpruned product never exists whole.
    """
    n, k = neighbors.shape
    A = sparse.csr_matrix((np.ones(n * k, dtype=np.float32), neighbors.ravel(), np.arange(0, n * k + 1, k)),
                          shape=(n, n))
    AT = A.T.tocsr()
    parts = []
    for start in range(0, n, chunk):
        S = (A[start:start + chunk] @ AT).tocoo()
        shared = S.data.astype(np.float64)
        w = shared / (2 * k - shared)
        keep = (w >= prune) & (S.col > S.row + start)
        parts.append(sparse.csr_matrix((w[keep], (S.row[keep], S.col[keep])), shape=S.shape))
    return sparse.vstack(parts, format="csr")


def _labels_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..m-1 by decreasing cluster size (ties: the cluster seen first)."""
    uniq, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64)


def leiden_membership(igraph, graph: sparse.spmatrix, *, resolution: float, n_iterations: int,
                      random_state=1) -> list[int]:
    """igraph's Leiden (modularity objective) on a weighted upper-triangular adjacency matrix.

    At most ``n_iterations`` iterations, fewer when one leaves the partition unchanged (negative: until then).
    igraph offers either a fixed count or until-stable, so the capped form runs one iteration per call from the
    previous membership: the same partition as igraph's own ``n_iterations`` loop (checked on Kang, 100k and
    200k cells), but it stops early on graphs that settle first.

    igraph draws from one process-wide generator, Python's ``random`` module by default (igraph offers no
    way to read the current one), so the call gets its own seeded ``random.Random`` and the default is put
    back afterwards: a seed reproduces the partition without touching the global ``random`` state.
    """
    coo = graph.tocoo()
    # One add_edges call, fed slice by slice: every add_edges call re-indexes all the graph's edges, so adding
    # slices one call each grew quadratically (36M edges on 1M nodes: 133 s in 9 calls, 34 s in one), and the
    # slices bound the Python ints alive at once (36M edges: RSS +1.9 GB against +2.5 GB for one int64 array).
    g = igraph.Graph(n=graph.shape[0], directed=False)
    g.add_edges(itertools.chain.from_iterable(
        zip(coo.row[start:start + LEIDEN_EDGE_SLICE].tolist(), coo.col[start:start + LEIDEN_EDGE_SLICE].tolist())
        for start in range(0, coo.nnz, LEIDEN_EDGE_SLICE)))
    # Weights go as an array: the same partition as a list, without a list of ~24M Python floats at 1M cells.
    weights = coo.data.astype(np.float64, copy=False)
    igraph.set_random_number_generator(random.Random(random_state))
    try:
        if n_iterations < 0:
            return g.community_leiden(objective_function="modularity", weights=weights, resolution=resolution,
                                      n_iterations=-1).membership
        membership, partition = None, None
        for _ in range(n_iterations):
            membership = g.community_leiden(objective_function="modularity", weights=weights, resolution=resolution,
                                            n_iterations=1, initial_membership=membership).membership
            same = _same_partition(partition, membership)
            partition = membership
            if same:
                break
    finally:
        igraph.set_random_number_generator(random)
    return list(membership) if membership is not None else list(range(graph.shape[0]))


def _same_partition(a, b) -> bool:
    """Whether two membership lists group the nodes the same way, whatever the cluster numbers."""
    if a is None:
        return False
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    pairs = np.unique(a * (int(b.max()) + 1) + b).size  # distinct (a, b) label pairs
    return pairs == np.unique(a).size == np.unique(b).size


def cluster_leiden(X, *, n_neighbors=20, resolution=1.0, random_state=1, n_iterations=5, eps=0.1):
    """Leiden clustering of cells on a Jaccard-weighted SNN graph, as rliger's ``runCluster``.

    kNN (``n_neighbors`` including the cell itself, :func:`knn_indices`) -> SNN with Jaccard weights pruned
    at 1/15 -> igraph's ``community_leiden`` with the modularity objective at ``resolution`` (the quality
    function of leidenalg's ``RBConfigurationVertexPartition``, which rliger uses; igraph's C
    implementation is 6-15x faster and reaches the same or higher modularity: benchmarks/README.md).
    Cells left alone in a cluster join the most common cluster among their kNN (rliger groups singletons
    too).

    Parameters
    ----------
    X : array-like of shape (n_cells, n_dims)
        Usually ``H_norm`` from :func:`quantile_norm`.
    n_neighbors : int
    resolution : float
        Resolution of the modularity (RB configuration) model (higher -> more clusters).
    random_state : int or None
        Seed of igraph's random number generator for this call (and of the kNN index on large inputs).
    n_iterations : int
        At most this many Leiden iterations (rliger's ``runCluster`` default, 5), fewer when one leaves the
        partition unchanged; negative: until then, however many it takes. Until-stable gave the same clusters on
        CellBench and baron (100 seeds) and modularity higher by 0.0003 on Kang and at 200k cells, but took 2.5x as
        long at 200k and 3-4x at 100k synthetic cells (benchmarks/README.md, "Leiden iterations").
    eps : float
        Error bound of the kd-tree neighbour search when faiss is absent (rliger: 0.1; 0 = exact).

    Returns
    -------
    ndarray of shape (n_cells,), int64: labels 0..m-1, 0 the largest cluster.
    """
    X = check_matrix(X)
    n_neighbors = check_int(n_neighbors, "n_neighbors", 2)
    if not resolution > 0:
        msg = f"resolution: expected a number > 0, found {resolution!r}"
        raise InputError(msg)
    (igraph,) = require_extra("cluster", "clustering", ("igraph",))
    n = X.shape[0]
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    k = min(n_neighbors, n)
    nn = knn_indices(X, k, eps=eps, random_state=random_state)
    membership = leiden_membership(igraph, snn_graph(nn), resolution=float(resolution),
                                   n_iterations=int(n_iterations), random_state=random_state)
    labels = np.asarray(membership, dtype=np.int64)
    sizes = np.bincount(labels)
    single = sizes[labels] == 1
    if single.any() and not single.all():
        m = int(labels.max()) + 1
        votes = np.where(single[nn], m, labels[nn])[single]  # singletons (itself included) get no vote
        rows = np.arange(votes.shape[0])[:, None] * (m + 1)
        counts = np.bincount((rows + votes).ravel(), minlength=votes.shape[0] * (m + 1))
        counts = counts.reshape(votes.shape[0], m + 1)[:, :m]
        has_vote = counts.max(axis=1) > 0
        idx = np.flatnonzero(single)[has_vote]
        labels[idx] = counts[has_vote].argmax(axis=1)
    labels = _labels_by_size(labels)
    logger.info("cluster_leiden: %d cells, %d clusters (resolution %g)", n, labels.max() + 1, resolution)
    return labels


def cosine_knn(X: np.ndarray, k: int, *, random_state=1) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows in cosine distance (itself included): indices (n, k) int64, distances (n, k) float32.

    On unit vectors the cosine distance 1 - cos is half the squared Euclidean distance, so a Euclidean
    search on the unit rows finds the cosine neighbours: exact with scipy's kd-tree, or with faiss when
    installed (float32; an inverted-file index above ``EXACT_KNN_MAX_CELLS`` rows, see
    :func:`knn_indices`). All-zero rows stay at the origin (cosine distance 0.5 to every other row).
    """
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    unit = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    faiss = _optional("faiss")
    if faiss is not None:
        idx, sq = _faiss_knn(faiss, unit, k, random_state=random_state)
        return idx, (sq / 2).astype(np.float32)
    # imported here: 0.1 s that runs with faiss never use
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(unit).query(unit, k=k)
    dist, idx = dist.reshape(X.shape[0], k), idx.reshape(X.shape[0], k)
    return idx.astype(np.int64), (dist * dist / 2).astype(np.float32)


def _seed(random_state) -> int:
    """A non-negative int seed from ``random_state`` (int, Generator or None)."""
    if isinstance(random_state, (int, np.integer)):
        return int(random_state) % 2**63
    return int(np.random.default_rng(random_state).integers(2**63))


def run_umap(X, *, n_neighbors=20, min_dist=0.1, metric="cosine", random_state=42):
    """2-D UMAP embedding (rliger ``runUMAP`` defaults: cosine, 20 neighbours including the cell, min_dist 0.1).

    With scranpy installed (the 'umap' extra on Linux x86-64 and macOS arm64) the layout is umappp's
    compiled C++ UMAP: no numba compilation, ~1 s import, the epochs of umap-learn and uwot
    (:func:`umap_epochs`) and the same or better 15-NN preservation. Otherwise umap-learn.
    The layout starts from the spectral embedding up to ``SPECTRAL_INIT_MAX_CELLS`` cells and from PCA
    (:func:`pca_coordinates`) above, where the spectral start would take longer than the layout.
    Neighbours are exact cosine neighbours from :func:`cosine_knn` (an inverted-file index above
    ``EXACT_KNN_MAX_CELLS`` cells with faiss).

    Parameters
    ----------
    X : array-like of shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell including itself (umap-learn's convention), capped at n_cells - 1.
    min_dist : float
    metric : str
        "cosine" or "euclidean" with scranpy; any umap-learn metric otherwise.
    random_state : int, numpy.random.Generator or None
        Seeds the layout (and umap-learn's single-threaded run); None draws a seed.

    Returns
    -------
    ndarray of shape (n_cells, 2), float32
    """
    X = check_matrix(X)
    n_neighbors = check_int(n_neighbors, "n_neighbors", 2)
    if X.shape[0] < 4:
        msg = f"X: expected at least 4 cells for UMAP, found {X.shape[0]}"
        raise InputError(msg)
    first, inverse = distinct_rows(X)
    if first.size < X.shape[0] and first.size >= 4:
        # Identical rows get identical places: embed each distinct row once. Duplicates make UMAP's graph
        # degenerate (every edge at distance 0, weight 1, sampled every epoch): 100k cells drawn with
        # replacement from Kang's 14k took 3x as long per epoch as 100k distinct ones.
        logger.info("run_umap: %d distinct rows among %d cells; each embedded once", first.size, X.shape[0])
        return run_umap(X[first], n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                        random_state=random_state)[inverse]
    k = min(n_neighbors, X.shape[0] - 1)
    if metric in ("cosine", "euclidean") and _optional("scranpy") is not None:
        return _umap_umappp(X, k, min_dist=min_dist, metric=metric, seed=_seed(random_state))
    return _umap_learn(X, k, min_dist=min_dist, metric=metric, random_state=random_state)


def distinct_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: the index of each distinct row's first occurrence, in file order, and for every row
    the position of its distinct row in ``first`` (``X[first][inverse]`` equals X). Rows are compared by their
    bytes (a 1M x 20 float32 matrix: one sort of 80-byte keys)."""
    rows = np.ascontiguousarray(X)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # np.unique sorts by bytes; keep file order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.ravel()]


def umap_epochs(n_cells: int) -> int:
    """uwot's and umap-learn's rule: 500 epochs up to 10,000 cells, else 200.

    umappp's own rule gives more to mid-sized data (Kang, 14k cells: 414 epochs, 11 CPU s against 6 s) for
    a 15-NN preservation of 0.254 against 0.245; umap-learn's 200 epochs gave 0.239.
    """
    return 500 if n_cells <= 10_000 else 200


def _umap_umappp(X: np.ndarray, k: int, *, min_dist: float, metric: str, seed: int) -> np.ndarray:
    import knncolle
    import scranpy

    if metric == "cosine":
        idx, dist = cosine_knn(X, k, random_state=seed)
    else:
        idx = knn_indices(X, k, random_state=seed)
        dist = np.linalg.norm(X[idx] - X[:, None, :], axis=2)
    # knncolle's results exclude the cell itself; near-duplicate rows may rank another cell first.
    others = idx != np.arange(X.shape[0])[:, None]
    first_other = np.argsort(~others, axis=1, kind="stable")[:, : k - 1]
    idx = np.take_along_axis(idx, first_other, axis=1).astype(np.int32)
    dist = np.take_along_axis(dist, first_other, axis=1).astype(np.float64)
    init: dict = {}
    if X.shape[0] > SPECTRAL_INIT_MAX_CELLS:
        init = {"initialize_method": "none", "initial_coordinates": pca_coordinates(X)}
    coords = scranpy.run_umap(knncolle.FindKnnResults(np.ascontiguousarray(idx), np.ascontiguousarray(dist)),
                              min_dist=float(min_dist), num_epochs=umap_epochs(X.shape[0]),
                              initialize_seed=seed, optimize_seed=seed, **init)
    return np.asarray(coords, dtype=np.float32)


def pca_coordinates(X: np.ndarray, n_dims: int = 2, scale: float = 10.0) -> np.ndarray:
    """The first ``n_dims`` principal components of the rows of X, scaled so that the largest |value| is ``scale``.

    UMAP's start for data too large for a spectral start (uwot's ``init="pca"``; Kobak & Linderman 2021 show
    a PCA start keeps the global structure as well as a spectral one). ``scale`` is umappp's spectral scale.
    Signs are fixed (largest |loading| positive) so the start does not depend on the LAPACK build.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    cov = (X - mean).T @ (X - mean)  # dims x dims: cheap for factor matrices, no n x dims copy is kept
    _, vectors = np.linalg.eigh(cov)
    axes = vectors[:, ::-1][:, :n_dims]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(n_dims)])
    coords = (X - mean) @ axes
    peak = np.abs(coords).max()
    return np.ascontiguousarray(coords * (scale / peak) if peak > 0 else coords)


def _umap_learn(X: np.ndarray, k: int, *, min_dist: float, metric: str, random_state) -> np.ndarray:
    (umap,) = require_extra("umap", "UMAP", ("umap",))
    options = {"n_neighbors": k, "min_dist": min_dist, "metric": metric, "n_components": 2,
               "random_state": random_state, "n_jobs": 1}
    big = X.shape[0] > EXACT_KNN_MAX_CELLS and _optional("faiss") is None
    if metric == "cosine" and not big and "precomputed_knn" in inspect.signature(umap.UMAP).parameters:
        # Exact cosine neighbours spare umap-learn its pynndescent search and that search's numba
        # compilation: Kang, 14k cells, 2-core machine: 12 s instead of 33 s.
        options["precomputed_knn"] = (*cosine_knn(X, k), None)
    model = umap.UMAP(**options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*precomputed_knn.*", category=UserWarning)
        coords = model.fit_transform(X)
    return np.asarray(coords, dtype=np.float32)
