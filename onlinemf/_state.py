"""The estimator's state as plain values and arrays, and the estimator rebuilt from them.

:meth:`OnlineINMF._state` and :meth:`OnlineINMF._from_state` delegate here; :mod:`onlinemf.model_io` only
serialises the dict (no pickle), so the file format and the estimator's attributes stay decoupled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _uinmf


def describe(est: Any, stats: tuple[str, ...]) -> dict:
    """The state of a fitted estimator: parameters, RNG state, factors, statistics and counters per dataset."""
    return {"params": est.get_params(), "rng_state": est._rng.bit_generator.state, "W": est.W_,
            "var_names": est.var_names_in_, "n_steps": est.n_steps_, "n_epochs": est.n_epochs_,
            "objective": list(est.objective_), "mode": est._mode,
            "datasets": [{"name": n, "n_cells": est.n_cells_[n], "n_batches": est.n_batches_[n],
                          "frozen": n in est.frozen_,
                          **_uinmf.split_state({k: getattr(est, f"{k}_")[n] for k in stats}, est.W_.shape[1],
                                               est.unshared_names_.get(n))}
                         for n in est.dataset_names_]}


def rebuild(est: Any, state: dict, stats: tuple[str, ...]) -> Any:
    """Fill the fresh estimator ``est`` (made from ``state["params"]``) with the state :func:`describe` gave."""
    est._validate_params()
    bitgen = getattr(np.random, state["rng_state"]["bit_generator"])()
    bitgen.state = state["rng_state"]
    est._reset(np.asarray(state["W"], dtype=est._dt), state.get("var_names"), np.random.Generator(bitgen))
    for d in state["datasets"]:
        arrays = _uinmf.join_state(d, stats, est._dt)
        est._add_dataset(str(d["name"]), arrays["V"], d["n_cells"], d.get("unshared_names"))
        for key in stats[1:]:
            getattr(est, f"{key}_")[str(d["name"])] = arrays[key]
        est.n_batches_[str(d["name"])] = int(d["n_batches"])
        if d["frozen"]:
            est.frozen_.add(str(d["name"]))
    est.n_steps_, est.n_epochs_ = int(state["n_steps"]), int(state["n_epochs"])
    est.objective_ = [float(x) for x in state["objective"]]
    est._mode = state.get("mode", "fit")
    return est

