"""Save, load and checkpoint :class:`~onlinemf.engine.OnlineINMF` models in HDF5 (h5py, no pickle).

The estimator describes itself (``_state()``) and is rebuilt from that description (``_from_state()``);
this module only serialises it, and checkpoints through a step callback (:class:`Checkpoint`).

Layout (``format_version`` 2; version 1, without unshared features, still loads)::

    /            attrs: kind, format_version, params (JSON), rng_state (JSON of bit_generator.state),
                        n_steps, n_epochs, objective (JSON), info (JSON), checkpoint (JSON, checkpoints only)
    /W           (K, G) factors x genes
    /var_names   (G,) str, optional
    /datasets/<i>  attrs: name, n_cells, n_batches, frozen; datasets V (K, G), A (K, K), B (K, G),
                   A_old (K, K), B_old (K, G); with u unshared features (UINMF, version 2) also U (K, u),
                   B_U (K, u), B_U_old (K, u) and unshared_names (u,) str, optional
    /mapping       optional (``onlinemf fit``): quantiles (K, K, q+1) and n_cells (K,) of the reference dataset's H
                   per cluster and factor (:class:`onlinemf.mapping.ReferenceQuantiles`); attrs settings (JSON),
                   labels (JSON list), label_key (``--label-key``, optional). Files without it load (mapping None).
    /scaling/<i>   (G,) per-gene scale, attr name ((G + u,) for a dataset with u unshared features)

Files are written by :func:`onlinemf._files.atomic_output` (temporary name beside the target, then renamed).
Loading checks every dataset's shape from the HDF5 metadata before reading any array.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ._errors import InputError, ModelError
from ._files import atomic_output
from .engine import OnlineINMF
from .mapping import MappingRecord

FORMAT_VERSION = 2
#: Versions this module reads: 1 has no unshared features (UINMF's U_i), which version 2 adds.
READS_VERSIONS = (1, 2)
KIND = "onlinemf.OnlineINMF"
MAX_COMPONENTS = 10_000
MAX_GENES = 50_000_000
MAX_ELEMENTS = 2**32  # per K x G array; anything larger is refused before reading
_ARRAYS = ("V", "A", "B", "A_old", "B_old")
_UNSHARED_ARRAYS = ("U", "B_U", "B_U_old")


@dataclass
class Checkpoint:
    """A step callback for :meth:`OnlineINMF.fit`/``update``: save the full state every ``every`` mini-batches.

    ``est.fit(sources, callback=Checkpoint(path, every=10))``; resume with
    ``est, position = read_checkpoint(path)`` then ``est.fit(sources, resume=position)``.
    """

    path: str | os.PathLike
    every: int = 10

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            msg = f"Checkpoint.every: expected an int >= 1, found {self.every!r}"
            raise InputError(msg)

    def __call__(self, estimator: OnlineINMF, position: dict) -> None:
        done, n_steps = int(position["done"]), int(position["n_steps"])
        if done % self.every == 0 and done < n_steps:  # the last step's state is the model file's business
            write_checkpoint(self.path, estimator, position)


@dataclass
class SavedModel:
    """A loaded model file: the estimator, per-gene scaling per dataset and free metadata."""

    estimator: OnlineINMF
    scaling: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    mapping: MappingRecord | None = None  # what mapping queries onto the fit's reference needs (fit only)


# ----------------------------------------------------------------------------- writing
def _params_json(params: dict) -> str:
    params = dict(params)
    if not (params["random_state"] is None or isinstance(params["random_state"], int)):
        params["random_state"] = None  # a Generator: its state is saved as rng_state
    return json.dumps(params)


def _write(path, est: OnlineINMF, *, scaling=None, info=None, checkpoint_state=None, mapping=None) -> None:
    if not hasattr(est, "W_"):
        msg = "estimator: expected a fitted OnlineINMF, found one that is not fitted"
        raise InputError(msg)
    state = est._state()
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"] = KIND
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["params"] = _params_json(state["params"])
            f.attrs["rng_state"] = json.dumps(state["rng_state"])
            f.attrs["n_steps"] = int(state["n_steps"])
            f.attrs["n_epochs"] = int(state["n_epochs"])
            f.attrs["objective"] = json.dumps([float(x) for x in state["objective"]])
            f.attrs["info"] = json.dumps(info or {})
            if checkpoint_state is not None:
                f.attrs["checkpoint"] = json.dumps(checkpoint_state)
            f.create_dataset("W", data=state["W"])
            if state["var_names"] is not None:
                f.create_dataset("var_names", data=np.asarray(state["var_names"], dtype=object),
                                 dtype=h5py.string_dtype())
            grp = f.create_group("datasets")
            for i, d in enumerate(state["datasets"]):
                g = grp.create_group(str(i))
                g.attrs["name"] = d["name"]
                g.attrs["n_cells"] = int(d["n_cells"])
                g.attrs["n_batches"] = int(d["n_batches"])
                g.attrs["frozen"] = bool(d["frozen"])
                for key in _ARRAYS:
                    g.create_dataset(key, data=d[key])
                for key in _UNSHARED_ARRAYS if "U" in d else ():
                    g.create_dataset(key, data=d[key])
                if d.get("unshared_names") is not None:
                    g.create_dataset("unshared_names", data=np.asarray(d["unshared_names"], dtype=object),
                                     dtype=h5py.string_dtype())
            sg = f.create_group("scaling")
            for i, (name, scale) in enumerate((scaling or {}).items()):
                d = sg.create_dataset(str(i), data=np.asarray(scale, dtype=np.float64))
                d.attrs["name"] = str(name)
            if mapping is not None:
                _write_mapping(f, mapping)


def _write_mapping(f: h5py.File, record: MappingRecord) -> None:
    g = f.create_group("mapping")
    g.attrs["settings"] = json.dumps(record.quantiles.settings())
    g.attrs["labels"] = json.dumps([str(x) for x in record.labels])
    if record.label_key is not None:
        g.attrs["label_key"] = str(record.label_key)
    g.create_dataset("quantiles", data=np.asarray(record.quantiles.values, dtype=np.float64))
    g.create_dataset("n_cells", data=np.asarray(record.quantiles.n_cells, dtype=np.int64))


def save_model(path, estimator, *, scaling=None, info=None, mapping: MappingRecord | None = None) -> None:
    """Save a fitted estimator (factors, statistics, counters, RNG state) to HDF5.

    Parameters
    ----------
    path : str or PathLike
    estimator : OnlineINMF (fitted)
    scaling : dict name -> array of shape (n_genes,), optional
        Per-gene scale factors used to prepare each dataset.
    info : dict, optional
        JSON-able metadata (preprocessing parameters, ...).
    mapping : MappingRecord, optional
        Reference quantiles (and label column) for ``project --reference``.
    """
    try:
        json.dumps(info or {})
    except TypeError as exc:
        msg = f"info: expected JSON-able metadata, found {exc}"
        raise InputError(msg) from None
    _write(path, estimator, scaling=scaling, info=info, mapping=mapping)


def write_checkpoint(path, estimator: OnlineINMF, position: dict) -> None:
    """Write a checkpoint: the full model plus the plan ``position`` (JSON-able, from the fit loop's callback)."""
    _write(path, estimator, checkpoint_state=dict(position))


# ----------------------------------------------------------------------------- reading
def _fail(path, what) -> None:
    msg = f"{path}: not a usable onlinemf model file ({what})"
    raise ModelError(msg)


def _dset(path, group, key, shape, dtypes=("f",)):
    """Return the h5py dataset ``group[key]`` after checking its shape and kind from metadata."""
    d = group.get(key)
    label = "/".join(p for p in (group.name.strip("/"), key) if p)
    if not isinstance(d, h5py.Dataset):
        _fail(path, f"missing array {label}")
    if d.shape != shape:
        _fail(path, f"{label} has shape {d.shape}, expected {shape}")
    if d.dtype.kind not in dtypes:
        _fail(path, f"{label} has dtype {d.dtype}, expected {'numbers' if dtypes == ('f',) else 'strings'}")
    return d


def _unshared_dsets(path, g, K: int, version: int) -> dict:
    """A dataset group's UINMF arrays (version 2, when it has unshared features), shapes checked from metadata."""
    if "U" not in g:
        return {}
    if version < 2:
        _fail(path, f"{g.name.strip('/')}/U in a format_version {version} file")
    U = g["U"]
    if not isinstance(U, h5py.Dataset) or U.ndim != 2 or not 1 <= U.shape[1] <= MAX_GENES:
        _fail(path, f"{g.name.strip('/')}/U is not a (K, u) array")
    u = U.shape[1]
    out = {key: _dset(path, g, key, (K, u)) for key in _UNSHARED_ARRAYS}
    if "unshared_names" in g:
        out["unshared_names"] = _dset(path, g, "unshared_names", (u,), dtypes=("O", "S", "U"))
    return out


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _count(path, node, key: str) -> int:
    """A non-negative integer attribute of ``node`` (a counter; 0 when absent)."""
    value = node.attrs.get(key, 0)
    if not _is_int(value) or value < 0:
        label = "/".join(p for p in (node.name.strip("/"), key) if p)
        _fail(path, f"attribute {label} is {value!r}, expected a non-negative integer")
    return int(value)


def _values(path, dataset: h5py.Dataset) -> np.ndarray:
    """The values of a factor, statistic or scale array, refused unless finite and non-negative."""
    values = dataset[...]
    if not np.isfinite(values).all() or (values < 0).any():
        what = "non-finite" if not np.isfinite(values).all() else "negative"
        _fail(path, f"{dataset.name.strip('/')} has {what} values")
    return values


def _check_position(path, position, est: OnlineINMF) -> None:
    """A checkpoint's plan position: the fields a resumed run uses, of the right types, for the datasets it holds."""
    if not isinstance(position, dict):
        _fail(path, "attribute 'checkpoint' is not a mapping")
    done, n_steps, sources, acc = (position.get(k) for k in ("done", "n_steps", "sources", "acc"))
    if not (_is_int(done) and _is_int(n_steps) and 0 <= done <= n_steps):
        _fail(path, f"checkpoint position done={done!r} of n_steps={n_steps!r}")
    if position.get("mode", "fit") not in ("fit", "update"):
        _fail(path, f"checkpoint mode {position.get('mode')!r}")
    if not (isinstance(sources, list) and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)
                                              and _is_int(s[1]) for s in sources)):
        _fail(path, f"checkpoint sources {sources!r}, expected [name, cells] pairs")
    missing = [name for name, _ in sources if name not in est.dataset_names_]
    if missing:
        _fail(path, f"checkpoint of datasets {missing} that it holds no factors for (it holds {est.dataset_names_})")
    if not (isinstance(acc, dict) and all(isinstance(acc.get(k), dict) for k in ("loss", "cells"))):
        _fail(path, "checkpoint partial losses ('acc') are not a mapping of 'loss' and 'cells'")
    try:
        generator = type(est._rng.bit_generator)()
        generator.state = position.get("plan_rng_state")
    except (KeyError, TypeError, ValueError):
        _fail(path, "checkpoint plan_rng_state is not a numpy bit generator state")


def _json_attr(path, f, key, default=None):
    if key not in f.attrs:
        if default is not None:
            return default
        _fail(path, f"missing attribute {key!r}")
    try:
        return json.loads(f.attrs[key])
    except (TypeError, ValueError):
        _fail(path, f"attribute {key!r} is not valid JSON")


def _load(path):
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: expected a model file, found no such file"
        raise ModelError(msg)
    try:
        f = h5py.File(path, "r")
    except OSError:
        _fail(path, "not an HDF5 file")
    with f:
        if f.attrs.get("kind") != KIND:
            _fail(path, f"kind is {f.attrs.get('kind')!r}, expected {KIND!r}")
        version = f.attrs.get("format_version")
        if not _is_int(version) or int(version) not in READS_VERSIONS:
            _fail(path, f"format_version {version}, this onlinemf reads {' and '.join(map(str, READS_VERSIONS))}")
        params = _json_attr(path, f, "params")
        if not isinstance(params, dict):
            _fail(path, "params is not a mapping")
        unknown = set(params) - set(OnlineINMF().get_params())
        if unknown:
            _fail(path, f"unknown parameters {sorted(unknown)}")
        try:
            est = OnlineINMF(**params)
            est._validate_params()
        except (InputError, TypeError) as exc:
            _fail(path, str(exc))
        # Shapes first, all from metadata: nothing is read before they all agree and are sane.
        Wd = f.get("W")
        if not isinstance(Wd, h5py.Dataset) or Wd.ndim != 2:
            _fail(path, "missing 2-D array W")
        K, G = Wd.shape
        if not (1 <= K <= MAX_COMPONENTS and 1 <= G <= MAX_GENES and K * G <= MAX_ELEMENTS):
            _fail(path, f"W has an implausible shape {Wd.shape}")
        if K != est.n_components:
            _fail(path, f"W has {K} factors but n_components is {est.n_components}")
        _dset(path, f, "W", (K, G))
        names_d = f.get("var_names")
        if names_d is not None:
            _dset(path, f, "var_names", (G,), dtypes=("O", "S", "U"))
        groups = f.get("datasets")
        if not isinstance(groups, h5py.Group):
            _fail(path, "missing group datasets")
        entries = []
        for i in range(len(groups)):
            g = groups.get(str(i))
            if not isinstance(g, h5py.Group) or "name" not in g.attrs:
                _fail(path, f"datasets/{i} is missing or unnamed")
            arrays = {key: _dset(path, g, key, shp) for key, shp in
                      (("V", (K, G)), ("A", (K, K)), ("B", (K, G)), ("A_old", (K, K)), ("B_old", (K, G)))}
            arrays.update(_unshared_dsets(path, g, K, int(version)))
            entries.append((g, arrays))
        total = K * G * (1 + 3 * len(entries)) + 2 * K * K * len(entries)
        total += sum(3 * K * a["U"].shape[1] for _, a in entries if "U" in a)
        if total > MAX_ELEMENTS:
            _fail(path, f"{len(entries)} datasets of {K} x {G} factors are implausibly large")
        scal = f.get("scaling")
        scal_d = []
        if isinstance(scal, h5py.Group):
            # a dataset with unshared features is scaled on the model's genes and its own
            width = {str(g.attrs["name"]): G + (a["U"].shape[1] if "U" in a else 0) for g, a in entries}
            for i in range(len(scal)):
                d = scal.get(str(i))
                if not isinstance(d, h5py.Dataset) or "name" not in d.attrs:
                    _fail(path, f"scaling/{i} is missing or unnamed")
                scal_d.append(_dset(path, scal, str(i), (width.get(str(d.attrs["name"]), G),)))
        names = [str(g.attrs["name"]) for g, _ in entries]
        if len(set(names)) != len(names):
            _fail(path, f"dataset names repeat: {names}")
        # Now read; every factor and statistic is finite and non-negative (as the fit leaves them).
        dt = np.dtype(est.dtype)
        datasets = []
        for g, arrays in entries:
            d = {key: _values(path, arrays[key]).astype(dt) for key in _ARRAYS + _UNSHARED_ARRAYS if key in arrays}
            if "unshared_names" in arrays:
                d["unshared_names"] = np.asarray(arrays["unshared_names"].asstr()[...]).astype(str)
            d.update(name=str(g.attrs["name"]), n_cells=_count(path, g, "n_cells"),
                     n_batches=_count(path, g, "n_batches"), frozen=bool(g.attrs.get("frozen", False)))
            datasets.append(d)
        objective = _json_attr(path, f, "objective", [])
        if not isinstance(objective, list) or not all(isinstance(x, int | float) for x in objective):
            _fail(path, "attribute 'objective' is not a list of numbers")
        state = {"params": est.get_params(), "rng_state": _json_attr(path, f, "rng_state"), "W": _values(path, Wd).astype(dt),
                 "var_names": None if names_d is None else np.asarray(names_d.asstr()[...]).astype(str),
                 "n_steps": _count(path, f, "n_steps"), "n_epochs": _count(path, f, "n_epochs"),
                 "objective": [float(x) for x in objective], "datasets": datasets}
        scaling = {str(d.attrs["name"]): _values(path, d) for d in scal_d}
        info = _json_attr(path, f, "info", {})
        position = _json_attr(path, f, "checkpoint", {}) if "checkpoint" in f.attrs else None
    if position is not None:
        if not isinstance(position, dict):
            _fail(path, "attribute 'checkpoint' is not a mapping")
        state["mode"] = position.get("mode", "fit")
    try:
        est = OnlineINMF._from_state(state)
    except (AttributeError, KeyError, TypeError, ValueError):
        _fail(path, "rng_state is not a numpy bit generator state")
    return est, scaling, info, position


def load_model(path) -> SavedModel:
    """Load a model saved by :func:`save_model` (or a checkpoint); raises ModelError if unusable."""
    est, scaling, info, _ = _load(path)
    return SavedModel(estimator=est, scaling=scaling, info=info, mapping=_read_mapping(path, est.n_components))


def _read_mapping(path, K: int) -> MappingRecord | None:
    """The optional ``/mapping`` group, checked from metadata before reading; None when the file has none."""
    from .mapping import ReferenceQuantiles

    with h5py.File(path, "r") as f:
        g = f.get("mapping")
        if g is None:
            return None
        if not isinstance(g, h5py.Group):
            _fail(path, "mapping is not a group")
        q = g.get("quantiles")
        if not isinstance(q, h5py.Dataset) or q.ndim != 3 or q.shape[:2] != (K, K) or not 2 <= q.shape[2] <= 10_001:
            _fail(path, f"mapping/quantiles is not a ({K}, {K}, q+1) array")
        _dset(path, g, "quantiles", q.shape)
        n = g.get("n_cells")
        if not isinstance(n, h5py.Dataset) or n.shape != (K,) or n.dtype.kind not in "iu":
            _fail(path, f"mapping/n_cells is not ({K},) integers")
        settings, labels = _json_attr(path, g, "settings"), _json_attr(path, g, "labels", [])
        label_key = g.attrs.get("label_key")
        try:
            quantiles = ReferenceQuantiles(values=q[...].astype(np.float64), n_cells=n[...].astype(np.int64), **settings)
        except (TypeError, InputError) as exc:
            _fail(path, f"mapping: {exc}")
    return MappingRecord(quantiles=quantiles, label_key=None if label_key is None else str(label_key),
                         labels=tuple(str(x) for x in labels))


def read_checkpoint(path) -> tuple[OnlineINMF, dict]:
    """The estimator a checkpoint holds and its plan position: ``est.fit(sources, resume=position)`` continues."""
    est, _, _, position = _load(path)
    if position is None:
        _fail(path, "a model file, not a checkpoint")
    _check_position(path, position, est)
    return est, position
