"""Scenarios 1, 2 and 3 end to end: paths in, result and model files out.

Composition only: readers open the data, ``preprocess`` prepares it, ``OnlineINMF`` learns, ``postprocess``
aligns and clusters, ``_results`` writes. Progress goes to a progress-bar factory (tqdm bars on stderr from
the CLI, nothing from the library by default).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ._cores import usable_cores
from ._errors import InputError
from ._files import atomic_output, check_output_path, remove_stale_temporaries
from ._prepared import build_caches
from ._progress import NullProgress
from ._reference import ReferenceCells, input_labels, read_reference
from ._results import ResultsTable, write_results
from ._umap_process import UMAPProcess, UMAPProcessError
from .engine import OnlineINMF
from .model_io import Checkpoint, load_model, read_checkpoint, save_model
from .preprocess import prepare
from .readers import H5adSource, open_sources, set_read_threads

logger = logging.getLogger(__name__)

#: Block size of the final H pass and of preprocessing passes (cells).
BLOCK_SIZE = 20000


@dataclass(frozen=True)
class ModelParams:
    """Parameters of the model that :func:`fit` learns (defaults reproduce rliger's online iNMF).

    Attributes
    ----------
    k : int
        Number of factors K.
    lam : float
        Regularisation of the dataset-specific factors V_i (lambda).
    epochs : int
        Passes over the data.
    batch_size : int
        Cells per mini-batch, all datasets together.
    seed : int
        Seed of the initialisation and the mini-batch order (also post-processing's, unless
        ``OutputOptions.seed`` is set).
    threads : int or None
        Threads for the factorization and H passes (None: every core this process may use).
    """

    k: int = 20
    lam: float = 5.0
    epochs: int = 5
    batch_size: int = 5000
    seed: int = 1
    threads: int | None = None


@dataclass(frozen=True)
class InputOptions:
    """How the input files are read and split into datasets (every scenario).

    Attributes
    ----------
    batch_key : str or None
        obs column naming each cell's dataset (one ``.h5ad`` input); None: each file is one dataset.
    layer : str or None
        Read counts from ``layers[layer]`` instead of ``X``.
    use_raw : bool
        Read counts from ``raw/X``.
    genome : str or None
        Genome to read from a multi-genome 10x ``.h5``.
    """

    batch_key: str | None = None
    layer: str | None = None
    use_raw: bool = False
    genome: str | None = None


@dataclass(frozen=True)
class GeneSelection:
    """How :func:`fit` selects genes (``update`` and ``project`` use the model's genes).

    Attributes
    ----------
    n_genes : int or None
        Select this many variable genes; None: rliger's variance threshold ``var_thresh``.
    var_thresh, alpha : float
        rliger's ``selectGenes`` threshold and significance.
    combine : {"union", "intersection"}
        How the per-dataset gene sets combine.
    unshared : tuple of str
        UINMF: datasets that also keep their variable genes the others lack (not in their file or without counts
        there), learned as unshared factors U_i (rliger's ``useUnsharedDatasets``).
    unshared_thresh : float
        Variance threshold of those genes (rliger's ``unsharedThresh``).
    """

    n_genes: int | None = None
    var_thresh: float = 0.1
    alpha: float = 0.99
    combine: str = "union"
    unshared: tuple[str, ...] = ()
    unshared_thresh: float = 0.1


@dataclass(frozen=True)
class OutputOptions:
    """Post-processing of H and the optional outputs (every scenario).

    Attributes
    ----------
    cluster : bool
        Leiden clustering of the quantile-normalised H (``cluster`` extra).
    umap : bool
        UMAP of the quantile-normalised H (``umap`` extra).
    resolution : float
        Leiden resolution.
    seed : int or None
        Seed of quantile normalisation, Leiden and UMAP; None: the model's seed.
    plots : path or None
        Folder for PNG plots (UMAP by dataset and by cluster, objective per epoch).
    copy_x : bool
        Copy the input counts into the results file (single ``.h5ad`` input).
    """

    cluster: bool = True
    umap: bool = True
    resolution: float = 1.0
    seed: int | None = None
    plots: Path | None = None
    copy_x: bool = False


@dataclass
class RunSummary:
    """What a pipeline did, for the CLI's closing lines and for ``uns['inmf']``."""

    scenario: str
    n_cells: int
    datasets: dict[str, int]
    n_genes: int
    seconds: float
    objective: float | None = None
    outputs: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


#: Makes progress bars: ``progress(total=, desc=, unit=)`` -> a context manager with tqdm's ``update(n)``,
#: ``set_postfix(**fields)`` and ``refresh()`` (the step name and the epoch go in the postfix).
ProgressFactory = Callable[..., Any]
PathLike = str | os.PathLike


def _cache_mode(option: str | None, n_cells: int) -> str | None:
    # Epochs re-read the data: keep the prepared matrix in memory when it is small, on disk otherwise.
    if option != "auto":
        return option
    return "memory" if n_cells <= 200_000 else "disk"


def _open(inputs: list[Path], reading: InputOptions) -> list:
    return open_sources([str(p) for p in inputs], batch_key=reading.batch_key, layer=reading.layer,
                        use_raw=reading.use_raw, genome=reading.genome)


@contextlib.contextmanager
def _prepared_inputs(inputs, reading: InputOptions, outputs: OutputOptions, progress, *, k=None, genes=None,
                     cache=None, check=None, client=None, **select):
    """Open the inputs, run ``check(sources)``, prepare them (one streamed pass, on the Dask cluster of ``client``
    if given, then the cache pass) and yield ``(sources, prepared)``; every file and cache is closed on the way out,
    on errors too."""
    sources = _open(inputs, reading)
    prepared = None
    try:
        _check_copy_x(outputs, inputs, sources)
        if check is not None:
            check(sources)
        n_total = sum(s.n_cells for s in sources)
        with progress(total=n_total, desc="preprocess", unit="cells") as bar:
            prepared = prepare(sources, genes=genes, block_size=BLOCK_SIZE, progress=bar.update,
                               cache=_cache_mode(cache, n_total), stats_pass=_dask_stats_pass(client), **select)
        if k is not None and genes is None and k > len(prepared.genes):
            msg = (f"--k {k}: expected at most the number of genes used ({len(prepared.genes)}); "
                   "lower --k or select more genes (--n-genes, --var-thresh)")
            raise InputError(msg)
        _build_caches(prepared, progress)
        yield sources, prepared
    finally:
        for s in [*(prepared.sources if prepared is not None else []), *sources]:
            s.close()


def _dask_stats_pass(client):
    if client is None:
        return None
    from ._dask import stats_pass

    return functools.partial(stats_pass, client)


def _finish(scenario, est, inputs, sources, prepared, reading: InputOptions, outputs: OutputOptions, progress, *,
            output, model, model_kwargs, timings, params: dict, project=False, client=None,
            reference_labels=None, mapping=None, umap_process=None) -> RunSummary:
    """Final H (with the objective), then model and results: the model is renamed into place only after the
    results are written, so a run leaves all its outputs or none.

    ``reference_labels`` (fit): ``(label_key or None, labels)``, kept in the model with the reference quantiles.
    ``mapping`` (project with a reference): ``(ReferenceQuantiles, ReferenceCells)``."""
    H, objective, timings["final_h_s"] = _final_h(est, prepared.sources, progress, project=project, client=client)
    summary = RunSummary(scenario, sum(s.n_cells for s in sources), {s.name: s.n_cells for s in sources},
                         len(prepared.genes), 0.0, objective, timings=timings)
    outputs = _with_seed(outputs, est)
    known_clusters = None
    if reference_labels is not None and model is not None:
        record, known_clusters = _mapping_record(H, prepared.sources, outputs.seed, *reference_labels)
        model_kwargs = {**model_kwargs, "mapping": record}
    with _pending(model) as model_tmp:
        if model is not None:
            save_model(model_tmp, est, **model_kwargs)
            summary.outputs.append(str(model))
        if output is not None or outputs.plots is not None:
            table = ResultsTable.from_sources(inputs, sources, reading.batch_key)
            _postprocess_and_write(table, H, est, prepared.genes, outputs, output, summary,
                                   params={**params, **_option_params(outputs)}, mapping=mapping,
                                   known_clusters=known_clusters, progress=progress, umap_process=umap_process)
    return summary


def _mapping_record(H_blocks, sources, seed, label_key, labels):
    """What the model keeps for ``project(reference=)``: the quantiles of the largest dataset (quantile_norm's
    reference) per cluster and factor, and the label column named at fit; and that dataset's clusters, which
    quantile normalisation reuses (its kNN search is the costly part: ~8 s for 500k cells)."""
    from .mapping import MappingRecord, reference_quantiles
    from .postprocess import refined_labels

    sizes = [s.n_cells for s in sources]
    ref = int(np.argmax(sizes))
    clusters = refined_labels(H_blocks[ref], random_state=seed)
    names = np.full(sizes[ref], sources[ref].name, dtype=object)
    record = MappingRecord(reference_quantiles(H_blocks[ref], names, random_state=seed, labels=clusters),
                           label_key=label_key, labels=tuple(labels))
    return record, {sources[ref].name: clusters}


def fit(
    inputs: Sequence[PathLike],
    *,
    output: PathLike | None = None,
    model: PathLike | None = None,
    params: ModelParams | None = None,
    reading: InputOptions | None = None,
    selection: GeneSelection | None = None,
    outputs: OutputOptions | None = None,
    checkpoint: PathLike | None = None,
    checkpoint_every: int = 20,
    resume: bool = False,
    cache: str | None = "auto",
    progress: ProgressFactory = NullProgress,
    client: Any = None,
    label_key: str | None = None,
) -> RunSummary:
    """Scenario 1: learn W, V_i from fixed datasets streamed from disk; write results and model.

    Parameters
    ----------
    inputs : sequence of path
        ``.h5ad`` or 10x ``.h5`` files; several files are several datasets, one ``.h5ad`` with
        ``reading.batch_key`` is one dataset per category.
    output : path or None
        Results ``.h5ad`` (H, normalised H, clusters, UMAP, W, parameters; see docs/outputs.md).
    model : path or None
        Model ``.h5`` for ``update`` and ``project``.
    params : ModelParams, optional
        The model's parameters (K, lambda, epochs, mini-batch size, seed, threads).
    reading : InputOptions, optional
        How the inputs are read and split into datasets.
    selection : GeneSelection, optional
        How variable genes are selected.
    outputs : OutputOptions, optional
        Clustering, UMAP, plots, counts copy; their seed defaults to ``params.seed``.
    checkpoint : path or None
        Save the fit state here every ``checkpoint_every`` mini-batches; removed when the fit succeeds.
    checkpoint_every : int
    resume : bool
        Continue from ``checkpoint`` if it exists (same parameters required).
    cache : {"auto", "memory", "disk"} or None
        Where the prepared data is kept between epochs; "auto": memory up to 200,000 cells.
    progress : callable
        Progress-bar factory, ``progress(total=, desc=, unit=)`` -> context manager with ``update(n)``,
        ``set_postfix(**fields)`` and ``refresh()`` (tqdm's names; ``_progress.tqdm_progress`` for the CLI).
    client : dask.distributed.Client or None
        Run the mini-batch steps on this Dask cluster (its workers read the inputs, which must be at the same
        paths for them); the model and H equal the local ones. The statistics pass, the mini-batch steps and the
        final H pass run on the cluster; gene selection runs here, with no prepared-data cache (the workers read
        the files).

    label_key : str or None
        obs column of cell labels, checked before any work and recorded in the model (which always keeps the
        reference quantiles) as the default label column of ``project(..., reference=)``.
    Returns
    -------
    RunSummary
    """
    params = params or ModelParams()
    reading = reading or InputOptions()
    selection = selection or GeneSelection()
    outputs = outputs or OutputOptions()
    inputs = [Path(p) for p in inputs]
    _check_outputs(inputs, {"output": output, "model output": model, "checkpoint": checkpoint})
    _check_plots(outputs)
    labels = input_labels(inputs, label_key) if label_key is not None else ()
    if resume and checkpoint is None:
        msg = "resume: expected a checkpoint path to continue from, found none (--checkpoint PATH)"
        raise InputError(msg)
    resume_from, genes, unshared_genes = None, None, None
    if resume and checkpoint is not None and Path(checkpoint).exists():
        # A resumed fit keeps the checkpoint's genes, so it continues exactly the same problem.
        resume_from = Path(checkpoint)
        genes = _checkpoint_genes(resume_from, params)
        unshared_genes = _checkpoint_unshared(resume_from)
    elif resume:
        logger.info("no checkpoint at %s yet: starting from the beginning", checkpoint)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with threadpool_limits(limits=params.threads), set_read_threads(params.threads), \
            umap_helper(outputs, params.threads, writes=output is not None or outputs.plots is not None) as umap_process:
        select = {"thresh": selection.var_thresh, "alpha": selection.alpha, "n_genes": selection.n_genes,
                  "combine": selection.combine, "unshared_thresh": selection.unshared_thresh,
                  "unshared": list(selection.unshared) if unshared_genes is None else unshared_genes}
        with _prepared_inputs(inputs, reading, outputs, progress, k=params.k, genes=genes,
                              cache=cache if client is None else None, client=client,
                              check=lambda sources: _check_cells_for_k(sources, params.k), **select) as (sources, prepared):
            timings["preprocess_s"] = time.perf_counter() - t0
            est = OnlineINMF(n_components=params.k, lam=params.lam, batch_size=params.batch_size,
                             max_epochs=params.epochs, random_state=params.seed, n_threads=params.threads)
            saver = Checkpoint(checkpoint, every=checkpoint_every) if checkpoint is not None else None
            position = None
            if resume_from is not None:  # the checkpoint's estimator, and where its plan stopped
                est, position = read_checkpoint(resume_from)
                est.set_params(n_threads=params.threads)
            t = time.perf_counter()
            with progress(total=None, desc="factorize", unit="batch") as bar:
                est.fit(prepared.sources, progress=_step_progress(bar), callback=saver, resume=position,
                        unshared={name: g.size for name, g in prepared.unshared.items()}, client=client)
            timings["factorize_s"] = time.perf_counter() - t
            summary = _finish("fit", est, inputs, sources, prepared, reading, outputs, progress, output=output,
                              model=model, timings=timings, client=client,
                              model_kwargs={"scaling": prepared.scales, "info": _model_info(selection, reading, inputs)},
                              params={**_estimator_params(est), **_option_params(params, reading, selection)},
                              reference_labels=(label_key, labels), umap_process=umap_process)
    if checkpoint is not None and Path(checkpoint).exists():
        # A finished run needs no checkpoint: the model file holds the result.
        Path(checkpoint).unlink()
    summary.seconds = time.perf_counter() - t0
    return summary


def update(
    model: PathLike,
    inputs: Sequence[PathLike],
    *,
    output: PathLike | None = None,
    model_out: PathLike | None = None,
    epochs: int | None = None,
    threads: int | None = None,
    reading: InputOptions | None = None,
    outputs: OutputOptions | None = None,
    cache: str | None = "auto",
    progress: ProgressFactory = NullProgress,
    client: Any = None,
) -> RunSummary:
    """Scenario 2: learn from new datasets with a saved model, without reading the old data.

    W keeps learning; the saved datasets' V, A, B are frozen but still shape W. New datasets are normalised and
    scaled on the model's genes. H is computed for the new cells only (the old data may be gone).

    Parameters
    ----------
    model : path
        Model file written by :func:`fit` or :func:`update` (never overwritten).
    inputs : sequence of path
        New datasets, as for :func:`fit`; their names must differ from the model's datasets.
    output, model_out : path or None
        Results ``.h5ad`` of the new cells; the updated model.
    epochs : int or None
        Passes over the new data; None: the model's ``max_epochs``.
    threads : int or None
        Threads for the factorization and H passes (None: every core this process may use).
    reading, outputs, cache, progress, client
        As for :func:`fit`; the seed of ``outputs`` defaults to the model's.

    Returns
    -------
    RunSummary
    """
    reading = reading or InputOptions()
    outputs = outputs or OutputOptions()
    inputs = [Path(p) for p in inputs]
    model = Path(model)
    _check_outputs([*inputs, model], {"output": output, "model output": model_out})
    _check_plots(outputs)
    t0 = time.perf_counter()
    saved = load_model(model)
    est = saved.estimator.set_params(n_threads=threads)  # this machine's cores, not the saving one's

    def check(sources):
        clash = sorted({s.name for s in sources} & set(est.dataset_names_))
        if clash:
            msg = f"{inputs[0]}: dataset name(s) {clash} already exist in model {model}; rename the files or categories"
            raise InputError(msg)

    timings: dict[str, float] = {}
    with threadpool_limits(limits=threads), set_read_threads(threads), \
            umap_helper(outputs, threads, writes=output is not None or outputs.plots is not None) as umap_process, \
            _prepared_inputs(
        inputs, reading, outputs, progress, genes=np.asarray(est.var_names_in_),
        cache=cache if client is None else None, check=check, client=client
    ) as (sources, prepared):
        if epochs is not None:
            est.set_params(max_epochs=epochs)
        t = time.perf_counter()
        with progress(total=None, desc="update", unit="batch") as bar:
            est.update(prepared.sources, progress=_step_progress(bar), client=client)
        timings["factorize_s"] = time.perf_counter() - t
        summary = _finish("update", est, inputs, sources, prepared, reading, outputs, progress, output=output,
                          model=model_out, timings=timings, client=client,
                          model_kwargs={"scaling": {**(saved.scaling or {}), **prepared.scales}, "info": saved.info},
                          params={**_estimator_params(est), "threads": threads, **_option_params(reading)},
                          umap_process=umap_process)
    summary.seconds = time.perf_counter() - t0
    return summary


def project(
    model: PathLike,
    inputs: Sequence[PathLike],
    *,
    output: PathLike | None = None,
    threads: int | None = None,
    reading: InputOptions | None = None,
    outputs: OutputOptions | None = None,
    progress: ProgressFactory = NullProgress,
    client: Any = None,
    reference: PathLike | None = None,
    label_key: str | None = None,
) -> RunSummary:
    """Scenario 3: H of new cells on the learned W (V = 0); the model is not changed.

    With ``reference`` (the results ``.h5ad`` the model's fit wrote), the cells are also mapped onto it:
    ``obsm['X_inmf_norm']`` is H aligned with the model's reference quantiles, and ``obs['inmf_label']``,
    ``['inmf_label_confidence']`` and ``['inmf_mapping_distance']`` come from a 20-neighbour vote among the
    reference's labelled cells (:mod:`onlinemf.mapping`). The reference file is only read.

    Parameters
    ----------
    model : path
        Model file written by :func:`fit` or :func:`update`.
    inputs : sequence of path
        Cells to project, with every gene of the model.
    output : path or None
        Results ``.h5ad``.
    threads : int or None
        Threads for the factorization and H passes (None: every core this process may use).
    reading, outputs, progress, client
        As for :func:`fit`; the seed of ``outputs`` defaults to the model's.

    reference : path or None
        Results ``.h5ad`` of the fit that wrote ``model``, with labelled cells.
    label_key : str or None
        obs column of the reference's labels; default the one ``fit(label_key=)`` recorded in the model.
    Returns
    -------
    RunSummary
    """
    reading = reading or InputOptions()
    outputs = outputs or OutputOptions()
    inputs = [Path(p) for p in inputs]
    _check_outputs([*inputs, Path(model), *([Path(reference)] if reference is not None else [])], {"output": output})
    _check_plots(outputs)
    t0 = time.perf_counter()
    saved = load_model(model)
    est = saved.estimator.set_params(n_threads=threads)
    mapping = _mapping_inputs(saved, model, reference, label_key)  # every check before any work
    with threadpool_limits(limits=threads), set_read_threads(threads), \
            umap_helper(outputs, threads, writes=output is not None or outputs.plots is not None) as umap_process, \
            _prepared_inputs(
        inputs, reading, outputs, progress, genes=np.asarray(est.var_names_in_), client=client
    ) as (sources, prepared):
        summary = _finish("project", est, inputs, sources, prepared, reading, outputs, progress, output=output,
                          model=None, model_kwargs={}, timings={}, project=True, client=client,
                          params={**_estimator_params(est), "threads": threads, **_option_params(reading)},
                          mapping=mapping, umap_process=umap_process)
    summary.seconds = time.perf_counter() - t0
    return summary


def _mapping_inputs(saved, model, reference, label_key):
    """``(reference quantiles, reference cells)`` for ``project(reference=)``, or None; every bad input said here."""
    if reference is None:
        if label_key is not None:
            msg = f"--label-key {label_key}: labels come from a reference; give --reference RESULTS.h5ad too"
            raise InputError(msg)
        return None
    if saved.mapping is None:
        msg = (f"--reference: model {model} has no reference quantiles (written by onlinemf update, whose W no longer "
               "matches its reference, or before reference mapping existed); re-run onlinemf fit on the reference")
        raise InputError(msg)
    key = label_key if label_key is not None else saved.mapping.label_key
    if key is None:
        msg = f"--reference {reference}: expected --label-key COLUMN (model {model} records none: fit ran without --label-key)"
        raise InputError(msg)
    est = saved.estimator
    cells = read_reference(reference, label_key=key, W=est.W_, genes=np.asarray(est.var_names_in_))
    return saved.mapping.quantiles, cells


def _check_plots(outputs: OutputOptions) -> None:
    if outputs.plots is not None and Path(outputs.plots).exists() and not Path(outputs.plots).is_dir():
        msg = f"--plots {outputs.plots}: expected a folder, found a file"
        raise InputError(msg)


def _check_outputs(inputs, outputs: dict) -> None:
    """Check every output path before any work (none may be an input or another output), and remove the
    temporaries a killed earlier run left beside them."""
    taken = list(inputs)
    for what, path in outputs.items():
        if path is not None:
            check_output_path(path, inputs=taken, what=what)
            taken.append(Path(path))
    for path in outputs.values():
        if path is not None:
            remove_stale_temporaries(path)


@contextlib.contextmanager
def _pending(path):
    """A temporary path renamed to ``path`` when the block succeeds (None: nothing to write)."""
    if path is None:
        yield None
        return
    with atomic_output(path) as tmp:
        yield tmp


def _check_copy_x(outputs: OutputOptions, inputs, sources) -> None:
    # Checked before the work, not when writing: a late failure would waste the run.
    if outputs.copy_x and (len(inputs) != 1 or not isinstance(sources[0], H5adSource)):
        msg = "--copy-x: counts can be copied only from a single .h5ad input; found several inputs or a 10x file"
        raise InputError(msg)


def _check_cells_for_k(sources, k: int) -> None:
    # V_i starts from k cells of each dataset, and gene selection needs a variance (2 cells).
    need = max(int(k), 2)
    for s in sources:
        if s.n_cells < need:
            msg = f"{s.name}: expected at least {need} cells to learn k={k} factors, found {s.n_cells}; lower --k or add cells"
            raise InputError(msg)


def _checkpoint_genes(path, params: ModelParams) -> np.ndarray:
    """The genes of checkpoint ``path``, after checking it was written by a fit with the same parameters."""
    est = load_model(path).estimator
    wanted = {"n_components": ("--k", params.k), "lam": ("--lambda", params.lam),
              "batch_size": ("--batch-size", params.batch_size), "max_epochs": ("--epochs", params.epochs),
              "random_state": ("--seed", params.seed)}
    differ = [f"{flag} {getattr(est, name)} (this run: {value})" for name, (flag, value) in wanted.items()
              if getattr(est, name) != value]
    if differ:
        msg = f"--resume: checkpoint {path} was written with {', '.join(differ)}; use the same options or delete the checkpoint"
        raise InputError(msg)
    return np.asarray(est.var_names_in_)


def _build_caches(prepared, progress):
    """Fill the prepared-data caches in one visible pass (epochs then read the cache)."""
    todo = [s for s in prepared.sources if getattr(s, "cache_mode", None) and not s.cached]
    if not todo:
        return
    with progress(total=sum(s.n_cells for s in todo), desc="cache", unit="cells") as bar:
        build_caches(todo, block_size=BLOCK_SIZE, progress=bar.update)


def _step_progress(bar):
    def update(step, n_steps, epoch):
        if bar.total != n_steps:
            bar.total = n_steps
        bar.n = step
        bar.set_postfix(epoch=epoch, refresh=False)
        bar.refresh()

    return update


def _final_h(est, prepared_sources, progress, *, project=False, client=None):
    """H for every cell, streamed per block (on the Dask cluster of ``client`` if given: same numbers); the exact
    objective is accumulated in the same pass."""
    t = time.perf_counter()
    blocks, objective = [], 0.0
    n_total = sum(s.n_cells for s in prepared_sources)
    with progress(total=n_total, desc="project" if project else "final H", unit="cells") as bar:
        for src in prepared_sources:
            dataset = None if project else src.name
            if client is None:
                H, obj = est.transform_source(src, dataset=dataset, block_size=BLOCK_SIZE, with_objective=not project)
            else:
                from ._dask import transform_source

                H, obj = transform_source(est, src, client, dataset=dataset, block_size=BLOCK_SIZE,
                                          with_objective=not project)
            bar.update(src.n_cells)
            blocks.append(H)
            if obj is not None:
                objective += obj
    return blocks, (None if project else objective), time.perf_counter() - t


def _with_seed(outputs: OutputOptions, est) -> OutputOptions:
    """``outputs`` with its post-processing seed resolved: the model's seed unless one was given."""
    if outputs.seed is not None:
        return outputs
    seed = int(est.random_state) if isinstance(est.random_state, int | np.integer) else None
    return replace(outputs, seed=seed)


def align_cluster_embed(
    H: np.ndarray, datasets: np.ndarray, outputs: OutputOptions, timings: dict[str, float], *, reference=None,
    known_clusters=None, progress: ProgressFactory = NullProgress, umap_process: UMAPProcess | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Quantile-normalise H across datasets, then cluster and embed (each optional).

    Parameters
    ----------
    H : ndarray of shape (n_cells, K)
    datasets : ndarray of shape (n_cells,)
        Dataset of each cell.
    outputs : OutputOptions
        ``cluster``, ``umap``, ``resolution`` and ``seed`` (used by all three steps; None: not reproducible).
    timings : dict
        Gets the seconds of each step.
    reference : ReferenceQuantiles or None
        Align each dataset onto these (``mapping.align_to_reference``) instead of normalising the datasets
        among themselves.
    known_clusters : dict or None
        Dataset name -> its quantile-normalisation clusters computed before (``postprocess.quantile_norm``'s
        ``labels``).
    progress : callable
        Progress-bar factory: one step per phase (minutes each at a million cells).
    umap_process : UMAPProcess or None
        A started helper process (:func:`umap_helper`): with clustering on, UMAP runs there, beside Leiden.
        ``timings['umap_s']`` is then the helper's seconds and ``timings['umap_wait_s']`` the time spent
        waiting for it after Leiden.
    while_waiting : callable or None
        Called after Leiden, while the helper still computes UMAP (the caller's other work, e.g. reading obs).

    Returns
    -------
    ``(H_norm, clusters or None, umap or None)`` of shapes (n_cells, K), (n_cells,), (n_cells, 2).
    """
    from . import postprocess

    steps = 1 + bool(outputs.cluster) + bool(outputs.umap)
    with progress(total=steps, desc="post-process", unit="step") as bar:
        bar.set_postfix(step="quantile norm")
        t = time.perf_counter()
        if reference is None:
            H_norm, _ = postprocess.quantile_norm(H, datasets, random_state=outputs.seed, labels=known_clusters)
        else:
            from .mapping import align_to_reference

            H_norm, _ = align_to_reference(H, reference, datasets=datasets, random_state=outputs.seed)
        timings["quantile_norm_s"] = time.perf_counter() - t
        bar.update(1)
        clusters = umap = None
        helper = umap_process if outputs.umap and outputs.cluster else None
        if helper is not None:
            helper.submit(H_norm, random_state=None if outputs.seed is None else int(outputs.seed))
        if outputs.cluster:
            bar.set_postfix(step="Leiden" if helper is None else "Leiden, UMAP beside it")
            t = time.perf_counter()
            clusters = postprocess.cluster_leiden(H_norm, resolution=outputs.resolution, random_state=outputs.seed)
            timings["cluster_s"] = time.perf_counter() - t
            bar.update(1)
        if outputs.umap:
            bar.set_postfix(step="UMAP")
            if helper is not None and while_waiting is not None:
                while_waiting()
            t = time.perf_counter()
            umap = _umap_beside(helper, timings) if helper is not None else None
            if umap is None:
                umap = postprocess.run_umap(H_norm, random_state=outputs.seed)
                timings["umap_s"] = time.perf_counter() - t
            bar.update(1)
    return H_norm, clusters, umap


def _umap_beside(umap_process: UMAPProcess, timings: dict[str, float]) -> np.ndarray | None:
    """The helper's layout (its seconds and the wait in ``timings``), or None when it failed: the caller then
    runs UMAP in-process, which raises the same error if the input is at fault."""
    t = time.perf_counter()
    try:
        umap = umap_process.result()
    except UMAPProcessError as exc:
        logger.warning("%s; running UMAP in this process", exc)
        return None
    timings["umap_wait_s"] = time.perf_counter() - t
    timings["umap_s"] = umap_process.seconds or 0.0
    logger.info("UMAP beside Leiden: %.1f s in the helper process (peak %s MB), %.1f s waited after Leiden",
                umap_process.seconds, umap_process.peak_mb, timings["umap_wait_s"])
    return umap


@contextlib.contextmanager
def umap_helper(outputs: OutputOptions, threads: int | None, *, writes: bool = True):
    """A UMAP helper process (:mod:`._umap_process`) for :func:`align_cluster_embed` when the run will cluster and
    embed (``writes``: it has somewhere to put them) on two or more cores (``threads`` None or > 1); else None.
    Started now so that its imports overlap the fit; ended on the way out in every case."""
    wanted = outputs.umap and outputs.cluster and writes
    if not wanted or (threads is not None and threads < 2) or usable_cores() < 2:
        yield None
        return
    helper = UMAPProcess.start()
    if helper is None:
        yield None
        return
    with helper:
        yield helper


def _postprocess_and_write(table, H_blocks, est, genes, outputs: OutputOptions, output, summary, *, params,
                           mapping=None, known_clusters=None, progress: ProgressFactory = NullProgress,
                           umap_process=None):
    H = table.assemble(H_blocks)
    H_blocks.clear()  # the caller's list: drop the per-dataset copies of H (80 MB per million cells at K=20)
    datasets = table.datasets
    quantiles, reference = mapping if mapping is not None else (None, None)
    obs = []

    def while_waiting():
        # Work that needs no UMAP, done while the helper computes it: reading obs (0.9 s on Kang, mostly
        # importing anndata) and importing matplotlib for the plots.
        obs.append(table.read_obs())
        if outputs.plots is not None:
            from .plotting import _pyplot

            _pyplot()

    H_norm, clusters, umap = align_cluster_embed(H, datasets, outputs, summary.timings, reference=quantiles,
                                                 known_clusters=known_clusters, progress=progress,
                                                 umap_process=umap_process,
                                                 while_waiting=while_waiting)
    obs_columns = None
    if reference is not None:
        obs_columns = _transfer_labels(H, reference, outputs, summary.timings)
        params = {**params, "reference": reference.path, "label_key": reference.label_key}
    timings = summary.timings
    uns = {
        "params": params,
        "objective": float(summary.objective) if summary.objective is not None else np.nan,
        "objective_per_epoch": np.asarray(getattr(est, "objective_", []), dtype=float),
        "timings": {k: float(v) for k, v in timings.items()},
        "datasets": np.asarray(list(summary.datasets)),
        "scenario": summary.scenario,
        **unshared_uns(est),
    }
    if umap_process is not None and umap_process.peak_mb is not None:
        uns["umap_process_peak_mb"] = float(umap_process.peak_mb)  # a second process: not in this one's peak
    W = np.zeros((len(table.var_names), est.W_.shape[0]), dtype=np.float32)
    pos = table.gene_positions(genes)
    W[pos] = est.W_.T
    selected = np.zeros(len(table.var_names), dtype=bool)
    selected[pos] = True
    if output is not None:
        write_results(
            output,
            table,
            H=H,
            H_norm=H_norm,
            clusters=clusters,
            umap=umap,
            W=W,
            selected=selected,
            uns=uns,
            copy_x=outputs.copy_x,
            obs_columns=obs_columns,
            obs=obs[0] if obs else None,
        )
        summary.outputs.append(str(output))
    if outputs.plots is not None:
        summary.outputs.extend(_plots(outputs.plots, umap, datasets, clusters, uns["objective_per_epoch"]))


def _transfer_labels(H: np.ndarray, reference: ReferenceCells, outputs: OutputOptions, timings: dict) -> dict:
    """The label vote among the reference's cells (cosine on H as projected: measured best, see
    benchmarks/README.md), as the results' obs columns."""
    import pandas as pd

    from . import _keys
    from .mapping import transfer_labels

    t = time.perf_counter()
    vote = transfer_labels(H, reference.H, reference.labels, metric="cosine", random_state=outputs.seed)
    timings["label_transfer_s"] = time.perf_counter() - t
    return {_keys.OBS_LABEL: pd.Categorical(vote.labels.astype(str), categories=sorted(set(reference.labels))),
            _keys.OBS_LABEL_CONFIDENCE: vote.confidence, _keys.OBS_MAPPING_DISTANCE: vote.distance}


def _plots(folder, umap, datasets, clusters, objective) -> list[str]:
    from . import plotting

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder
    written = []
    if umap is not None:
        plotting.plot_embedding(umap, datasets, folder / "umap_dataset.png", title="UMAP by dataset")
        written.append(str(folder / "umap_dataset.png"))
        if clusters is not None:
            plotting.plot_embedding(umap, clusters.astype(str), folder / "umap_cluster.png", title="UMAP by cluster")
            written.append(str(folder / "umap_cluster.png"))
    if len(objective):
        plotting.plot_objective(objective, folder / "objective.png", title="Objective per epoch (mini-batch estimate)")
        written.append(str(folder / "objective.png"))
    return written


def _estimator_params(est) -> dict:
    """The model's parameters under the names of :class:`ModelParams` (what ``update``/``project`` used)."""
    seed = est.random_state if isinstance(est.random_state, int | np.integer) else None
    return {"k": int(est.W_.shape[0]), "n_components": int(est.W_.shape[0]), "lam": float(est.lam),
            "epochs": int(est.max_epochs), "batch_size": int(est.batch_size), "seed": seed}


def _option_params(*options) -> dict:
    """Flat ``uns['inmf']['params']`` entries of option objects (HDF5 stores no None: written as '')."""
    p: dict = {}
    for opts in options:
        values = asdict(opts)
        if isinstance(opts, OutputOptions):  # its seed is post-processing's, not the model's
            values["postprocess_seed"] = values.pop("seed")
        p.update(values)
    return {k: ("" if v is None else str(v) if isinstance(v, Path) else ",".join(v) if isinstance(v, tuple) else v)
            for k, v in p.items()}


def _checkpoint_unshared(path) -> dict[str, np.ndarray]:
    """The unshared genes of each dataset of checkpoint ``path`` (UINMF), so a resumed fit keeps them."""
    est = load_model(path).estimator
    return {name: np.asarray(est.unshared_names_[name]) for name in est.U_}


def unshared_uns(est: OnlineINMF) -> dict:
    """``uns['inmf']['unshared']``: per dataset with unshared features (UINMF), its name, their names and U_i
    as (u_i, K), features x factors like ``varm`` W. Empty when no dataset has any."""
    entries = {}
    for i, (name, U) in enumerate(est.U_.items()):
        names = est.unshared_names_.get(name)
        names = np.asarray([f"unshared{j}" for j in range(U.shape[1])] if names is None else names).astype(str)
        entries[str(i)] = {"dataset": name, "genes": names, "U": np.ascontiguousarray(U.T, dtype=np.float32)}
    return {"unshared": entries} if entries else {}


def _model_info(selection: GeneSelection, reading: InputOptions, inputs) -> dict:
    return {
        "preprocessing": {
            "normalize": "library size, no log (rliger)",
            "var_thresh": selection.var_thresh,
            "alpha": selection.alpha,
            "n_genes": selection.n_genes,
            "combine": selection.combine,
            "unshared": list(selection.unshared),
            "unshared_thresh": selection.unshared_thresh,
            "scale": "per-dataset RMS, no centring",
        },
        "inputs": [str(p) for p in inputs],
        "batch_key": reading.batch_key,
    }


__all__ = ["BLOCK_SIZE", "GeneSelection", "InputOptions", "ModelParams", "OutputOptions", "RunSummary", "fit",
           "project", "update"]
