"""The ``onlinemf`` command line (installed as ``onlinemf.cli``): parse options, call the pipelines.

User errors (``InputError``) are shown as one line on stderr with exit status 1 (click usage errors exit 2; see docs/errors.md); an interrupt exits 130 and
leaves no partial outputs (outputs are only renamed into place when complete).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from onlinemf._errors import InputError

if TYPE_CHECKING:  # the pipelines are imported by the commands that need them (fast --help)
    from onlinemf.pipelines import RunSummary

OUT_FILE = click.Path(exists=False, dir_okay=False, path_type=Path)
#: -o: a file, or a folder when it ends in .zarr (checked by _files.check_output_path before any work).
OUT_RESULTS = click.Path(exists=False, dir_okay=True, path_type=Path)


class _InputPath(click.Path):
    """An input: an .h5ad or 10x .h5 file, or an AnnData .zarr store (a folder); other folders are refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)  # a Path (path_type=Path)
        if isinstance(path, Path) and path.is_dir():
            from onlinemf.readers import is_zarr_store

            if not is_zarr_store(path):
                self.fail(f"{str(value)!r} is a directory (and not a zarr store).", param, ctx)
        return path


IN_FILES = _InputPath(path_type=Path)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one clean line and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tqdm.contrib.logging import logging_redirect_tqdm

        _setup_logging(kwargs.get("quiet", False), kwargs.get("verbose", 0))
        _sigterm_as_interrupt()
        try:
            with logging_redirect_tqdm():
                return func(*args, **kwargs)
        except InputError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: no output was written (a --checkpoint, if given, allows --resume).", err=True)
            sys.exit(130)
        except MemoryError:
            raise click.ClickException("out of memory: lower --batch-size or use fewer genes (--n-genes)") from None
        except OSError as err:
            if err.errno not in _STORAGE_ERRNOS:
                raise
            raise click.ClickException(_storage_error_line(err)) from None

    return wrapper


# The machine's storage, not the program, failed: a full disk or quota, a read-only or failing file system.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _storage_error_line(err: OSError) -> str:
    """One line for a storage failure. h5py's messages span several lines; the errno says it in a few words."""
    where = f" ({err.filename})" if err.filename else ""
    return (f"{os.strerror(err.errno or 0)}{where}: the run stopped and published nothing (its temporary files are "
            "removed, earlier outputs untouched); free space or write elsewhere, then run again")


def _progress(quiet: bool) -> Callable[..., Any]:
    from onlinemf._progress import NullProgress, tqdm_progress

    return NullProgress if quiet else tqdm_progress


def _sigterm_as_interrupt() -> None:
    """SIGINT and SIGTERM (kill, a batch scheduler's time limit) stop the run and clean up: temporaries removed,
    nothing published. The flag makes the interrupt stick even where Python swallows the KeyboardInterrupt."""
    from onlinemf._files import interrupt_requested

    interrupt_requested.clear()

    def handler(signum, frame):
        interrupt_requested.set()
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not in the main thread (e.g. some test runners)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    default_hook = sys.__unraisablehook__

    def quiet_swallowed_interrupt(unraisable):
        # A KeyboardInterrupt raised inside a weakref callback is printed as "Exception ignored ... Traceback"
        # and dropped; the flag re-raises it at the next safe point, so it needs no message here.
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            default_hook(unraisable)

    sys.unraisablehook = quiet_swallowed_interrupt


def _setup_logging(quiet: bool, verbose: int) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="onlinemf")
def main() -> None:
    """Streaming online integrative NMF (online iNMF) for single-cell data.

    \b
    Scenario 1  onlinemf fit pbmc.h5ad --k 20 --lambda 5 -o results.h5ad --model model.h5
    Scenario 2  onlinemf update model.h5 new.h5ad -o new_results.h5ad --model-out model2.h5
    Scenario 3  onlinemf project model.h5 query.h5ad -o projected.h5ad
    """


def _input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--batch-key", default=None, help="obs column naming each cell's dataset (one .h5ad input). Default: guessed from common names (batch, dataset, sample, ...); 'none' = one dataset."),
        click.option("--layer", default=None, help="Read counts from layers[NAME] instead of X."),
        click.option("--raw", "use_raw", is_flag=True, help="Read counts from raw/X."),
        click.option("--genome", default=None, help="Genome to read from a multi-genome 10x .h5."),
        click.option("--threads", default=None, type=click.IntRange(min=1),
                     help="Threads for the computation. Default: every core this process may use."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary."),
        click.option("-v", "--verbose", count=True, help="More log messages."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--cluster/--no-cluster", default=True, help="Leiden clustering of the normalised H (needs the 'cluster' extra)."),
        click.option("--umap/--no-umap", default=True, help="UMAP of the normalised H (needs the 'umap' extra)."),
        click.option("--resolution", default=1.0, type=click.FloatRange(min=0, min_open=True), help="Leiden resolution."),
        click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for PNG plots (UMAP by dataset and cluster, objective)."),
        click.option("--copy-x", is_flag=True, help="Copy the input counts into the results file (single .h5ad input)."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _scheduler_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--scheduler", default=None, metavar="local:N|tcp://HOST:PORT|FILE",
                        help="Run the mini-batch steps and the H pass on a Dask cluster (needs the 'dask' extra): "
                             "local:N starts N worker processes here; tcp://HOST:PORT or a scheduler file joins a "
                             "running cluster, whose workers must read the inputs at the same paths.")(func)


def _postprocess_seed(func: Callable[..., Any]) -> Callable[..., Any]:
    # fit has one --seed for the model and its post-processing; update and project learn no new seed.
    return click.option("--seed", default=None, type=int, show_default=False,
                        help="Seed of quantile normalisation, Leiden and UMAP. Default: the model's seed.")(func)


def _resolve_batch_key(inputs: Sequence[Path], batch_key: str | None, quiet: bool) -> str | None:
    """The dataset split the user means, said out loud."""
    if batch_key is not None:
        return None if batch_key.lower() == "none" else batch_key
    if len(inputs) != 1:
        return None
    from onlinemf.readers import describe, guess_batch_key

    info = describe(inputs[0])
    if info.get("format") not in ("h5ad", "zarr"):
        return None
    key = guess_batch_key(info.get("obs_columns", {}), info["n_cells"])
    if key is None:
        click.echo(
            f"Treating {inputs[0]} as one dataset: no batch column found in obs. "
            "Name one with --batch-key COLUMN to integrate its categories.",
            err=True,
        )
    elif not quiet:
        n = info["obs_columns"][key]
        click.echo(f"Datasets: obs column '{key}' ({n} categories). Use --batch-key to choose another, or --batch-key none.", err=True)
    return key


def _summary(summary: RunSummary, quiet: bool) -> None:
    if quiet:
        return
    ds = ", ".join(f"{k} ({v:,})" for k, v in summary.datasets.items())
    click.echo(f"\n{summary.scenario}: {summary.n_cells:,} cells in {len(summary.datasets)} dataset(s): {ds}", err=True)
    click.echo(f"genes used: {summary.n_genes:,}   time: {summary.seconds:.1f} s", err=True)
    if summary.objective is not None:
        click.echo(f"objective: {summary.objective:.6g}", err=True)
    for path in summary.outputs:
        click.echo(f"wrote {path}", err=True)


def _default_output(inputs: Sequence[Path], suffix: str) -> Path:
    """``STEM<suffix>`` in the current folder: inputs often sit in shared, read-only data folders."""
    first = Path(inputs[0])
    return Path.cwd() / (first.name.split(".")[0] + suffix)


def _dataset_list(value: str | None) -> tuple[str, ...]:
    """``--unshared a,b`` as ("a", "b"); names are checked against the datasets once they are read."""
    names = tuple(n.strip() for n in (value or "").split(",") if n.strip())
    if value is not None and not names:
        raise InputError(f"--unshared: expected dataset names separated by commas, found {value!r}")
    return names


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=IN_FILES)
@click.option("--k", "k", default=20, type=click.IntRange(min=1), help="Number of factors K.")
@click.option("--lambda", "lam", default=5.0, type=click.FloatRange(min=0), help="Regularisation of the dataset-specific factors.")
@click.option("--epochs", default=5, type=click.IntRange(min=1), help="Passes over the data.")
@click.option("--batch-size", default=5000, type=click.IntRange(min=1), help="Cells per mini-batch (all datasets together).")
@click.option("--seed", default=1, type=int, help="Random seed (initialisation, mini-batch order, quantile normalisation, Leiden, UMAP).")
@click.option("--n-genes", default=None, type=click.IntRange(min=1), help="Select this many variable genes (instead of --var-thresh).")
@click.option("--var-thresh", default=0.1, type=float, help="rliger's variance threshold for gene selection.")
@click.option("--combine", default="union", type=click.Choice(["union", "intersection"]), help="How per-dataset gene sets combine.")
@click.option("--unshared", default=None, metavar="DATASET[,DATASET...]",
              help="UINMF: these datasets also keep their variable genes that the others lack (absent from their "
                   "files or without counts there), learned as dataset-specific factors U_i.")
@click.option("--unshared-thresh", default=0.1, type=float, help="Variance threshold of the --unshared genes (rliger's unsharedThresh).")
@_input_options
@click.option("-o", "--output", type=OUT_RESULTS, default=None, help="Results .h5ad (a .zarr store if it ends in .zarr). Default: INPUT_inmf.h5ad in the current folder (INPUT: the first input's name).")
@click.option("--model", type=OUT_FILE, default=None, help="Model .h5 for update/project. Default: INPUT_model.h5 in the current folder.")
@_output_options
@click.option("--checkpoint", type=OUT_FILE, default=None, help="Save the fit state here every few mini-batches.")
@click.option("--checkpoint-every", default=20, type=click.IntRange(min=1), help="Mini-batches between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint if it exists.")
@click.option("--label-key", default=None, help="obs column of cell labels, recorded in the model as the default label column of 'project --reference' (the model always keeps the reference quantiles).")
@_scheduler_option
@_user_errors
def fit(inputs: tuple[Path, ...], k: int, lam: float, epochs: int, batch_size: int, seed: int, n_genes: int | None,
        var_thresh: float, combine: str, unshared: str | None, unshared_thresh: float, batch_key: str | None, layer: str | None, use_raw: bool, genome: str | None,
        threads: int, quiet: bool, verbose: int, output: Path | None, model: Path | None, cluster: bool, umap: bool,
        resolution: float, plots: Path | None, copy_x: bool, checkpoint: Path | None, checkpoint_every: int,
        resume: bool, scheduler: str | None, label_key: str | None) -> None:
    """Scenario 1: integrate datasets (several INPUTS, or one .h5ad split by --batch-key)."""
    from onlinemf import pipelines
    from onlinemf._dask import scheduler_client

    if resume and checkpoint is None:
        raise InputError("--resume needs --checkpoint PATH (the checkpoint to continue from)")
    key = _resolve_batch_key(inputs, batch_key, quiet)
    output = output or _default_output(inputs, "_inmf.h5ad")
    model = model or _default_output(inputs, "_model.h5")
    selection = pipelines.GeneSelection(n_genes=n_genes, var_thresh=var_thresh, combine=combine,
                                        unshared=_dataset_list(unshared), unshared_thresh=unshared_thresh)
    with scheduler_client(scheduler) as client:
        summary = pipelines.fit(
            inputs, output=output, model=model, client=client,
            params=pipelines.ModelParams(k=k, lam=lam, epochs=epochs, batch_size=batch_size, seed=seed, threads=threads),
            reading=pipelines.InputOptions(batch_key=key, layer=layer, use_raw=use_raw, genome=genome),
            selection=selection,
            outputs=pipelines.OutputOptions(cluster=cluster, umap=umap, resolution=resolution, seed=seed, plots=plots,
                                            copy_x=copy_x),
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, progress=_progress(quiet),
            label_key=label_key,
        )
    _summary(summary, quiet)


@main.command()
@click.argument("model", type=click.Path(exists=False, dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=IN_FILES)
@click.option("--epochs", default=5, type=click.IntRange(min=1), help="Passes over the new data.")
@_input_options
@click.option("-o", "--output", type=OUT_RESULTS, default=None, help="Results .h5ad (or .zarr) for the new cells. Default: INPUT_inmf.h5ad in the current folder.")
@click.option("--model-out", type=OUT_FILE, default=None, help="Updated model. Default: MODEL_updated.h5 in the current folder (MODEL is never overwritten).")
@_output_options
@_postprocess_seed
@_scheduler_option
@_user_errors
def update(model: Path, inputs: tuple[Path, ...], epochs: int, batch_key: str | None, layer: str | None, use_raw: bool,
           genome: str | None, threads: int, quiet: bool, verbose: int, output: Path | None, model_out: Path | None,
           cluster: bool, umap: bool, resolution: float, plots: Path | None, copy_x: bool, seed: int | None,
           scheduler: str | None) -> None:
    """Scenario 2: learn from new datasets with a saved MODEL, without reading the old data."""
    from onlinemf import pipelines
    from onlinemf._dask import scheduler_client

    key = _resolve_batch_key(inputs, batch_key, quiet)
    output = output or _default_output(inputs, "_inmf.h5ad")
    model_out = model_out or Path.cwd() / (model.stem + "_updated.h5")
    with scheduler_client(scheduler) as client:
        summary = pipelines.update(
            model, inputs, output=output, model_out=model_out, epochs=epochs, threads=threads, client=client,
            reading=pipelines.InputOptions(batch_key=key, layer=layer, use_raw=use_raw, genome=genome),
            outputs=pipelines.OutputOptions(cluster=cluster, umap=umap, resolution=resolution, seed=seed, plots=plots,
                                            copy_x=copy_x),
            progress=_progress(quiet),
        )
    _summary(summary, quiet)


@main.command()
@click.argument("model", type=click.Path(exists=False, dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=IN_FILES)
@_input_options
@click.option("-o", "--output", type=OUT_RESULTS, default=None, help="Results .h5ad (a .zarr store if it ends in .zarr). Default: INPUT_projected.h5ad in the current folder.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Map the cells onto this reference: the results .h5ad of the fit that wrote MODEL (only read). Adds obs inmf_label, inmf_label_confidence, inmf_mapping_distance.")
@click.option("--label-key", default=None, help="obs column of the reference's labels. Default: the one 'fit --label-key' recorded in MODEL.")
@_output_options
@_postprocess_seed
@_scheduler_option
@_user_errors
def project(model: Path, inputs: tuple[Path, ...], batch_key: str | None, layer: str | None, use_raw: bool,
            genome: str | None, threads: int, quiet: bool, verbose: int, output: Path | None, cluster: bool, umap: bool,
            resolution: float, plots: Path | None, copy_x: bool, seed: int | None, scheduler: str | None,
            reference: Path | None, label_key: str | None) -> None:
    """Scenario 3: project new cells onto a saved MODEL's shared factors (the model is unchanged); --reference labels them."""
    from onlinemf import pipelines
    from onlinemf._dask import scheduler_client

    key = _resolve_batch_key(inputs, batch_key, quiet)
    output = output or _default_output(inputs, "_projected.h5ad")
    with scheduler_client(scheduler) as client:
        summary = pipelines.project(
            model, inputs, output=output, threads=threads, client=client,
            reading=pipelines.InputOptions(batch_key=key, layer=layer, use_raw=use_raw, genome=genome),
            outputs=pipelines.OutputOptions(cluster=cluster, umap=umap, resolution=resolution, seed=seed, plots=plots,
                                            copy_x=copy_x),
            progress=_progress(quiet),
            reference=reference, label_key=label_key,
        )
    _summary(summary, quiet)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--batch-key", default=None, help="Also list the categories of this obs column.")
@_user_errors
def info(path: Path, batch_key: str | None) -> None:
    """Describe an .h5ad, a 10x .h5, an AnnData .zarr store or an onlinemf model file."""
    from onlinemf.info import describe_path

    click.echo(describe_path(path, batch_key=batch_key))


@main.command()
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-key", default="inmf_dataset", help="obs column of the datasets.")
@click.option("--label-key", default=None, help="obs column of known cell labels (for ARI/NMI).")
@_user_errors
def evaluate(results: Path, batch_key: str, label_key: str | None) -> None:
    """Alignment, ARI and NMI of a results .h5ad."""
    from onlinemf.info import evaluate_results

    for name, value in evaluate_results(results, batch_key=batch_key, label_key=label_key).items():
        click.echo(f"{name}\t{value:.4f}" if isinstance(value, float) else f"{name}\t{value}")


if __name__ == "__main__":
    main()
