"""Fast subset of the input fuzzer (tests/fuzz_inputs.py; the whole set: ``python tests/fuzz_inputs.py --all``).

Each mutant is one HDF5 object of a valid small input damaged in one way; the run must be refused cleanly
(exit 1 or 2, at most 3 stderr lines, no traceback) or succeed correctly, leave the input unchanged, and never
fit a structurally invalid count matrix.
"""

import fuzz_inputs as F
import pytest

# (kind, object, mutation) -> expected outcome. Chosen to cover each check: pointers, indices (per block,
# also in the CSC conversion and before a 10x feature selection), declared shapes, names, dtypes, categorical
# codes of the batch column, an unused damaged obs column.
SUBSET = {
    ("h5ad-csr", "X/indices", "max + 1"): "refused",
    ("h5ad-csr", "X/indptr", "too large"): "refused",
    ("h5ad-csr", "X/data", "drop last"): "refused",
    ("h5ad-csr", "X@shape", "lying (smaller)"): "refused",
    ("h5ad-csr", "obs/batch/codes", "max + 1"): "ran",  # batch column guessed: a damaged one is not a candidate
    ("h5ad-csc", "obs/batch/codes", "max + 1"): "refused",  # --batch-key batch
    ("h5ad-csr", "obs/rliger_leiden/codes", "too large"): "ran",
    ("h5ad-csc", "X/indices", "negative"): "refused",
    ("h5ad-csc", "X@encoding-type", "as csr_matrix"): "refused",
    ("h5ad-dense", "X", "strings"): "refused",
    ("h5ad-layer", "layers/counts/indptr", "one element"): "refused",
    ("h5ad-raw", "raw/var/_index", "one element"): "refused",
    ("10x-v3", "matrix/barcodes", "one element"): "refused",
    ("10x-v3", "matrix/features/name", "delete"): "refused",
    ("10x-v3", "matrix/indices", "max + 1"): "refused",
    ("10x-v2", "GRCh38/shape", "max + 1"): "refused",
    ("zarr-csr", "X/indices", "max + 1"): "refused",
    ("zarr-csr", "X/indices", "drop last"): "refused",  # the .h5ad reader's structural checks, on zarr arrays
    ("zarr-csr", "X/indptr", "delete"): "refused",
    ("zarr-csr", "X@shape", "delete"): "refused",
    ("zarr-csr", "obs/batch/codes", "max + 1"): "refused",  # --batch-key batch: anndata's failure as one line
    ("zarr-csr", "obs/rliger_leiden/codes", "max + 1"): "ran",  # an unused damaged column: left out of obs
    ("zarr-csr", "var/_index@encoding-type", "bogus string"): "refused",
    ("zarr-dense", "X", "strings"): "refused",
    ("zarr-dense", "obs/_index", "drop last"): "refused",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return {kind: (source, {(m.target, m.how): m for m in F.mutants(kind, source.path)})
            for kind, source in F.make_inputs(folder / "inputs", F.COUNT_KINDS).items()}


def test_valid_inputs_run_and_pass_the_oracle(inputs, tmp_path):
    for kind, (source, _) in inputs.items():
        assert F.matrix_problem(source.path, kind, source.element) is None
        outcome = F.judge(kind, source.args(source.path, tmp_path), source.path, F._cells(source.path, kind, source.element),
                          None, tmp_path / "res.h5ad")
        assert outcome.status == "ran", outcome


def test_every_object_is_mutated(inputs):
    import zarr

    for kind, (source, mutants) in inputs.items():
        targets = {target.split("@")[0] for target, _ in mutants}
        if source.path.is_dir():
            names = {name for name, _ in zarr.open_group(str(source.path), mode="r").members(max_depth=None)}
        else:
            with F.h5py.File(source.path, "r") as h5:
                names = set()
                h5.visit(names.add)
        assert names <= targets, (kind, names - targets)


@pytest.mark.parametrize(("kind", "target", "how"), list(SUBSET))
def test_mutant(inputs, tmp_path, kind, target, how):
    source, mutants = inputs[kind]
    work = tmp_path / "work"
    work.mkdir()
    outcome = F.run_mutant(mutants[target, how], source, work)
    assert outcome is not None and not outcome.failed, outcome
    assert outcome.status == SUBSET[kind, target, how], outcome


MODEL_SUBSET = {
    ("model", "W", "NaN"): "refused",
    ("model", "datasets/0@n_cells", "bogus string"): "refused",
    ("model", "datasets/0/B", "negative"): "refused",
    ("model", "var_names", "duplicates"): "refused",
    ("checkpoint", "datasets/0@name", "bogus string"): "refused",
    ("checkpoint", "/@checkpoint", "number"): "refused",
    ("checkpoint", "/@n_steps", "lying (larger)"): "ran",
}


@pytest.fixture(scope="module")
def model_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_models")
    return {kind: (source, {(m.target, m.how): m for m in F.mutants(kind, source.path)})
            for kind, source in F.make_inputs(folder / "inputs", F.MODEL_KINDS).items()}


@pytest.mark.parametrize(("kind", "target", "how"), list(MODEL_SUBSET))
def test_model_mutant(model_inputs, tmp_path, kind, target, how):
    source, mutants = model_inputs[kind]
    work = tmp_path / "work"
    work.mkdir()
    outcome = F.run_mutant(mutants[target, how], source, work)
    assert outcome is not None and not outcome.failed, outcome
    assert outcome.status == MODEL_SUBSET[kind, target, how], outcome
