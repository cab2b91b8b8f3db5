"""The results ``.h5ad``: input ``obs`` in input order, H and friends in ``obsm``, W in ``varm``.

Writing needs memory for H (cells x K) and ``obs`` only; counts are copied (``copy_x``) HDF5-to-HDF5, never
loaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from . import _keys
from ._errors import InputError
from ._files import atomic_output, atomic_output_dir, is_zarr_path
from .readers import is_zarr_store, read_obs, zarr_n_obs

logger = logging.getLogger(__name__)


@dataclass
class ResultsTable:
    """Cells and genes of a run's inputs, and where each dataset's cells sit in them.

    ``obs`` is read only by :meth:`read_obs`, when writing: post-processing needs only ``n_cells`` and
    ``placement``, and a million cells' ``obs`` (about 230 MB) would otherwise sit under its peak.

    Attributes
    ----------
    n_cells : int, number of result rows (input cells, files concatenated).
    var_names : ndarray of str, genes of the result (the file's genes, or those shared by all files).
    placement : list of ndarray, per dataset (in source order) the result rows of its cells.
    names : list of str, dataset names in source order.
    single_h5ad : path of the input when the run read one ``.h5ad`` (so ``X`` can be copied), else None.
    """

    n_cells: int
    var_names: np.ndarray
    placement: list
    names: list
    single_h5ad: Path | None
    obs_reader: Callable[[], pd.DataFrame] = field(repr=False)

    @classmethod
    def from_sources(cls, inputs, sources, batch_key=None) -> ResultsTable:
        inputs = [Path(p) for p in inputs]
        names = [s.name for s in sources]
        if len(inputs) == 1:
            path = inputs[0]
            single = path if _is_h5ad(path) else None
            if single:
                n_cells = _h5ad_rows(path)
            else:  # a zarr store's splits sit at their rows, as an .h5ad's (other single inputs are not split)
                n_cells = zarr_n_obs(path) if is_zarr_store(path) else sum(s.n_cells for s in sources)

            def obs_reader():
                return _input_obs(path, sources)

            placement = []
            for s in sources:
                rows = getattr(s, "rows", None)
                placement.append(np.arange(s.n_cells) if rows is None else np.asarray(rows))
            var_names = np.asarray(sources[0].var_names)
        else:
            placement, offset = [], 0
            for s in sources:
                placement.append(offset + np.arange(s.n_cells))
                offset += s.n_cells
            n_cells = offset

            def obs_reader():
                frames = []
                for path, s in zip(inputs, sources, strict=True):
                    frame = _input_obs(path, [s])
                    frame.insert(0, _keys.OBS_DATASET, s.name)
                    frames.append(frame)
                obs = pd.concat(frames)
                if not obs.index.is_unique:
                    # Barcodes repeat across 10x files; prefix them with the dataset, as anndata.concat would suffix.
                    obs.index = [f"{d}_{c}" for d, c in zip(obs[_keys.OBS_DATASET], obs.index, strict=True)]
                return obs

            shared = set(sources[0].var_names)
            for s in sources[1:]:
                shared &= set(s.var_names)
            var_names = np.asarray([g for g in sources[0].var_names if g in shared])
            single = None
        return cls(n_cells=n_cells, var_names=var_names, placement=placement, names=names, single_h5ad=single,
                   obs_reader=obs_reader)

    def read_obs(self) -> pd.DataFrame:
        """The input ``obs`` (read now, while the sources are open), with the dataset column as a categorical."""
        obs = self.obs_reader()
        if len(obs) != self.n_cells:
            msg = f"results: expected {self.n_cells} rows in the input obs, found {len(obs)}"
            raise InputError(msg)
        if _keys.OBS_DATASET not in obs:
            obs[_keys.OBS_DATASET] = self.datasets
        obs[_keys.OBS_DATASET] = pd.Categorical(obs[_keys.OBS_DATASET], categories=self.names)
        if not obs.index.is_unique:  # anndata accepts them with a multi-line warning; say it in one line
            first = obs.index[obs.index.duplicated()][0]
            logger.warning("results: cell names are not unique (e.g. %r); kept as in the input", first)
        return obs

    @property
    def datasets(self) -> np.ndarray:
        """Dataset name of every result row (cells of no dataset get '')."""
        out = np.full(self.n_cells, "", dtype=object)
        for name, rows in zip(self.names, self.placement, strict=True):
            out[rows] = name
        return out

    def assemble(self, blocks) -> np.ndarray:
        """Stack per-dataset arrays (n_i x K, source order) into result-row order."""
        out = np.zeros((self.n_cells, blocks[0].shape[1]), dtype=np.float32)
        for rows, block in zip(self.placement, blocks, strict=True):
            out[rows] = block
        return out

    def gene_positions(self, genes) -> np.ndarray:
        index = pd.Index(self.var_names)
        pos = index.get_indexer(np.asarray(genes))
        if (pos < 0).any():
            missing = np.asarray(genes)[pos < 0][:5]
            msg = f"results: model genes not among the input genes (first missing: {list(missing)})"
            raise InputError(msg)
        return pos


def _is_h5ad(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "obs" in f and "var" in f
    except OSError:
        return False


def _h5ad_rows(path: Path) -> int:
    """Number of cells of an ``.h5ad``, from the length of its obs index (nothing read)."""
    with h5py.File(path, "r") as f:
        obs = f["obs"]
        if isinstance(obs, h5py.Dataset):  # anndata < 0.7: a compound dataset
            return obs.shape[0]
        index = obs[obs.attrs.get("_index", "_index")]
        if isinstance(index, h5py.Group):  # anndata >= 0.13 / pandas 3: nullable-string-array (values, mask)
            index = index["values"]
        return index.shape[0]


def _input_obs(path: Path, sources) -> pd.DataFrame:
    if _is_h5ad(path) or is_zarr_store(path):
        obs = read_obs(path)
    else:
        obs = pd.DataFrame(index=pd.Index(np.concatenate([s.obs_names for s in sources]), name=None))
    obs.index = obs.index.astype(str)
    return obs


def write_results(path, table: ResultsTable, *, H, H_norm=None, clusters=None, umap=None, W, selected, uns, copy_x=False,
                  obs_columns=None, obs=None):
    """Write the results ``.h5ad`` (or a ``.zarr`` store when ``path`` ends in ``.zarr``) atomically.

    Written under a temporary name (a temporary folder for zarr) that is renamed into place when complete.

    Parameters
    ----------
    H, H_norm : ndarray of shape (n_cells, K)
    clusters : ndarray of shape (n_cells,) or None
    umap : ndarray of shape (n_cells, 2) or None
    W : ndarray of shape (n_genes, K), zeros for genes not selected
    selected : bool ndarray of shape (n_genes,)
    obs_columns : dict of name -> array of shape (n_cells,), optional
        More obs columns (``project --reference``: label, confidence, mapping distance).
    obs : DataFrame or None
        ``table.read_obs()`` when the caller has read it already (it is changed here).
    """
    if copy_x and table.single_h5ad is None:
        msg = "--copy-x: counts can be copied only from a single .h5ad input; found several inputs or a 10x file"
        raise InputError(msg)
    var = pd.DataFrame(index=pd.Index(table.var_names.astype(str)))
    var[_keys.VAR_SELECTED] = selected
    obs = table.read_obs() if obs is None else obs
    if clusters is not None:
        labels = np.asarray(clusters).astype(str)
        obs[_keys.OBS_CLUSTER] = pd.Categorical(labels, categories=sorted(set(labels), key=_natural))
    for name, values in (obs_columns or {}).items():
        obs[name] = values
    import anndata as ad  # here, not at import: 0.5 s that runs without outputs (and --help) need not pay

    with warnings.catch_warnings():  # non-unique cell names: already said by read_obs, in one line
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        adata = ad.AnnData(obs=obs, var=var)
    adata.obsm[_keys.OBSM_H] = H
    if H_norm is not None:
        adata.obsm[_keys.OBSM_H_NORM] = np.asarray(H_norm, dtype=np.float32)
    if umap is not None:
        adata.obsm[_keys.OBSM_UMAP] = np.asarray(umap, dtype=np.float32)
    adata.varm[_keys.VARM_W] = W
    adata.uns[_keys.UNS] = uns
    if is_zarr_path(path):
        with atomic_output_dir(path) as tmp:
            _write_zarr(adata, tmp, table.single_h5ad if copy_x else None)
        return
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp)
        if copy_x:
            with h5py.File(table.single_h5ad, "r") as src, h5py.File(tmp, "r+") as dst:
                if "X" in dst:
                    del dst["X"]
                src.copy(src["X"], dst, name="X")


def _write_zarr(adata, store: Path, counts_from: Path | None) -> None:
    """Write ``adata`` as a zarr store; with ``counts_from``, its ``X`` is copied in one row chunk at a time."""
    with warnings.catch_warnings():  # zarr v2 stays the widest-read format; anndata's notice is not the user's concern
        warnings.filterwarnings("ignore", message="Writing zarr v2 data")
        if counts_from is None:
            adata.write_zarr(store)
            return
        from anndata.experimental import read_elem_lazy

        with h5py.File(counts_from, "r") as src:
            # CSC counts are copied in column chunks of anndata's choosing (a row chunk of CSC is all of it).
            csc = src["X"].attrs.get("encoding-type", "") == "csc_matrix"
            adata.X = read_elem_lazy(src["X"], chunks=None if csc else (_COPY_ROWS, -1))
            adata.write_zarr(store)


#: Rows per chunk when ``--copy-x`` writes the counts into a zarr store (about 50 MB of a 10 %-dense 30k-gene CSR).
_COPY_ROWS = 20000


def _natural(label: str):
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)
