"""Model files: round trip, atomic writes, and refusal of unusable or hostile files."""

import json
import tracemalloc

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from onlinemf import InputError, ModelError
from onlinemf.engine import OnlineINMF
from onlinemf.model_io import FORMAT_VERSION, Checkpoint, load_model, save_model
from onlinemf.readers import MemorySource


@pytest.fixture(scope="module")
def fitted():
    data = [MemorySource(sp.random(300, 50, density=0.3, random_state=np.random.RandomState(i), format="csr"),
                         name=f"batch/{i}", var_names=[f"g{j}" for j in range(50)]) for i in range(2)]
    est = OnlineINMF(5, batch_size=100, max_epochs=2, chunk_size=40, random_state=2).fit(data)
    est.frozen_.add("batch/0")
    return est


@pytest.fixture
def model_file(tmp_path, fitted):
    path = tmp_path / "model.h5"
    save_model(path, fitted, scaling={"batch/0": np.arange(50.0)}, info={"genes": "union", "n": 3})
    return path


def test_round_trip(model_file, fitted):
    est = fitted
    saved = load_model(model_file)
    new = saved.estimator
    assert isinstance(new, OnlineINMF) and new.get_params() == est.get_params()
    np.testing.assert_array_equal(new.W_, est.W_)
    for key in ("V_", "A_", "B_", "A_old_", "B_old_"):
        for name in est.dataset_names_:
            np.testing.assert_array_equal(getattr(new, key)[name], getattr(est, key)[name])
    assert new.dataset_names_ == est.dataset_names_ == ["batch/0", "batch/1"]
    assert new.frozen_ == {"batch/0"}
    assert new.n_cells_ == est.n_cells_ and new.n_batches_ == est.n_batches_
    assert new.n_steps_ == est.n_steps_ and new.n_epochs_ == est.n_epochs_
    assert new.objective_ == est.objective_
    assert list(new.var_names_in_) == [f"g{j}" for j in range(50)]
    assert new._rng.bit_generator.state == est._rng.bit_generator.state
    np.testing.assert_array_equal(saved.scaling["batch/0"], np.arange(50.0))
    assert saved.info == {"genes": "union", "n": 3}
    assert [p.name for p in model_file.parent.iterdir()] == ["model.h5"]  # no temporary left
    with h5py.File(model_file) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(f.attrs["rng_state"])["bit_generator"] == "PCG64"


def test_save_errors(tmp_path, fitted):
    with pytest.raises(InputError, match="not fitted"):
        save_model(tmp_path / "x.h5", OnlineINMF())
    with pytest.raises(InputError, match="info: expected JSON-able"):
        save_model(tmp_path / "x.h5", fitted, info={"a": object()})
    with pytest.raises(InputError, match="Checkpoint.every"):
        Checkpoint(tmp_path / "c.h5", every=0)
    assert not list(tmp_path.iterdir())


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(f, key, data=None, **kw):
    del f[key]
    f.create_dataset(key, data=data, **kw)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda f: f.attrs.__setitem__("format_version", 3), "format_version 3"),
    (lambda f: f.attrs.__setitem__("kind", "something"), "kind is 'something'"),
    (lambda f: _replace(f, "datasets/1/V", np.ones((5, 49))), r"datasets/1/V has shape \(5, 49\), expected \(5, 50\)"),
    (lambda f: _replace(f, "datasets/0/A", np.ones((4, 4))), r"datasets/0/A has shape"),
    (lambda f: _replace(f, "W", np.ones((6, 50))), "W has 6 factors but n_components is 5"),
    (lambda f: _replace(f, "var_names", np.array([b"a"] * 3)), r"var_names has shape \(3,\)"),
    (lambda f: f.attrs.__setitem__("params", json.dumps({"lam": -1})), "The 'lam' parameter"),
    (lambda f: f.attrs.__setitem__("params", "{not json"), "params"),
    (lambda f: f.attrs.__setitem__("rng_state", json.dumps({"bit_generator": "Nope"})), "rng_state"),
    (lambda f: f.__delitem__("datasets/0/B"), "missing array datasets/0/B"),
])
def test_load_refuses_inconsistent_files(model_file, edit, match):
    _edit(model_file, edit)
    with pytest.raises(ModelError, match=match):
        load_model(model_file)


def test_load_refuses_non_models(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not an HDF5 file"):
        load_model(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("X", data=np.ones(3))
    with pytest.raises(ModelError, match="kind is None"):
        load_model(other)
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "missing.h5")


@pytest.mark.parametrize("key", ["W", "datasets/0/B"])
def test_hostile_huge_shape_is_refused_without_allocating(model_file, key):
    # A chunked dataset with an absurd shape takes no space on disk; reading it would need TBs.
    _edit(model_file, lambda f: _replace(f, key, shape=(5, 10**11), dtype="f4", chunks=(1, 1024)))
    tracemalloc.start()
    with pytest.raises(ModelError, match="implausible shape|has shape"):
        load_model(model_file)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20
