"""Scenarios 1, 2 and 3 end to end: paths in, result and model files out.

Composition only: readers open the data, ``preprocess`` prepares it, ``OnlineINMF`` learns, ``postprocess``
aligns and clusters, ``_results`` writes. Progress goes to a ``Progress`` factory (tqdm bars on stderr from
the CLI, nothing from the library by default).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ._errors import InputError
from ._files import atomic_output, check_output_path, remove_stale_temporaries
from ._prepared import build_caches
from ._progress import NullProgress
from ._results import ResultsTable, write_results
from .engine import OnlineINMF
from .model_io import Checkpoint, load_model, save_model
from .preprocess import prepare
from .readers import H5adSource, open_sources

logger = logging.getLogger(__name__)

#: Block size of the final H pass and of preprocessing passes (cells).
BLOCK_SIZE = 20000


@dataclass
class FitOptions:
    """Options of ``onlinemf fit`` (defaults reproduce rliger's online iNMF)."""

    k: int = 20
    lam: float = 5.0
    epochs: int = 5
    batch_size: int = 5000
    seed: int = 1
    n_genes: int | None = None
    var_thresh: float = 0.1
    alpha: float = 0.99
    combine: str = "union"
    batch_key: str | None = None
    layer: str | None = None
    use_raw: bool = False
    genome: str | None = None
    cluster: bool = True
    umap: bool = True
    resolution: float = 1.0
    plots: Path | None = None
    copy_x: bool = False
    threads: int = 1
    cache: str | None = "auto"
    checkpoint: Path | None = None
    checkpoint_every: int = 20
    resume: bool = False


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


def _cache_mode(option: str | None, n_cells: int) -> str | None:
    # Epochs re-read the data: keep the prepared matrix in memory when it is small, on disk otherwise.
    if option != "auto":
        return option
    return "memory" if n_cells <= 200_000 else "disk"


def _open(inputs, opts):
    return open_sources(
        [str(p) for p in inputs], batch_key=opts.batch_key, layer=opts.layer, use_raw=opts.use_raw, genome=opts.genome
    )


@contextlib.contextmanager
def _prepared_inputs(inputs, opts: FitOptions, progress, *, genes=None, cache=None, check=None, **select):
    """Open the inputs, run ``check(sources)``, prepare them (one streamed pass, then the cache pass) and
    yield ``(sources, prepared)``; every file and cache is closed on the way out, on errors too."""
    sources = _open(inputs, opts)
    prepared = None
    try:
        _check_copy_x(opts, inputs, sources)
        if check is not None:
            check(sources)
        n_total = sum(s.n_cells for s in sources)
        with progress(total=n_total, desc="preprocess", unit="cells") as bar:
            prepared = prepare(sources, genes=genes, block_size=BLOCK_SIZE, progress=bar.update,
                               cache=_cache_mode(cache, n_total), **select)
        if opts.k is not None and genes is None and opts.k > len(prepared.genes):
            msg = (f"--k {opts.k}: expected at most the number of genes used ({len(prepared.genes)}); "
                   "lower --k or select more genes (--n-genes, --var-thresh)")
            raise InputError(msg)
        _build_caches(prepared, progress)
        yield sources, prepared
    finally:
        for s in [*(prepared.sources if prepared is not None else []), *sources]:
            s.close()


def _finish(scenario, est, inputs, sources, prepared, opts, progress, *, output, model, model_kwargs, timings,
            project=False) -> RunSummary:
    """Final H (with the objective), then model and results: the model is renamed into place only after the
    results are written, so a run leaves all its outputs or none."""
    H, objective, timings["final_h_s"] = _final_h(est, prepared.sources, progress, project=project)
    summary = RunSummary(scenario, sum(s.n_cells for s in sources), {s.name: s.n_cells for s in sources},
                         len(prepared.genes), 0.0, objective, timings=timings)
    with _pending(model) as model_tmp:
        if model is not None:
            save_model(model_tmp, est, **model_kwargs)
            summary.outputs.append(str(model))
        if output is not None or opts.plots is not None:
            table = ResultsTable.from_sources(inputs, sources, opts.batch_key)
            _postprocess_and_write(table, H, est, prepared.genes, opts, output, summary, progress,
                                   params=_params(opts, est))
    return summary


def fit(inputs, *, output=None, model=None, options: FitOptions | None = None, progress=NullProgress) -> RunSummary:
    """Scenario 1: learn W, V_i from fixed datasets streamed from disk; write results and model.

    Parameters
    ----------
    inputs : list of path
        ``.h5ad`` or 10x ``.h5`` files; several files are several datasets, one ``.h5ad`` with
        ``options.batch_key`` is one dataset per category.
    output : path or None
        Results ``.h5ad`` (H, normalised H, clusters, UMAP, W, parameters).
    model : path or None
        Model ``.h5`` for ``update`` and ``project``.
    """
    opts = options or FitOptions()
    inputs = [Path(p) for p in inputs]
    _check_outputs(inputs, {"output": output, "model output": model, "checkpoint": opts.checkpoint})
    _check_plots(opts)
    resume, genes = None, None
    if opts.resume and opts.checkpoint is not None and Path(opts.checkpoint).exists():
        # A resumed fit keeps the checkpoint's genes, so it continues exactly the same problem.
        resume = Path(opts.checkpoint)
        genes = _checkpoint_genes(resume, opts)
    elif opts.resume:
        logger.info("no checkpoint at %s yet: starting from the beginning", opts.checkpoint)
    t0 = time.perf_counter()
    timings = {}
    with threadpool_limits(limits=opts.threads):
        select = {"thresh": opts.var_thresh, "alpha": opts.alpha, "n_genes": opts.n_genes, "combine": opts.combine}
        with _prepared_inputs(inputs, opts, progress, genes=genes, cache=opts.cache,
                              check=lambda sources: _check_cells_for_k(sources, opts.k), **select) as (sources, prepared):
            timings["preprocess_s"] = time.perf_counter() - t0
            est = OnlineINMF(n_components=opts.k, lam=opts.lam, batch_size=opts.batch_size, max_epochs=opts.epochs,
                             random_state=opts.seed, n_threads=opts.threads)
            checkpoint = Checkpoint(opts.checkpoint, every=opts.checkpoint_every) if opts.checkpoint else None
            t = time.perf_counter()
            with progress(total=None, desc="factorize", unit="batch") as bar:
                est.fit(prepared.sources, progress=_step_progress(bar), checkpoint=checkpoint, resume=resume)
            timings["factorize_s"] = time.perf_counter() - t
            summary = _finish("fit", est, inputs, sources, prepared, opts, progress, output=output, model=model,
                              model_kwargs={"scaling": prepared.scales, "info": _model_info(opts, inputs)},
                              timings=timings)
    if opts.checkpoint and Path(opts.checkpoint).exists():
        # A finished run needs no checkpoint: the model file holds the result.
        Path(opts.checkpoint).unlink()
    summary.seconds = time.perf_counter() - t0
    return summary


def update(model, inputs, *, output=None, model_out=None, options: FitOptions | None = None, progress=NullProgress) -> RunSummary:
    """Scenario 2: learn from new datasets with a saved model, without reading the old data.

    W keeps learning; the saved datasets' V, A, B are frozen but still shape W. New datasets are normalised and
    scaled on the model's genes. H is computed for the new cells only (the old data may be gone).
    """
    opts = options or FitOptions()
    inputs = [Path(p) for p in inputs]
    model = Path(model)
    _check_outputs([*inputs, model], {"output": output, "model output": model_out})
    _check_plots(opts)
    t0 = time.perf_counter()
    saved = load_model(model)
    est = saved.estimator

    def check(sources):
        clash = sorted({s.name for s in sources} & set(est.dataset_names_))
        if clash:
            msg = f"{inputs[0]}: dataset name(s) {clash} already exist in model {model}; rename the files or categories"
            raise InputError(msg)

    timings = {}
    with threadpool_limits(limits=opts.threads), _prepared_inputs(
        inputs, opts, progress, genes=np.asarray(est.var_names_in_), cache=opts.cache, check=check
    ) as (sources, prepared):
        if opts.epochs is not None:
            est.set_params(max_epochs=opts.epochs)
        t = time.perf_counter()
        with progress(total=None, desc="update", unit="batch") as bar:
            est.update(prepared.sources, progress=_step_progress(bar))
        timings["factorize_s"] = time.perf_counter() - t
        summary = _finish("update", est, inputs, sources, prepared, opts, progress, output=output, model=model_out,
                          model_kwargs={"scaling": {**(saved.scaling or {}), **prepared.scales}, "info": saved.info},
                          timings=timings)
    summary.seconds = time.perf_counter() - t0
    return summary


def project(model, inputs, *, output=None, options: FitOptions | None = None, progress=NullProgress) -> RunSummary:
    """Scenario 3: H of new cells on the learned W (V = 0); the model is not changed."""
    opts = options or FitOptions()
    inputs = [Path(p) for p in inputs]
    _check_outputs([*inputs, Path(model)], {"output": output})
    _check_plots(opts)
    t0 = time.perf_counter()
    est = load_model(model).estimator
    with threadpool_limits(limits=opts.threads), _prepared_inputs(
        inputs, opts, progress, genes=np.asarray(est.var_names_in_)
    ) as (sources, prepared):
        summary = _finish("project", est, inputs, sources, prepared, opts, progress, output=output, model=None,
                          model_kwargs={}, timings={}, project=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_plots(opts: FitOptions) -> None:
    if opts.plots is not None and Path(opts.plots).exists() and not Path(opts.plots).is_dir():
        msg = f"--plots {opts.plots}: expected a folder, found a file"
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


def _check_copy_x(opts: FitOptions, inputs, sources) -> None:
    # Checked before the work, not when writing: a late failure would waste the run.
    if opts.copy_x and (len(inputs) != 1 or not isinstance(sources[0], H5adSource)):
        msg = "--copy-x: counts can be copied only from a single .h5ad input; found several inputs or a 10x file"
        raise InputError(msg)


def _check_cells_for_k(sources, k: int) -> None:
    # V_i starts from k cells of each dataset, and gene selection needs a variance (2 cells).
    need = max(int(k), 2)
    for s in sources:
        if s.n_cells < need:
            msg = f"{s.name}: expected at least {need} cells to learn k={k} factors, found {s.n_cells}; lower --k or add cells"
            raise InputError(msg)


def _checkpoint_genes(path, opts: FitOptions) -> np.ndarray:
    """The genes of checkpoint ``path``, after checking it was written by a fit with the same options."""
    est = load_model(path).estimator
    wanted = {"n_components": ("--k", opts.k), "lam": ("--lambda", opts.lam), "batch_size": ("--batch-size", opts.batch_size),
              "max_epochs": ("--epochs", opts.epochs), "random_state": ("--seed", opts.seed)}
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


def _final_h(est, prepared_sources, progress, *, project=False):
    """H for every cell, streamed per block; the exact objective is accumulated in the same pass."""
    t = time.perf_counter()
    blocks, objective = [], 0.0
    n_total = sum(s.n_cells for s in prepared_sources)
    with progress(total=n_total, desc="project" if project else "final H", unit="cells") as bar:
        for src in prepared_sources:
            dataset = None if project else src.name
            H, obj = est.transform_source(src, dataset=dataset, block_size=BLOCK_SIZE, with_objective=not project)
            bar.update(src.n_cells)
            blocks.append(H)
            if obj is not None:
                objective += obj
    return blocks, (None if project else objective), time.perf_counter() - t


def align_cluster_embed(H, datasets, opts: FitOptions, timings: dict):
    """Quantile-normalise H across datasets, then cluster and embed (each optional).

    Returns ``(H_norm, clusters or None, umap or None)``; ``timings`` gets the seconds of each step.
    """
    from . import postprocess

    t = time.perf_counter()
    H_norm, _ = postprocess.quantile_norm(H, datasets, random_state=opts.seed)
    timings["quantile_norm_s"] = time.perf_counter() - t
    clusters = umap = None
    if opts.cluster:
        t = time.perf_counter()
        clusters = postprocess.cluster_leiden(H_norm, resolution=opts.resolution, random_state=opts.seed)
        timings["cluster_s"] = time.perf_counter() - t
    if opts.umap:
        t = time.perf_counter()
        umap = postprocess.run_umap(H_norm, random_state=42)
        timings["umap_s"] = time.perf_counter() - t
    return H_norm, clusters, umap


def _postprocess_and_write(table, H_blocks, est, genes, opts, output, summary, progress, *, params):
    H = table.assemble(H_blocks)
    H_blocks.clear()  # the caller's list: drop the per-dataset copies of H (80 MB per million cells at K=20)
    datasets = table.datasets
    H_norm, clusters, umap = align_cluster_embed(H, datasets, opts, summary.timings)
    timings = summary.timings
    uns = {
        "params": params,
        "objective": float(summary.objective) if summary.objective is not None else np.nan,
        "objective_per_epoch": np.asarray(getattr(est, "objective_", []), dtype=float),
        "timings": {k: float(v) for k, v in timings.items()},
        "datasets": np.asarray(list(summary.datasets)),
        "scenario": summary.scenario,
    }
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
            copy_x=opts.copy_x,
        )
        summary.outputs.append(str(output))
    if opts.plots is not None:
        summary.outputs.extend(_plots(opts.plots, umap, datasets, clusters, uns["objective_per_epoch"]))


def _plots(folder, umap, datasets, clusters, objective):
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


def _params(opts: FitOptions, est) -> dict:
    p = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    p = {k: ("" if v is None else v) for k, v in p.items()}
    p["n_components"] = int(est.W_.shape[0])
    return p


def _model_info(opts: FitOptions, inputs) -> dict:
    return {
        "preprocessing": {
            "normalize": "library size, no log (rliger)",
            "var_thresh": opts.var_thresh,
            "alpha": opts.alpha,
            "n_genes": opts.n_genes,
            "combine": opts.combine,
            "scale": "per-dataset RMS, no centring",
        },
        "inputs": [str(p) for p in inputs],
        "batch_key": opts.batch_key,
    }


__all__ = ["BLOCK_SIZE", "FitOptions", "RunSummary", "fit", "project", "update"]
