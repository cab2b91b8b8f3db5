"""Catalogue of bad inputs and misuses, through the CLI (see docs/errors.md).

Every refusal is checked the same way (:func:`refused`): non-zero exit status, no traceback (exceptions are not
caught by the runner, so any would fail the test), exactly one ``Error:`` line naming the input and what was
wrong, and the test folder byte-for-byte as before: inputs unchanged, no output and no temporary file left
(the system temp folder is redirected into the test folder, so CSC conversions and caches count too).
"""

import os
import pickle
import re
import shutil
import tempfile
import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import _badfiles as B
from onlinemf import ModelError, load_model
from onlinemf.cli import main

FAST = B.FAST
QUIET = ["--no-umap", "--no-cluster", "--quiet"]


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused(folder, args, *patterns, status=1):
    """Run the CLI, expect a clean refusal, and that ``folder`` is exactly as before."""
    before = B.snapshot(folder)
    result = invoke(args)
    out = result.output
    assert result.exit_code == status, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    for pattern in patterns:
        assert re.search(pattern, errors[0]), errors[0]
    assert B.snapshot(folder) == before
    return errors[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The test folder, with the system temp folder inside it (so stray temporaries are seen)."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    return tmp_path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model fitted on the ctrl half of the tiny Kang data, and the stim half as a new dataset."""
    folder = tmp_path_factory.mktemp("fitted")
    ctrl = B.subset(folder / "ctrl.h5ad", cells=range(300))
    stim = B.subset(folder / "stim.h5ad", cells=range(300, 600))
    model = folder / "model.h5"
    result = invoke(["fit", ctrl, "-o", folder / "res.h5ad", "--model", model, *FAST])
    assert result.exit_code == 0, result.output
    return {"ctrl": ctrl, "stim": stim, "model": model, "results": folder / "res.h5ad"}


def copy_into(folder, **paths):
    """Copy the shared fixture files into the test folder (so their bytes are checked too)."""
    return {name: shutil.copy(path, folder / path.name) for name, path in paths.items()}


def fit_args(path, work, *extra):
    return ["fit", path, "-o", work / "res.h5ad", "--model", work / "model.h5", *FAST, *extra]


def _set(X, index, value):
    X[index] = value
    return X


# ----------------------------------------------------------------------------- input files
FILE_CASES = {
    "missing file": (lambda p: p, [], [r"missing_file\.h5ad: file not found"]),
    "truncated h5ad": (B.truncated, [], [r"truncated_h5ad\.h5ad: the HDF5 file is truncated"]),
    "corrupted bytes mid-file": (B.corrupted_middle, [], [r"corrupted_bytes_mid-file\.h5ad \(X\): could not read cells \d+:\d+ \(damaged or truncated file\?\)"]),
    "text file": (B.text_file, [], [r"text_file\.h5ad: expected an HDF5 file .* without an HDF5 signature"]),
    "HDF5 not AnnData": (B.hdf5_not_anndata, [], [r"expected an AnnData \.h5ad or a 10x Genomics \.h5, found an HDF5 file with top-level keys: matrix_of_something"]),
    "h5ad without X": (B.without_x, [], [r"h5ad_without_X\.h5ad: expected a matrix X, found none"]),
    "non-numeric X": (B.string_x, [], [r"non-numeric_X\.h5ad \(X\): expected numeric counts, found dtype \|S2"]),
    "negative values": (lambda p: B.with_x(p, lambda X: _set(X, (3, 4), -2)), [], [r"negative_values\.h5ad \(X\): expected non-negative counts, found a minimum of -2"]),
    "NaN": (lambda p: B.with_x(p, lambda X: _set(X, (300, 4), np.nan)), [], [r"NaN\.h5ad \(X\): expected finite counts, found NaN"]),
    "inf": (lambda p: B.with_x(p, lambda X: _set(X, (599, 4), np.inf)), [], [r"inf\.h5ad \(X\): expected finite counts, found infinite values"]),
    "float64 overflowing float32": (B.overflow_float32, [], [r"\(X\): expected finite counts, found infinite values \(or values above 3\.4e38, too large for float32\)"]),
    "duplicate gene names": (lambda p: B.subset(p, var_names=["CD3E", "CD3E", *map(str, B.tiny_adata().var_names[2:])]), [], [r"expected unique gene names, found duplicates such as CD3E"]),
    "unknown batch key": (B.tiny, ["--batch-key", "donor"], [r"unknown batch key 'donor'; obs columns are: batch, rliger_leiden"]),
    "unknown layer": (B.tiny, ["--layer", "spliced"], [r"unknown layer 'spliced'; layers are: none"]),
    "no raw": (B.tiny, ["--raw"], [r"expected a raw/X matrix \(use_raw=True\), found no raw"]),
    "batch key with one category": (lambda p: B.write_counts(p, B.tiny_adata().X, batches=["x"] * 600), ["--batch-key", "batch"], [r"expected batch key 'batch' to have at least 2 categories with cells, found one \(x\)"]),
    "one cell": (lambda p: B.subset(p, cells=[0]), [], [r"one_cell: expected at least 6 cells to learn k=6 factors, found 1; lower --k"]),
    "K larger than the cells": (lambda p: B.subset(p, cells=range(10)), ["--k", "20"], [r"K_larger_than_the_cells: expected at least 20 cells to learn k=20 factors, found 10"]),
    "K larger than the genes": (lambda p: B.subset(p, genes=range(40)), ["--k", "60"], [r"--k 60: expected at most the number of genes used \(\d+\); lower --k"]),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_input_file(work, case):
    make, extra, patterns = FILE_CASES[case]
    path = make(work / f"{case.replace(' ', '_')}.h5ad")
    refused(work, fit_args(path, work, *extra), *patterns)


def test_corrupted_file_still_opens(work):
    # The corruption is inside the data, so the error really comes from reading a block.
    path = B.corrupted_middle(work / "c.h5ad")
    assert "X" in h5py.File(path, "r")


def test_10x_several_genomes(work):
    path = B.tenx_v2_two_genomes(work / "two.h5")
    refused(work, fit_args(path, work), r"two\.h5: found several genomes \(hg19, mm10\); pick one with genome=")
    refused(work, fit_args(path, work, "--genome", "GRCh38"), r"unknown genome 'GRCh38'; genomes are: hg19, mm10")


def test_input_is_a_directory(work):
    refused(work, fit_args(work, work), r"Invalid value for 'INPUTS...'.*is a directory", status=2)


def test_genes_do_not_overlap(work):
    a = B.subset(work / "a.h5ad", cells=range(300))
    b = B.subset(work / "b.h5ad", cells=range(300, 600), var_names=[f"X{i}" for i in range(249)])
    refused(work, fit_args(a, work) + [b], r"datasets \['a', 'b'\]: expected shared gene names, found none in common")


def test_copy_x_with_several_inputs_refused_before_work(work):
    a = B.subset(work / "a.h5ad", cells=range(300))
    b = B.subset(work / "b.h5ad", cells=range(300, 600))
    refused(work, fit_args(a, work, "--copy-x") + [b], r"--copy-x: counts can be copied only from a single \.h5ad input")


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(("option", "value", "pattern"), [
    ("--lambda", "-1", r"Invalid value for '--lambda': -1\.0 is not in the range x>=0"),
    ("--batch-size", "0", r"Invalid value for '--batch-size': 0 is not in the range x>=1"),
    ("--epochs", "0", r"Invalid value for '--epochs': 0 is not in the range x>=1"),
    ("--k", "0", r"Invalid value for '--k': 0 is not in the range x>=1"),
])
def test_option_out_of_range(work, option, value, pattern):
    path = B.tiny(work / "in.h5ad")
    refused(work, ["fit", path, "-o", work / "r.h5ad", option, value], pattern, status=2)


def test_resume_without_checkpoint(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, fit_args(path, work, "--resume"), r"--resume needs --checkpoint PATH")


def test_resume_with_other_options(work):
    path = B.tiny(work / "in.h5ad")
    ckpt = work / "ck.h5"
    # A checkpoint is written by a run that stops early: simulate with a tiny fit that keeps it.
    from onlinemf.engine import OnlineINMF
    from onlinemf.model_io import write_checkpoint
    from onlinemf.readers import MemorySource

    src = MemorySource(B.tiny_adata().X[:100], name="x", var_names=[f"g{i}" for i in range(249)])
    est = OnlineINMF(6, batch_size=200, max_epochs=2, random_state=1).fit([src])
    write_checkpoint(ckpt, est, {"mode": "fit", "plan_rng_state": est._rng.bit_generator.state, "done": 1, "n_steps": 2,
                                 "acc": {}, "sources": [["x", 100]]})
    refused(work, fit_args(path, work, "--checkpoint", ckpt, "--resume", "--k", "7"),
            r"--resume: checkpoint .*ck\.h5 was written with --k 6 \(this run: 7\).*use the same options or delete the checkpoint")


# ----------------------------------------------------------------------------- outputs
def test_output_in_missing_directory(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, ["fit", path, "-o", work / "nodir" / "r.h5ad", *FAST], r"output .*r\.h5ad: the folder .*nodir does not exist")


def test_model_output_in_missing_directory(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, ["fit", path, "-o", work / "r.h5ad", "--model", work / "nodir" / "m.h5", *FAST], r"model output .*m\.h5: the folder .*nodir does not exist")


def test_checkpoint_in_missing_directory(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, fit_args(path, work, "--checkpoint", work / "nodir" / "ck.h5"), r"checkpoint .*ck\.h5: the folder .*nodir does not exist")


def test_output_in_read_only_directory(work):
    path = B.tiny(work / "in.h5ad")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        refused(work, ["fit", path, "-o", locked / "r.h5ad", *FAST], r"the folder .*locked is not writable")
    finally:
        locked.chmod(0o755)


def test_output_equal_to_input(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, ["fit", path, "-o", path, *FAST], r"output .*in\.h5ad: is also an input")
    refused(work, ["fit", path, "-o", work / "r.h5ad", "--model", path, *FAST], r"model output .*in\.h5ad: is also an input")


def test_checkpoint_equal_to_input(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, fit_args(path, work, "--checkpoint", path), r"checkpoint .*in\.h5ad: is also an input")


def test_output_is_a_directory(work):
    path = B.tiny(work / "in.h5ad")
    # -o may name a .zarr store (a folder); any other folder is refused before the work, naming what was expected
    refused(work, ["fit", path, "-o", work, *FAST], r"output .*: expected a file path, found a folder")


# ----------------------------------------------------------------------------- models
def test_model_of_another_format_version(work, fitted):
    f = copy_into(work, stim=fitted["stim"])
    model = B.edit_model(fitted["model"], work / "v99.h5", B.set_attr("format_version", 99))
    refused(work, ["project", model, f["stim"], "-o", work / "p.h5ad", *QUIET], r"v99\.h5: not a usable onlinemf model file \(format_version 99, this onlinemf reads [\d, and]+\)")


def test_model_with_disagreeing_shapes(work, fitted):
    f = copy_into(work, stim=fitted["stim"])
    model = B.edit_model(fitted["model"], work / "bad.h5", B.replace_dataset("datasets/0/V", np.ones((6, 10), dtype=np.float32)))
    refused(work, ["project", model, f["stim"], "-o", work / "p.h5ad", *QUIET], r"bad\.h5: not a usable onlinemf model file \(datasets/0/V has shape \(6, 10\), expected \(6, \d+\)\)")


def test_model_that_is_an_h5ad(work, fitted):
    f = copy_into(work, stim=fitted["stim"], res=fitted["results"])
    refused(work, ["update", f["res"], f["stim"], "-o", work / "u.h5ad", *QUIET], r"res\.h5ad: not a usable onlinemf model file \(kind is None")


def test_model_missing(work, fitted):
    f = copy_into(work, stim=fitted["stim"])
    refused(work, ["project", work / "nomodel.h5", f["stim"], "-o", work / "p.h5ad", *QUIET], r"nomodel\.h5: expected a model file, found no such file")


@pytest.mark.parametrize("command", ["update", "project"])
def test_genes_missing_for_model(work, fitted, command):
    f = copy_into(work, model=fitted["model"])
    few = B.subset(work / "few.h5ad", cells=range(300, 600), genes=range(100))
    refused(work, [command, f["model"], few, "-o", work / "o.h5ad", *QUIET], r"few: expected all \d+ genes of the model, found \d+ missing \(first: ")


def test_update_with_a_dataset_already_in_the_model(work, fitted):
    f = copy_into(work, model=fitted["model"], ctrl=fitted["ctrl"])
    refused(work, ["update", f["model"], f["ctrl"], "-o", work / "u.h5ad", "--model-out", work / "m2.h5", *QUIET],
            r"dataset name\(s\) \['ctrl'\] already exist in model .*model\.h5; rename")


def test_model_that_is_not_hdf5(work, fitted):
    f = copy_into(work, stim=fitted["stim"])
    model = B.text_file(work / "model.h5")
    refused(work, ["project", model, f["stim"], "-o", work / "p.h5ad", *QUIET], r"model\.h5: not a usable onlinemf model file \(not an HDF5 file\)")


def test_update_with_fewer_cells_than_k(work, fitted):
    f = copy_into(work, model=fitted["model"])
    one = B.subset(work / "one.h5ad", cells=[300])
    refused(work, ["update", f["model"], one, "-o", work / "u.h5ad", "--model-out", work / "m2.h5", *QUIET],
            r"one: expected at least n_components=6 cells with non-zero values, found 1")


def test_model_output_equal_to_input_model(work, fitted):
    f = copy_into(work, model=fitted["model"], stim=fitted["stim"])
    refused(work, ["update", f["model"], f["stim"], "--model-out", f["model"], "-o", work / "u.h5ad", *QUIET], r"model output .*model\.h5: is also an input")


# Hostile model files: refused from metadata, before anything is allocated, and pickle is never involved.
HOSTILE = {
    "pickled W": B.pickled_dataset("W"),
    "object dtype V": B.object_dataset("datasets/0/V"),
    "W of 1e12 x 1e12": B.replace_dataset("W", shape=(10**12, 10**12), dtype="f4", chunks=(1, 1024)),
    "B of 6 x 1e12": B.replace_dataset("datasets/0/B", shape=(6, 10**12), dtype="f4", chunks=(1, 1024)),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_refused_before_allocation(work, fitted, monkeypatch, case):
    def no_pickle(*args, **kwargs):
        raise AssertionError("a model file must never be unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    model = B.edit_model(fitted["model"], work / "hostile.h5", HOSTILE[case])
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match=r"hostile\.h5: not a usable onlinemf model file \((missing 2-D array W|.* has dtype object, expected numbers|W has an implausible shape|datasets/0/B has shape)"):
            load_model(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    assert load_model(fitted["model"]).estimator.W_.shape[0] == 6  # a good model loads without pickle
    f = copy_into(work, stim=fitted["stim"])
    refused(work, ["project", model, f["stim"], "-o", work / "p.h5ad", *QUIET], r"hostile\.h5: not a usable onlinemf model file")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_on_a_file_that_is_not_results(work):
    path = B.tiny(work / "in.h5ad")
    refused(work, ["evaluate", path], r"in\.h5ad: expected an onlinemf results \.h5ad \(with obsm\['X_inmf'\]\), found none")
    text = B.text_file(work / "notes.txt")
    refused(work, ["evaluate", text], r"notes\.txt: expected an HDF5 file")


def test_evaluate_unknown_label_key(work, fitted):
    f = copy_into(work, res=fitted["results"])
    refused(work, ["evaluate", f["res"], "--label-key", "celltype"], r"res\.h5ad: no obs column 'celltype'; columns: batch, rliger_leiden, inmf_dataset")


# ----------------------------------------------------------------------------- inputs that must work
def fit_ok(work, path, *extra):
    before = B.digest(path)
    result = invoke(fit_args(path, work, *extra))
    assert result.exit_code == 0, result.output
    assert B.digest(path) == before
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("res.h5ad", "model.h5"):  # outputs get the usual permissions, not the temporaries' 0600
        assert (work / name).stat().st_mode & 0o777 == 0o666 & ~umask
    return ad.read_h5ad(work / "res.h5ad")


def test_all_zero_cells_work(work):
    path = B.with_x(work / "zc.h5ad", lambda X: _set(X, slice(10, 20), 0))
    res = fit_ok(work, path)
    H = res.obsm["X_inmf"]
    assert np.isfinite(H).all() and np.isfinite(res.obsm["X_inmf_norm"]).all()
    assert (H[10:20] == 0).all() and (H[20:30].sum(axis=1) > 0).all()


def test_all_zero_genes_work(work):
    path = B.with_x(work / "zg.h5ad", lambda X: _set(X, (slice(None), slice(0, 5)), 0))
    res = fit_ok(work, path)
    W = res.varm["W_inmf"]
    assert np.isfinite(W).all() and np.isfinite(res.obsm["X_inmf"]).all()
    assert not res.var["inmf_selected"].to_numpy()[:5].any() and (W[:5] == 0).all()


def test_one_cell_can_be_projected(work, fitted):
    f = copy_into(work, model=fitted["model"])
    one = B.subset(work / "one.h5ad", cells=[300])
    result = invoke(["project", f["model"], one, "-o", work / "p.h5ad", *QUIET])
    assert result.exit_code == 0, result.output
    H = ad.read_h5ad(work / "p.h5ad").obsm["X_inmf"]
    assert H.shape == (1, 6) and np.isfinite(H).all() and H.sum() > 0


def test_damaged_obs_column_the_run_does_not_use_is_left_out(work):
    # rliger_leiden (cluster labels) with codes outside its categories: used by nothing, so the run finishes
    path = B.tiny(work / "in.h5ad")
    with h5py.File(path, "r+") as h5:
        codes = h5["obs/rliger_leiden/codes"]
        codes[0] = 99
    before = B.digest(path)
    result = CliRunner().invoke(main, [str(a) for a in fit_args(path, work, "--batch-key", "batch")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and re.search(r"in\.h5ad: could not read obs column 'rliger_leiden': .*\(left out of the results\)", warnings[0])
    res = ad.read_h5ad(work / "res.h5ad")
    assert "rliger_leiden" not in res.obs and list(res.obs["batch"].cat.categories) == ["ctrl", "stim"]
    assert B.digest(path) == before


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda h5: h5.__delitem__("matrix/barcodes"), r"expected a 1-D string or integer array matrix/barcodes, found none"),
    (lambda h5: (h5.__delitem__("matrix/barcodes"), h5.create_dataset("matrix/barcodes", data=[b"AAAC"])),
     r"expected 300 barcodes \(the shape's second value\) in matrix/barcodes, found 1"),
    (lambda h5: (h5.__delitem__("matrix/features/name"), h5.create_dataset("matrix/features/name", data=[b"CD3E"])),
     r"expected 266 features \(the shape's first value\) in matrix/shape, found 1"),
])
def test_10x_damaged_refused_before_work(work, edit, pattern):
    path = work / "ctrl.h5"
    shutil.copyfile(B.REPO / "data" / "kang_ctrl_300.h5", path)
    with h5py.File(path, "r+") as h5:
        edit(h5)
    refused(work, fit_args(path, work), pattern)
