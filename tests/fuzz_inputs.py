"""Input fuzzer: every HDF5 object of every input kind, mutated one at a time, through the CLI.

Each input kind (``.h5ad`` with a CSR, CSC or dense X, with the counts in a layer or in raw; 10x v3 and v2;
AnnData ``.zarr`` stores with a CSR or dense X, whose zarr groups and arrays are mutated the same way;
model files; fit checkpoints) starts from a small valid file. Every group, dataset and attribute of it is then
mutated in turn (deleted, emptied, truncated to one element, retyped to strings or to a scalar, given
out-of-range values, duplicated names or a lying shape), and ``onlinemf`` is run on the mutant in-process with
click's ``CliRunner``. For every mutant the fuzzer checks that:

* the run either succeeds correctly (exit 0, finite H for every cell) or is refused cleanly (exit status 1 or
  2, at most 3 lines on stderr, no traceback); so must ``onlinemf info`` on the mutant;
* the input file is byte-for-byte unchanged (SHA-256 before and after; a checkpoint may be consumed by a
  successful resumed run);
* a count matrix that an independent check (:func:`matrix_problem`, scipy's full CSR/CSC check and the
  declared shapes) finds structurally invalid is refused, never fitted.

Count files are fitted (``fit``); a mutated model is given to ``update``, a mutated checkpoint to
``fit --resume``. Run ``python tests/fuzz_inputs.py --all`` for the whole set (each kind in worker processes,
so that a crash is counted rather than fatal; 3 to 12 minutes on 2 busy cores; prints the count of mutants and
outcomes per kind, as quoted in docs/errors.md); ``tests/test_fuzz_inputs.py`` runs a fixed fast subset.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "kang_pbmc_rliger_tiny.h5ad"
RUN = ["--k", "2", "--epochs", "1", "--batch-size", "40", "--no-umap", "--no-cluster", "--quiet"]
MAX_STDERR_LINES = 3


# ----------------------------------------------------------------------------- valid inputs
def small_adata(n_per_batch: int = 30, n_genes: int = 50) -> ad.AnnData:
    """Cells of both conditions of the tiny Kang data, a few dozen genes, CSR float32 counts."""
    adata = ad.read_h5ad(TINY)
    adata = adata[np.r_[0:n_per_batch, 300 : 300 + n_per_batch], :n_genes].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _write_tenx(path: Path, adata: ad.AnnData, version: int) -> None:
    X = sp.csc_matrix(adata.X.T.astype(np.int32))  # genes x cells, one compressed column per cell
    barcodes = np.array([s.encode() for s in adata.obs_names])
    names = np.array([s.encode() for s in adata.var_names])
    ids = np.array([f"ENSG{j:08d}".encode() for j in range(adata.n_vars)])
    with h5py.File(path, "w") as h5:
        group = h5.create_group("matrix" if version == 3 else "GRCh38")
        group["data"], group["indices"], group["indptr"] = X.data, X.indices.astype(np.int64), X.indptr.astype(np.int64)
        group["shape"] = np.array(X.shape, dtype=np.int32)
        group["barcodes"] = barcodes
        if version == 3:
            features = group.create_group("features")
            features["id"], features["name"] = ids, names
            features["feature_type"] = np.array([b"Gene Expression"] * adata.n_vars)
            features["genome"] = np.array([b"GRCh38"] * adata.n_vars)
        else:
            group["genes"], group["gene_names"] = ids, names


@dataclass
class Input:
    """A valid input that is mutated, and how a run uses it."""

    path: Path
    args: Callable[[Path, Path], list] = field(repr=False)  # (mutant, work folder) -> CLI arguments
    element: str | None = None  # the count matrix the run reads from the file (None: the file holds no counts)
    cells: int | None = None  # result rows of a correct run, when the file holds no counts
    consumed: bool = False  # a successful run removes the file (a checkpoint)


def _fit_args(extra=()):
    def args(path, work):
        return ["fit", path, "-o", work / "res.h5ad", "--model", work / "model.h5", *RUN, *extra]

    return args


COUNT_KINDS = ["h5ad-csr", "h5ad-csc", "h5ad-dense", "h5ad-layer", "h5ad-raw", "10x-v3", "10x-v2", "zarr-csr", "zarr-dense"]
MODEL_KINDS = ["model", "checkpoint"]
KINDS = COUNT_KINDS + MODEL_KINDS


def make_inputs(folder: Path, kinds=None) -> dict[str, Input]:
    """Valid small inputs of the requested kinds (default: all), written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(KINDS if kinds is None else kinds)
    adata = small_adata()
    inputs = {}

    def h5ad(kind, a, extra=(), element="X"):
        path = folder / f"{kind}.h5ad"
        a.write_h5ad(path)
        inputs[kind] = Input(path, _fit_args(extra), element)

    # CSR runs guess the batch column (as a user who names none); the others name it (--batch-key batch).
    h5ad("h5ad-csr", adata)
    key = ["--batch-key", "batch"]
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    h5ad("h5ad-csc", csc, key)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    h5ad("h5ad-dense", dense, key)
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = np.log1p(layered.X.toarray())
    h5ad("h5ad-layer", layered, ["--layer", "counts", *key], "layers/counts")
    raw = adata.copy()
    raw.raw = raw
    raw = raw[:, :20].copy()
    raw.X = np.log1p(raw.X.toarray())
    h5ad("h5ad-raw", raw, ["--raw", *key], "raw/X")
    for version in (3, 2):
        path = folder / f"10x-v{version}.h5"
        _write_tenx(path, adata, version)
        inputs[f"10x-v{version}"] = Input(path, _fit_args(), "matrix" if version == 3 else "GRCh38")
    for kind, a in (("zarr-csr", adata), ("zarr-dense", dense)):
        if kind in wanted:
            import warnings

            path = folder / f"{kind}.zarr"
            with warnings.catch_warnings():  # anndata's note on the zarr format version it writes
                warnings.simplefilter("ignore")
                a.write_zarr(path)
            inputs[kind] = Input(path, _fit_args(key), "X")
    if wanted & set(MODEL_KINDS):
        inputs.update(_model_inputs(folder, adata))
    return {kind: value for kind, value in inputs.items() if kind in wanted}


# A fit long enough to checkpoint: 30 cells in batches of 10, 3 epochs (9 steps).
CHECKPOINTED = ["--k", "2", "--epochs", "3", "--batch-size", "10", "--no-umap", "--no-cluster", "--quiet"]


def _model_inputs(folder: Path, adata: ad.AnnData) -> dict[str, Input]:
    """A model written by a tiny fit of the ctrl cells (mutants are used by ``update`` with the stim cells),
    and a checkpoint left by a fit interrupted after its first checkpoint (mutants are resumed)."""
    from onlinemf import model_io

    ctrl, stim = folder / "ctrl.h5ad", folder / "stim.h5ad"
    adata[adata.obs["batch"] == "ctrl"].copy().write_h5ad(ctrl)
    adata[adata.obs["batch"] == "stim"].copy().write_h5ad(stim)
    n_stim = int((adata.obs["batch"] == "stim").sum())
    model = folder / "model.h5"
    result = invoke(["fit", ctrl, "-o", folder / "fit.h5ad", "--model", model, "--batch-key", "none", *RUN])
    assert result.exit_code == 0, result.output
    checkpoint = folder / "checkpoint.h5"
    save = model_io.Checkpoint.__call__

    def save_then_interrupt(self, estimator, position):  # as a Ctrl-C right after the first checkpoint
        save(self, estimator, position)
        if Path(self.path).exists():
            raise KeyboardInterrupt

    model_io.Checkpoint.__call__ = save_then_interrupt
    try:
        result = invoke(["fit", ctrl, "-o", folder / "ck.h5ad", "--model", folder / "ck_model.h5",
                         "--checkpoint", checkpoint, "--checkpoint-every", "1", "--batch-key", "none", *CHECKPOINTED])
    finally:
        model_io.Checkpoint.__call__ = save
    assert result.exit_code == 130 and checkpoint.exists(), result.output

    def update_args(path, work):
        return ["update", path, stim, "-o", work / "res.h5ad", "--model-out", work / "model2.h5", "--epochs", "1",
                "--batch-key", "none", "--no-umap", "--no-cluster", "--quiet"]

    def resume_args(path, work):
        return ["fit", ctrl, "-o", work / "res.h5ad", "--model", work / "model.h5", "--checkpoint", path, "--resume",
                "--checkpoint-every", "1", "--batch-key", "none", *CHECKPOINTED]

    return {"model": Input(model, update_args, cells=n_stim),
            "checkpoint": Input(checkpoint, resume_args, cells=len(adata) - n_stim, consumed=True)}


# ----------------------------------------------------------------------------- mutations
@dataclass
class Mutant:
    kind: str
    target: str  # HDF5 object name, or "name@attr" for an attribute
    how: str
    edit: object = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}:{self.how}"


def _replace(name, make):
    def edit(h5):
        old = h5[name]
        attrs = dict(old.attrs)
        new = make(old)
        del h5[name]
        if isinstance(new, np.ndarray) and new.dtype == object:
            h5.create_dataset(name, data=new.astype(str).astype(object), dtype=h5py.string_dtype())
        else:
            h5[name] = new
        for key, value in attrs.items():
            h5[name].attrs[key] = value

    return edit


def _delete(name):
    def edit(h5):
        del h5[name]

    return edit


def _dataset_mutations(name: str, dataset: h5py.Dataset):
    shape, dtype = dataset.shape, dataset.dtype
    is_string = h5py.check_string_dtype(dtype) is not None or dtype.kind in "SUO"
    yield "delete", _delete(name)
    if dataset.ndim == 0:
        yield "to 1-D", _replace(name, lambda d: np.atleast_1d(d[()]))
        yield "to number" if is_string else "to string", _replace(name, lambda d: np.array(7) if is_string else np.bytes_("x"))
        return
    yield "empty", _replace(name, lambda d: d[()][:0])
    if shape[0] > 1:
        yield "one element", _replace(name, lambda d: d[()][:1])
        yield "drop last", _replace(name, lambda d: d[()][:-1])
    yield "strings", _replace(name, lambda d: np.full(d.shape, b"12"))
    yield "scalar", _replace(name, lambda d: np.array(d[()].ravel()[0]) if d.size else np.array(0))
    if is_string:
        yield "duplicates", _replace(name, lambda d: np.full(d.shape, d[()].ravel()[0]) if d.size else d[()])
        yield "numbers", _replace(name, lambda d: np.arange(d.size).reshape(d.shape))
        return
    if dtype.kind in "iuf" and dataset.size:
        def set_middle(value):
            def make(d):
                values = d[()].copy()
                flat = values.reshape(-1)
                flat[flat.size // 2] = value(flat)
                return values
            return make

        yield "too large", _replace(name, set_middle(lambda v: np.iinfo(v.dtype).max if v.dtype.kind in "iu" else v.max() * 1e6 + 1e6))
        yield "max + 1", _replace(name, set_middle(lambda v: v.max() + 1))
        if dtype.kind in "if":
            yield "negative", _replace(name, set_middle(lambda v: -1))
        if dtype.kind == "f":
            yield "NaN", _replace(name, set_middle(lambda v: np.nan))
        yield "float", _replace(name, lambda d: d[()].astype(np.float64) + 0.5)
        yield "2-D", _replace(name, lambda d: d[()].reshape(1, -1))


def _attr_mutations(name: str, key: str, value):
    def delete(h5):
        del h5[name].attrs[key]

    def set_to(new):
        def edit(h5):
            h5[name].attrs[key] = new

        return edit

    yield "delete", delete
    yield "bogus string", set_to("bogus")
    yield "number", set_to(3)
    array = np.asarray(value)
    if array.dtype.kind in "iu" and array.size:
        doubled, halved = array.copy(), array.copy()
        doubled.reshape(-1)[0] = doubled.reshape(-1)[0] * 2 + 1
        halved.reshape(-1)[-1] = halved.reshape(-1)[-1] // 2
        yield "lying (larger)", set_to(doubled)
        yield "lying (smaller)", set_to(halved)
        yield "negative", set_to(-array)
        yield "huge", set_to(np.full_like(array, 10**12, dtype=np.int64))
    if isinstance(value, str | bytes) and key == "encoding-type":
        swaps = {"csr_matrix": "csc_matrix", "csc_matrix": "csr_matrix", "categorical": "string-array", "dataframe": "dict"}
        text = value.decode() if isinstance(value, bytes) else value
        if text in swaps:
            yield f"as {swaps[text]}", set_to(swaps[text])


def mutants(kind: str, path: Path):
    """Every mutation of every object and attribute of ``path``."""
    if path.is_dir():
        return _zarr_mutants(kind, path)
    items = []
    with h5py.File(path, "r") as h5:
        items.append(("/", h5, None))
        h5.visititems(lambda name, obj: items.append((name, obj, None)))
        described = [(name, obj.__class__, obj.shape if isinstance(obj, h5py.Dataset) else None,
                      dict(obj.attrs)) for name, obj, _ in items]
        datasets = {name: h5[name] for name, cls, _, _ in described if cls is h5py.Dataset}
        out = []
        for name, cls, _, attrs in described:
            if name != "/":
                if cls is h5py.Dataset:
                    out.extend(Mutant(kind, name, how, edit) for how, edit in _dataset_mutations(name, datasets[name]))
                else:
                    out.append(Mutant(kind, name, "delete", _delete(name)))
                    out.append(Mutant(kind, name, "as dataset", _replace(name, lambda g: np.arange(3))))
            for key, value in attrs.items():
                out.extend(Mutant(kind, f"{name}@{key}", how, edit) for how, edit in _attr_mutations(name, key, value))
    return out


def apply(mutant: Mutant, base: Path, path: Path) -> bool:
    """Write ``mutant`` of ``base`` to ``path``; False when the mutation does not apply to this object."""
    if base.is_dir():
        import zarr

        shutil.copytree(base, path)
        try:
            mutant.edit(path)
            if (path / ".zmetadata").exists():  # anndata consolidates the store's metadata: keep it true
                zarr.consolidate_metadata(str(path))
        except (TypeError, ValueError, KeyError, OSError, IndexError):
            return False
        return True
    shutil.copyfile(base, path)
    try:
        with h5py.File(path, "r+") as h5:
            mutant.edit(h5)
    except (TypeError, ValueError, KeyError, OSError, IndexError):
        return False
    return True


# ----------------------------------------------------------------------------- zarr stores
def _zarr_group(store: Path):
    import zarr

    return zarr.open_group(str(store), mode="r+")


def _zarr_replace(name: str, make):
    """Replace array ``name`` by ``make(values)``: its folder is removed (chunks and all), then written anew."""
    def edit(store: Path):
        old = _zarr_group(store)[name]
        attrs, values = dict(old.attrs), np.asarray(make(old[...]))
        shutil.rmtree(store / name)
        new = _zarr_group(store).create_array(name, data=values)
        new.attrs.update(attrs)

    return edit


def _zarr_delete(name: str):
    def edit(store: Path):
        shutil.rmtree(store / name)

    return edit


def _zarr_attr(name: str, key: str, value=None, *, delete=False):
    def edit(store: Path):
        node = _zarr_group(store)[name] if name else _zarr_group(store)
        if delete:
            del node.attrs[key]
        else:
            node.attrs[key] = value

    return edit


def _zarr_mutants(kind: str, store: Path) -> list[Mutant]:
    """Delete, empty, cut, retype and give out-of-range values to every array, delete or falsify every attribute."""
    import zarr

    root = zarr.open_group(str(store), mode="r")
    out = []
    for name, node in [("", root), *sorted(root.members(max_depth=None))]:
        if name:
            out.append(Mutant(kind, name, "delete", _zarr_delete(name)))
        if name and isinstance(node, zarr.Array) and node.ndim >= 1 and node.shape[0] > 0:
            out.append(Mutant(kind, name, "empty", _zarr_replace(name, lambda v: v[:0])))
            if node.shape[0] > 1:
                out.append(Mutant(kind, name, "one element", _zarr_replace(name, lambda v: v[:1])))
                out.append(Mutant(kind, name, "drop last", _zarr_replace(name, lambda v: v[:-1])))
            out.append(Mutant(kind, name, "strings", _zarr_replace(name, lambda v: np.full(v.shape, "12"))))
            if np.dtype(node.dtype.to_native_dtype() if hasattr(node.dtype, "to_native_dtype") else node.dtype).kind in "iuf":
                def set_middle(value):
                    def make(v):
                        v = np.array(v)
                        v.reshape(-1)[v.size // 2] = value(v)
                        return v
                    return make

                out.append(Mutant(kind, name, "max + 1", _zarr_replace(name, set_middle(lambda v: v.max() + 1))))
                out.append(Mutant(kind, name, "negative", _zarr_replace(name, set_middle(lambda v: -1))))
                out.append(Mutant(kind, name, "float", _zarr_replace(name, lambda v: v.astype(np.float64) + 0.5)))
        for key, value in dict(node.attrs).items():
            target = f"{name}@{key}"
            out.append(Mutant(kind, target, "delete", _zarr_attr(name, key, delete=True)))
            out.append(Mutant(kind, target, "bogus string", _zarr_attr(name, key, "bogus")))
            if key == "shape":
                out.append(Mutant(kind, target, "lying (larger)", _zarr_attr(name, key, [int(value[0]) * 2 + 1, int(value[1])])))
    return out


def _zarr_matrix_problem(store: Path, element: str) -> str | None:
    """As :func:`matrix_problem`, for the CSR or dense X of an AnnData zarr store."""
    import zarr

    try:
        root = zarr.open_group(str(store), mode="r")
        node = root[element]
        n_var = root["var"][root["var"].attrs.get("_index", "_index")].shape[0]
        n_obs = root["obs"][root["obs"].attrs.get("_index", "_index")].shape[0]
        if isinstance(node, zarr.Array):
            data = np.asarray(node[...])
            if data.ndim != 2:
                return "not 2-D"
            shape = data.shape
        else:
            if node.attrs["encoding-type"] != "csr_matrix":
                return "not CSR"
            shape = tuple(int(v) for v in node.attrs["shape"])
            matrix = sp.csr_matrix((node["data"][...], node["indices"][...], node["indptr"][...]), shape=shape)
            matrix.check_format(full_check=True)
            data = matrix.data
        if shape != (n_obs, n_var):
            return f"shape {shape} vs names ({n_obs}, {n_var})"
        if data.dtype.kind not in "biuf":
            return f"dtype {data.dtype}"
        data = data.astype(np.float64)
        if not np.isfinite(data).all() or (data < 0).any():
            return "values not finite and non-negative"
    except Exception as exc:  # noqa: BLE001 - anything unreadable is invalid
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- independent oracle
def matrix_problem(path: Path, kind: str, element: str) -> str | None:
    """Why the count matrix a run of ``kind`` reads from ``path`` is structurally invalid, or None.

    Independent of onlinemf's readers: scipy's full format check of the compressed arrays, the declared
    shape against the arrays and the cell/gene names, numeric, finite, non-negative values.
    """
    if path.is_dir():
        return _zarr_matrix_problem(path, element)
    try:
        with h5py.File(path, "r") as h5:
            if kind.startswith("10x"):
                group = h5[element]
                n_genes, n_cells = (int(v) for v in group["shape"][()])
                names = group["features/name"] if kind == "10x-v3" else group.get("gene_names", group.get("genes"))
                if len(names) != n_genes or len(group["barcodes"]) != n_cells:
                    return "names disagree with the shape"
                matrix = sp.csc_matrix((group["data"][()], group["indices"][()], group["indptr"][()]), shape=(n_genes, n_cells))
            else:
                node = h5[element]
                var = h5["raw/var" if element == "raw/X" else "var"]
                n_var = len(var[var.attrs.get("_index", "_index")])
                n_obs = len(h5["obs"][h5["obs"].attrs.get("_index", "_index")])
                if isinstance(node, h5py.Dataset):
                    if node.ndim != 2:
                        return "not 2-D"
                    values = node[()]
                    shape = values.shape
                    data = values.ravel()
                else:
                    encoding = node.attrs["encoding-type"]
                    shape = tuple(int(v) for v in node.attrs["shape"])
                    cls = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix}[encoding]
                    matrix = cls((node["data"][()], node["indices"][()], node["indptr"][()]), shape=shape)
                    matrix.check_format(full_check=True)
                    data = matrix.data
                if shape != (n_obs, n_var):
                    return f"shape {shape} vs names ({n_obs}, {n_var})"
                matrix = None
            if matrix is not None:
                matrix.check_format(full_check=True)
                data = matrix.data
            if data.dtype.kind not in "biuf":
                return f"dtype {data.dtype}"
            data = data.astype(np.float64)
            if not np.isfinite(data).all() or (data < 0).any() or (data > np.finfo(np.float32).max).any():
                return "values not finite and non-negative"
    except Exception as exc:  # noqa: BLE001 - anything unreadable is invalid
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- running
def digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's (a zarr store) relative paths and file bytes."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class Outcome:
    mutant: str
    status: str  # "ran", "refused", or a failure: "traceback", "noisy", "bad exit", "input changed", "fitted invalid", "wrong result"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in ("ran", "refused")


def invoke(args):
    from click.testing import CliRunner
    from onlinemf.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def judge(label: str, args: list, input_path: Path, expected_cells: int | None, problem: str | None, output: Path,
          *, consumed: bool = False) -> Outcome:
    """Run the CLI with ``args`` and classify what happened."""
    before = digest(input_path)
    result = invoke(args)
    if not (consumed and result.exit_code == 0 and not input_path.exists()) and digest(input_path) != before:
        return Outcome(label, "input changed")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception)).strip().splitlines()
        return Outcome(label, "traceback", " | ".join(tb[-2:]))
    if "Traceback" in result.output:
        return Outcome(label, "traceback", result.output.strip().splitlines()[-1])
    if result.exit_code == 0:
        if problem is not None:
            return Outcome(label, "fitted invalid", problem)
        if expected_cells is not None:
            H = ad.read_h5ad(output).obsm["X_inmf"]
            if H.shape[0] != expected_cells or not np.isfinite(H).all():
                return Outcome(label, "wrong result", f"H {H.shape}, finite: {np.isfinite(H).all()}")
        return Outcome(label, "ran", stderr.strip().replace("\n", " | "))
    lines = stderr.strip().splitlines()
    if result.exit_code not in (1, 2):
        return Outcome(label, "bad exit", f"{result.exit_code}: {stderr.strip()}")
    if len(lines) > MAX_STDERR_LINES:
        return Outcome(label, "noisy", " | ".join(lines))
    return Outcome(label, "refused", lines[-1] if lines else "")


def run_mutant(mutant: Mutant, source: Input, work: Path) -> Outcome | None:
    """Apply ``mutant`` to a copy of ``source`` in ``work``, run the CLI on it and judge; None if it does not apply."""
    path = work / f"mutant{source.path.suffix}"
    if not apply(mutant, source.path, path):
        if path.is_dir():
            shutil.rmtree(path)
        return None
    problem = matrix_problem(path, mutant.kind, source.element) if source.element else None
    try:
        # `onlinemf info` too (files; it takes no zarr store yet): a summary (it reads no matrix, so an invalid
        # one may be described) or a clean refusal
        described = None if path.is_dir() else judge(mutant.label, ["info", path], path, None, None, work / "res.h5ad")
        if described is not None and described.failed:
            described.status += " (info)"
            return described
        cells = source.cells if source.element is None else (None if problem else _cells(path, mutant.kind, source.element))
        return judge(mutant.label, source.args(path, work), path, cells, problem, work / "res.h5ad", consumed=source.consumed)
    finally:
        for p in work.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)


def _cells(path: Path, kind: str, element: str) -> int:
    if path.is_dir():
        import zarr

        node = zarr.open_group(str(path), mode="r")[element]
        return node.shape[0] if isinstance(node, zarr.Array) else int(node.attrs["shape"][0])
    with h5py.File(path, "r") as h5:
        if kind.startswith("10x"):
            return int(h5[element]["shape"][1])
        node = h5[element]
        return node.shape[0] if isinstance(node, h5py.Dataset) else int(node.attrs["shape"][0])


def fuzz(kinds: list[str] | None = None, *, every: int = 1, log=None) -> list[Outcome]:
    """Run every ``every``-th mutant of each input kind in this process; one outcome per mutant that applied."""
    with tempfile.TemporaryDirectory(prefix="onlinemf-fuzz-") as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        outcomes = []
        for kind, source in make_inputs(root / "inputs", kinds).items():
            for mutant in mutants(kind, source.path)[::every]:
                outcome = run_mutant(mutant, source, work)
                if outcome is not None:
                    outcomes.append(outcome)
                    if log is not None:
                        log(outcome)
        return outcomes


def _worker(kind: str, start: int, every: int, only: str | None = None) -> None:
    """Run mutants ``start, start + every, ...`` of ``kind``, printing one JSON line per mutant (index first)."""
    with tempfile.TemporaryDirectory(prefix="onlinemf-fuzz-") as tmp:
        root = Path(tmp)
        source = make_inputs(root / "inputs", [kind])[kind]
        work = root / "work"
        work.mkdir()
        all_mutants = mutants(kind, source.path)
        for index in range(start, len(all_mutants), every):
            if only is not None and only not in all_mutants[index].label:
                continue
            outcome = run_mutant(all_mutants[index], source, work)
            record = {"index": index, "label": all_mutants[index].label}
            if outcome is not None:
                record.update(status=outcome.status, detail=outcome.detail)
            print(json.dumps(record), flush=True)


def fuzz_isolated(kinds: list[str], *, every: int = 1, only: str | None = None, log=None) -> list[Outcome]:
    """As :func:`fuzz`, in worker processes: a mutant that kills the process (a segfault in a C kernel fed
    out-of-range indices, say) is recorded as "crashed" and the next worker carries on after it."""
    outcomes = []
    for kind in kinds:
        start = 0
        while True:
            command = [sys.executable, __file__, "--worker", kind, "--start", str(start), "--every", str(every)]
            proc = subprocess.run([*command, *(["--only", only] if only else [])], capture_output=True, text=True, check=False)
            last = start - every
            for line in proc.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                last = record["index"]
                if "status" in record:
                    outcomes.append(Outcome(record["label"], record["status"], record["detail"]))
                    if log is not None:
                        log(outcomes[-1])
            if proc.returncode == 0:
                break
            crashed = last + every
            label = f"{kind}:mutant #{crashed}"
            outcomes.append(Outcome(label, "crashed", f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"))
            if log is not None:
                log(outcomes[-1])
            start = crashed + every
    return outcomes


def summarise(outcomes: list[Outcome]) -> str:
    counts = collections.defaultdict(collections.Counter)
    for o in outcomes:
        counts[o.mutant.split(":")[0]][o.status] += 1
    statuses = sorted({s for c in counts.values() for s in c}, key=lambda s: (s not in ("ran", "refused"), s))
    lines = ["| kind | mutants | " + " | ".join(statuses) + " |", "|---|---|" + "---|" * len(statuses)]
    for kind, c in counts.items():
        lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c[s]) for s in statuses) + " |")
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    lines.append(f"| all | {sum(total.values())} | " + " | ".join(str(total[s]) for s in statuses) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every mutant (default: every 7th)")
    parser.add_argument("--kind", action="append", choices=KINDS, help="only these input kinds (repeatable)")
    parser.add_argument("--only", help="only mutants whose label (KIND:OBJECT:MUTATION) contains this text")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every outcome, not only failures")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--every", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    every = args.every or (1 if args.all else 7)
    if args.worker:
        _worker(args.worker, args.start, every, args.only)
        return 0
    t0 = time.perf_counter()

    def log(outcome):
        if args.verbose or outcome.failed:
            print(f"{outcome.status:15s} {outcome.mutant}  {outcome.detail[:300]}", flush=True)

    outcomes = fuzz_isolated(args.kind or KINDS, every=every, only=args.only, log=log)
    print(summarise(outcomes))
    print(f"{len(outcomes)} mutants, {sum(o.failed for o in outcomes)} failures, {time.perf_counter() - t0:.0f} s")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
