"""Streaming reader for 10x Genomics Cell Ranger ``.h5`` matrices (v3 ``matrix/`` and v2 per-genome layouts)."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .._errors import InputError
from .._source import Source, check_indices, check_range, check_values
from ._checks import (
    check_compressed,
    expect_length,
    read_shape,
    require_array,
    require_group,
)
from ._h5 import (
    detect_format,
    duplicates,
    make_unique,
    open_h5,
    read_strings,
    tenx_v2_genomes,
)
from ._h5ad import check_numeric
from ._rows import CsrRows, read_rows

logger = logging.getLogger(__name__)

GENE_EXPRESSION = "Gene Expression"


def tenx_layout(h5, genome: str | None = None, *, first_genome: bool = False) -> dict:
    """Locate the matrix of a 10x file and the features to keep.

    Returns a dict with ``format`` ("10x-v3"/"10x-v2"), ``group`` (h5py group), ``genomes`` (all genomes
    found, list of str), ``names`` and ``ids`` (str arrays over all features, ids may be None) and
    ``keep`` (bool array over features, or None to keep all). Raises :class:`InputError` when several
    genomes are present and ``genome`` does not pick one (unless ``first_genome``: then the first), or when a feature array is missing, not 1-D
    strings, or of another length than the names.
    """
    path = h5.filename
    fmt = detect_format(h5)
    if fmt == "10x-v3":
        group = require_group(h5, "matrix")
        features = require_group(group, "features")
        names = _feature_strings(features, "name")
        ids = _feature_strings(features, "id", len(names)) if "id" in features else None
        keep = np.ones(len(names), dtype=bool)
        if "feature_type" in features:
            keep &= _feature_strings(features, "feature_type", len(names)) == GENE_EXPRESSION
        genome_of = _feature_strings(features, "genome", len(names)) if "genome" in features else None
        genomes = list(dict.fromkeys(genome_of[keep].tolist())) if genome_of is not None else []
        if genome is None and first_genome and genomes:
            genome = genomes[0]
        if len(genomes) > 1 or genome is not None:
            _check_genome(path, genomes, genome)
            if genome_of is not None:
                keep &= genome_of == (genome if genome is not None else genomes[0])
        return {"format": fmt, "group": group, "genomes": genomes, "names": names, "ids": ids, "keep": None if keep.all() else keep}
    if fmt == "10x-v2":
        genomes = tenx_v2_genomes(h5)
        if genome is None and first_genome:
            genome = genomes[0]
        if len(genomes) > 1 or genome is not None:
            _check_genome(path, genomes, genome)
        group = h5[genome if genome is not None else genomes[0]]
        names_key = "gene_names" if "gene_names" in group else "genes"
        names = _feature_strings(group, names_key)
        ids = _feature_strings(group, "genes", len(names)) if "genes" in group else None
        return {"format": fmt, "group": group, "genomes": genomes, "names": names, "ids": ids, "keep": None}
    msg = f"{path}: expected a 10x Genomics .h5, found an AnnData .h5ad (use H5adSource or open_source)"
    raise InputError(msg)


def _feature_strings(group, key: str, n: int | None = None) -> np.ndarray:
    """A 1-D string array of the features (checked: present, strings, ``n`` long when given), decoded."""
    dataset = require_array(group, key, "string")
    if n is not None:
        expect_length(dataset.shape[0], n, group, key, "values (one per feature)")
    return read_strings(dataset)


def _check_genome(path, genomes: list[str], genome: str | None) -> None:
    if genome is None:
        msg = f"{path}: found several genomes ({', '.join(genomes)}); pick one with genome="
        raise InputError(msg)
    if not genomes:
        logger.warning("%s: genome=%r ignored: the file records no genome", path, genome)
    elif genome not in genomes:
        msg = f"{path}: unknown genome {genome!r}; genomes are: {', '.join(genomes)}"
        raise InputError(msg)


class TenxH5Source(Source):
    """Stream cells x genes row blocks of a 10x Genomics Cell Ranger ``.h5`` file.

    Parameters
    ----------
    path : str or Path
    genome : str, optional
        Required when the file holds several genomes (v2 groups or v3 ``features/genome`` values).
    name : str, optional
        Dataset name; default the file stem.

    Notes
    -----
    The file stores one compressed column per cell (genes x cells CSC), which is a cells x genes
    CSR, so blocks stream directly. In v3 files with ``features/feature_type`` only "Gene Expression"
    features are kept. Duplicated gene names are made unique scanpy-style ("-1", "-2", ...) with a
    logged warning; the original names and ids are in :attr:`gene_symbols` and :attr:`gene_ids`.
    The structure is checked on open (arrays and dtypes, ``indptr`` against the shape and the stored
    values, barcodes and feature arrays against the shape), the indices of every block as it is read.
    """

    def __init__(self, path, *, genome=None, name=None):
        self.path = Path(path)
        self.name = str(name) if name is not None else self.path.stem
        self._h5 = open_h5(self.path)
        try:
            self._setup(genome)
        except BaseException:
            self.close()
            raise

    def _setup(self, genome) -> None:
        layout = tenx_layout(self._h5, genome)
        self.format, self.genomes = layout["format"], layout["genomes"]
        self.genome = genome if genome is not None else (self.genomes[0] if len(self.genomes) == 1 else None)
        group, keep = layout["group"], layout["keep"]
        self._label = f"{self.path} ({group.name})"
        data = group.get("data")
        if isinstance(data, h5py.Dataset):
            check_numeric(data.dtype, self._label)
        # Structure before any pass over the data: the declared shape against the names and the pointers.
        n_features, n_cells = read_shape(require_array(group, "shape", "integer")[()], self.path, f"{group.name}/shape")
        names, ids = layout["names"], layout["ids"]
        expect_length(len(names), n_features, group, "shape", "features (the shape's first value)")
        self._barcodes = require_array(group, "barcodes", "names")
        expect_length(self._barcodes.shape[0], n_cells, group, "barcodes", "barcodes (the shape's second value)")
        self._kept = None if keep is None else np.flatnonzero(keep)
        if self._kept is not None:
            names = names[self._kept]
            ids = ids[self._kept] if ids is not None else None
        if n_cells == 0 or len(names) == 0:
            msg = f"{self._label}: expected a non-empty matrix, found {n_cells} cells x {len(names)} genes"
            raise InputError(msg)
        indptr = check_compressed(group, n_cells, "cells")
        self.gene_symbols, self.gene_ids = names, ids
        dups = duplicates(names)
        if dups:
            logger.warning("%s: duplicated gene names made unique with -1, -2, ... suffixes (e.g. %s)", self._label, ", ".join(dups))
        self._var = make_unique(names)
        self._reader = CsrRows(group["data"], group["indices"], indptr, (n_cells, n_features))
        self._obs: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return self._reader.shape[0]

    @property
    def var_names(self) -> np.ndarray:
        return self._var

    @property
    def obs_names(self) -> np.ndarray:
        if self._obs is None:
            self._obs = read_strings(self._barcodes)
        return self._obs

    def read_block(self, start: int, stop: int) -> sp.csr_matrix:
        check_range(self, start, stop)
        try:
            block = read_rows(self._reader, None, start, stop)
        except OSError as exc:
            msg = f"{self._label}: could not read cells {start}:{stop} (damaged or truncated file?): {exc}"
            raise InputError(msg) from None
        check_indices(block.indices, block.shape[1], self._label)  # before the column selection's kernel
        if self._kept is not None:
            block = block[:, self._kept]
        block.sum_duplicates()
        check_values(block.data, self._label)
        return block

    def close(self) -> None:
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None
