"""onlinemf.tl.integrate behaves like scanpy's tools: named slots, nothing replaced unasked, copy/return_model."""

import inspect
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from onlinemf import InputError, OnlineINMF, _keys, pipelines, postprocess, tl

TINY = Path(__file__).resolve().parents[1] / "data" / "kang_pbmc_rliger_tiny.h5ad"
FAST = {"k": 5, "epochs": 1, "batch_size": 200}


@pytest.fixture(scope="module")
def tiny():
    return ad.read_h5ad(TINY)


@pytest.fixture
def adata(tiny):
    return tiny.copy()


@pytest.fixture
def fake_post(monkeypatch):
    """Leiden and UMAP replaced by cheap stand-ins that record their seed (no numba compilation in tests)."""
    seeds = {}

    def leiden(X, *, resolution=1.0, random_state=None, **kw):
        seeds["leiden"] = random_state
        return (np.asarray(X).argmax(axis=1) % 3).astype(int)

    def umap(X, *, random_state=None, **kw):
        seeds["umap"] = random_state
        return np.asarray(X)[:, :2].astype(np.float32)

    monkeypatch.setattr(postprocess, "cluster_leiden", leiden)
    monkeypatch.setattr(postprocess, "run_umap", umap)
    monkeypatch.setattr(pipelines, "usable_cores", lambda: 1)  # UMAP in this process, where the patch is seen
    return seeds


def slot_names(a: ad.AnnData) -> set[tuple[str, str]]:
    return ({("obsm", k) for k in a.obsm} | {("varm", k) for k in a.varm} | {("uns", k) for k in a.uns}
            | {("obs", k) for k in a.obs.columns} | {("var", k) for k in a.var.columns})


def test_default_slots_and_input_untouched(adata, fake_post):
    X_before = adata.X.copy()
    before = slot_names(adata)
    assert tl.integrate(adata, "batch", cluster=False, **FAST) is None
    written = slot_names(adata) - before
    assert written == {("obsm", "X_inmf"), ("obsm", "X_inmf_norm"), ("varm", "W_inmf"), ("var", "inmf_selected"),
                       ("uns", "inmf")}
    H = adata.obsm["X_inmf"]
    assert H.shape == (adata.n_obs, 5) and (H >= 0).all() and np.isfinite(H).all()
    W = adata.varm["W_inmf"]
    sel = adata.var["inmf_selected"].to_numpy()
    assert W.shape == (adata.n_vars, 5) and sel.any() and (W[~sel] == 0).all()
    assert adata.uns["inmf"]["params"]["k"] == 5 and adata.uns["inmf"]["objective"] > 0
    assert (adata.X != X_before).nnz == 0


def test_key_added_names_every_slot_and_keeps_the_users(adata, fake_post):
    user_umap = np.arange(2 * adata.n_obs, dtype=np.float32).reshape(-1, 2)
    adata.obsm["X_umap"] = user_umap.copy()
    tl.integrate(adata, "batch", cluster=True, umap=True, **FAST)
    first = {k: np.array(adata.obsm[k]) for k in ("X_inmf", "X_inmf_norm", "X_inmf_umap")}
    before = slot_names(adata)
    tl.integrate(adata, "batch", cluster=True, umap=True, key_added="run2", seed=2, **FAST)
    written = slot_names(adata) - before
    assert written == set(_keys.slots("run2").items()) == {
        ("obsm", "X_run2"), ("obsm", "X_run2_norm"), ("obsm", "X_run2_umap"), ("obs", "run2_cluster"),
        ("varm", "W_run2"), ("var", "run2_selected"), ("uns", "run2")}
    # The first run's slots and the user's own UMAP are as they were.
    np.testing.assert_array_equal(adata.obsm["X_umap"], user_umap)
    for key, value in first.items():
        np.testing.assert_array_equal(adata.obsm[key], value)
    assert adata.uns["run2"]["params"]["seed"] == 2 and adata.uns["inmf"]["params"]["seed"] == 1


@pytest.mark.parametrize(("attr", "key"), [("obsm", "X_inmf"), ("obs", "inmf_cluster"), ("uns", "inmf"),
                                           ("var", "inmf_selected"), ("varm", "W_inmf")])
def test_existing_slot_is_refused_without_key_added(adata, fake_post, attr, key):
    if attr in ("obs", "var"):
        getattr(adata, attr)[key] = "mine"
    elif attr == "uns":
        adata.uns[key] = {"mine": 1}
    else:
        getattr(adata, attr)[key] = np.ones((adata.n_obs if attr == "obsm" else adata.n_vars, 3))
    before = slot_names(adata)
    with pytest.raises(InputError, match=re.escape(f"{attr}['{key}']") + ".*key_added"):
        tl.integrate(adata, "batch", **FAST)
    assert slot_names(adata) == before
    # Naming the key is asking for it: the slot is replaced.
    tl.integrate(adata, "batch", key_added="inmf", **FAST)
    assert adata.uns["inmf"]["params"]["key_added"] == "inmf"


def test_slots_of_disabled_steps_are_not_checked(adata, fake_post):
    adata.obs["inmf_cluster"] = "mine"
    tl.integrate(adata, "batch", cluster=False, **FAST)  # writes no cluster column, so nothing to refuse
    assert (adata.obs["inmf_cluster"] == "mine").all()


def test_copy_and_return_model_compose(adata, fake_post):
    before = slot_names(adata)
    result = tl.integrate(adata, "batch", copy=True, return_model=True, **FAST)
    assert isinstance(result, tuple) and len(result) == 2
    copy, model = result
    assert isinstance(copy, ad.AnnData) and copy is not adata and isinstance(model, OnlineINMF)
    assert slot_names(adata) == before  # the original is untouched
    np.testing.assert_array_equal(copy.varm["W_inmf"][copy.var["inmf_selected"].to_numpy()].T, model.W_)

    only_copy = tl.integrate(adata, "batch", copy=True, **FAST)
    assert isinstance(only_copy, ad.AnnData) and "X_inmf" in only_copy.obsm and slot_names(adata) == before
    only_model = tl.integrate(adata, "batch", return_model=True, **FAST)
    assert isinstance(only_model, OnlineINMF) and "X_inmf" in adata.obsm


def test_same_seed_same_result_and_seed_reaches_postprocessing(tiny, fake_post):
    a, b = tiny.copy(), tiny.copy()
    tl.integrate(a, "batch", seed=7, umap=True, **FAST)
    assert fake_post == {"leiden": 7, "umap": 7}
    tl.integrate(b, "batch", seed=7, umap=True, **FAST)
    np.testing.assert_array_equal(a.obsm["X_inmf"], b.obsm["X_inmf"])


def test_bad_batch_labels_and_layer(adata):
    with pytest.raises(InputError, match="batch_key 'nope' is not an obs column"):
        tl.integrate(adata, "nope", **FAST)
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[:4, adata.obs.columns.get_loc("batch")] = None
    with pytest.raises(InputError, match="found 4 cells without one"):
        tl.integrate(adata, "batch", **FAST)
    with pytest.raises(InputError, match="layer 'counts' is not in adata.layers"):
        tl.integrate(adata, "batch", layer="counts", **FAST)
    for bad in ("", "a/b", 3):
        with pytest.raises(InputError, match="key_added: expected a non-empty name"):
            tl.integrate(adata, "batch", key_added=bad, **FAST)


def test_signature_and_every_parameter_documented():
    sig = inspect.signature(tl.integrate)
    params = list(sig.parameters.values())
    assert params[0].name == "adata"
    assert sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params) <= 3
    assert sig.parameters["copy"].kind is inspect.Parameter.KEYWORD_ONLY
    doc = inspect.getdoc(tl.integrate)
    section = doc.split("Parameters\n----------\n", 1)[1].split("\nReturns\n", 1)[0]
    documented = set(re.findall(r"^(\w+) :", section, flags=re.MULTILINE))
    assert documented == set(sig.parameters)
    returns = doc.split("Returns\n-------\n", 1)[1]
    for attr, key in _keys.slots("<key>").items():
        assert f"{attr}['{key}']" in returns
