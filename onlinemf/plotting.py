"""Figures: embeddings coloured by a categorical label, and the objective trace.

matplotlib is imported lazily with the non-interactive Agg backend; files are written by
:func:`onlinemf._files.atomic_output` (temporary name, then renamed), so a failed plot never leaves a
half-written file, and a plot gets the permissions of any new file, like every other output.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._errors import InputError
from ._files import atomic_output
from ._validation import require_extra

logger = logging.getLogger(__name__)


def _pyplot():
    (matplotlib,) = require_extra("plot", "plotting", ("matplotlib",))
    matplotlib.use("Agg", force=False)
    (plt,) = require_extra("plot", "plotting", ("matplotlib.pyplot",))
    return plt


def _save(fig, path) -> Path:
    """Save ``fig`` to ``path`` atomically (format from the suffix, PNG if none) and close it."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        msg = f"path {path}: expected an existing folder, found none at {folder}"
        raise InputError(msg)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    logger.info("wrote %s", path)
    return path


def _colors(n: int) -> np.ndarray:
    """n distinct RGBA colours: tab10 / tab20 where they suffice, then evenly spaced hues."""
    import matplotlib as mpl

    if n <= 10:
        return mpl.colormaps["tab10"](np.arange(n))
    if n <= 20:
        return mpl.colormaps["tab20"](np.arange(n))
    return mpl.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))


def plot_embedding(coords, labels, path, *, title=None):
    """Scatter plot of a 2-D embedding coloured by a categorical label, legend outside on the right.

    Parameters
    ----------
    coords : array-like of shape (n_cells, 2)
    labels : array-like of shape (n_cells,)
        Categories (datasets, clusters, cell types); shown in sorted order (numeric order for integer labels).
    path : str or Path
        Output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
    title : str, optional

    Returns
    -------
    Path of the written file.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
        msg = f"coords: expected a non-empty array of shape (n_cells, 2), found shape {xy.shape}"
        raise InputError(msg)
    lab = np.asarray(labels).astype(str)
    if lab.shape != (xy.shape[0],):
        msg = f"labels: expected shape ({xy.shape[0]},), found {lab.shape}"
        raise InputError(msg)
    plt = _pyplot()
    categories, codes = np.unique(lab, return_inverse=True)
    if all(c.lstrip("-").isdigit() for c in categories):
        # Cluster ids: 0, 1, 2, ..., 10 rather than the string order 0, 1, 10, 2.
        rank = np.argsort([int(c) for c in categories], kind="stable")
        categories, codes = categories[rank], np.argsort(rank)[codes]
    colors = _colors(categories.size)
    size = float(np.clip(20_000 / xy.shape[0], 0.2, 20.0))  # points^2: small dots for many cells
    order = np.random.default_rng(0).permutation(xy.shape[0])  # no category painted wholly on top
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.scatter(xy[order, 0], xy[order, 1], c=colors[codes[order]], s=size, linewidths=0, rasterized=True)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colors[i], label=c)
               for i, c in enumerate(categories)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              fontsize="small", markerscale=1.2, ncol=1 + categories.size // 25)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_objective(values, path, *, title="Objective", xlabel="epoch"):
    """Line plot of the objective per recorded step (log scale when all values are positive).

    Parameters
    ----------
    values : array-like of shape (n_steps,)
    path : str or Path
    title, xlabel : str

    Returns
    -------
    Path of the written file.
    """
    y = np.asarray(values, dtype=np.float64).ravel()
    if y.size == 0 or not np.isfinite(y).all():
        msg = f"values: expected a non-empty sequence of finite numbers, found {y.size} values"
        raise InputError(msg)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, y.size + 1), y, marker="o" if y.size <= 50 else None, markersize=3)
    if (y > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("objective")
    ax.set_title(title)
    return _save(fig, path)
