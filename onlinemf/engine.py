"""The :class:`OnlineINMF` estimator: online iNMF (Gao et al. 2021) over streamed Sources.

The loop follows libplanc's ``ONLINEINMF`` (rliger 2's engine): per iteration one mini-batch of every dataset
being fitted, H by NNLS on the K x K normal equations, the rliger A/B schedule, and HALS sweeps of W then each
V_i. The estimator holds parameters and state only: the step's maths is in :mod:`onlinemf._step` (pure, run by
an executor from :mod:`onlinemf._executor`), the plan in :mod:`onlinemf.schedule`, the loop in
:mod:`onlinemf._training`; saving and checkpointing are :mod:`onlinemf.model_io`'s, driven by a callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _solvers as S
from . import _state, _step, _uinmf
from . import _training as T
from ._errors import InputError
from ._executor import local_executor
from ._params import ParamsMixin, constraints
from ._rowrange import CsrRowRange, materialize
from ._source import Source, as_matrix
from ._step import DatasetFactors  # by name: the method _step hides the module in the class body
from .schedule import MinibatchPlan


_STATS = ("V", "A", "B", "A_old", "B_old")
_CONSTRAINTS = constraints()


class OnlineINMF(ParamsMixin):
    """Online integrative NMF: ``X_i ~ H_i (W + V_i)`` with W shared and V_i per dataset.

    Minimises ``sum_i ||X_i - H_i (W + V_i)||^2 + lam ||H_i V_i||^2`` over non-negative factors, streaming
    mini-batches as rliger's ``runOnlineINMF``. A scikit-learn estimator: ``fit(X)`` on one cells x genes matrix
    fits one dataset; a list of Sources or a dict name -> matrix fits several.

    Parameters
    ----------
    n_components : int, default=20
        K, the number of factors.
    lam : float, default=5.0
        Weight of the dataset-specific penalty.
    batch_size : int, default=5000
        Cells per iteration over all datasets (split in proportion to their sizes).
    max_epochs : int, default=5
    chunk_size : int, default=1000
        Contiguous cells kept together when shuffling.
    hals_iter : int, default=1
        HALS sweeps per mini-batch.
    h_sweeps : int, default=10
        Coordinate-descent sweeps of the H solver.
    dtype : {"float32", "float64"}, default="float32"
        Working precision of factors and products (objectives are accumulated in float64).
    random_state : int, Generator or None, default=1
    n_threads : int or None, default=None
        Threads for the mini-batch steps and H passes (None: every core this process may use). The work is
        split into units that do not depend on the thread count, so any count gives the same model.

    Attributes
    ----------
    W_, components_ : ndarray of shape (K, n_genes)
        Shared factors.
    V_, B_, B_old_ : dict name -> ndarray of shape (K, n_genes + u_i)
        Dataset factors and statistics; a dataset with u_i unshared features (UINMF, ``unshared=`` in
        :meth:`fit`) has them stacked, ``[V_i, U_i]`` and ``[B_i, B^U_i]`` (:mod:`onlinemf._uinmf`).
    U_ : dict name -> ndarray of shape (K, u_i)
        UINMF's unshared factors (views of ``V_``), only for datasets with unshared features.
    unshared_names_ : dict name -> ndarray of str of shape (u_i,) or None
        Names of each such dataset's unshared features (None when fitted without names).
    A_, A_old_ : dict name -> ndarray of shape (K, K)
    n_cells_ : dict name -> int
        Cells per dataset in the plan that fitted it (mini-batch rows for ``partial_fit``).
    n_batches_ : dict name -> int
        Iteration counter ``t`` of each dataset in its current fitting session.
    dataset_names_ : list of str
    frozen_ : set of str
        Datasets whose V/A/B are no longer updated (old data after :meth:`update`).
    n_steps_ : int
    n_epochs_ : int
        Epochs completed in the last ``fit``/``update`` plan.
    objective_ : list of float
        Per-epoch objective estimate (mini-batch losses scaled to the full data).
    n_features_in_ : int
    var_names_in_, feature_names_in_ : ndarray of str of shape (n_genes,) or None
    """

    _constraints = _CONSTRAINTS

    def __init__(self, n_components: int = 20, *, lam: float = 5.0, batch_size: int = 5000, max_epochs: int = 5,
                 chunk_size: int = 1000, hals_iter: int = 1, h_sweeps: int = 10, dtype: str = "float32",
                 random_state: int | np.random.Generator | None = 1, n_threads: int | None = None):
        self.n_components = n_components
        self.lam = lam
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.chunk_size = chunk_size
        self.hals_iter = hals_iter
        self.h_sweeps = h_sweeps
        self.dtype = dtype
        self.random_state = random_state
        self.n_threads = n_threads

    # Properties raise AttributeError until fitted, so ``hasattr`` tells whether the model is fitted.
    @property
    def components_(self) -> np.ndarray:
        return self.W_

    @property
    def n_features_in_(self) -> int:
        return self.W_.shape[1]

    @property
    def U_(self) -> dict[str, np.ndarray]:
        return {n: _uinmf.split(V, self.W_.shape[1])[1] for n, V in self.V_.items() if V.shape[1] > self.W_.shape[1]}

    def _n_unshared(self, name: str | None) -> int:
        return self.V_[name].shape[1] - self.W_.shape[1] if name in self.V_ else 0

    @property
    def feature_names_in_(self) -> np.ndarray:
        names = getattr(self, "var_names_in_", None)
        if names is None:
            raise AttributeError("feature_names_in_: the model was fitted without gene names")
        return names

    # ------------------------------------------------------------------ state
    @property
    def _dt(self) -> np.dtype:
        return np.dtype(self.dtype)

    def _check_fitted(self) -> None:
        if not hasattr(self, "W_"):
            msg = "OnlineINMF: this model is not fitted yet; call fit or partial_fit first"
            raise InputError(msg)

    def _reset(self, W: np.ndarray, var_names: np.ndarray | None, rng: np.random.Generator) -> None:
        self._rng = rng
        self.W_ = W
        self.V_: dict[str, np.ndarray] = {}
        self.A_: dict[str, np.ndarray] = {}
        self.B_: dict[str, np.ndarray] = {}
        self.A_old_: dict[str, np.ndarray] = {}
        self.B_old_: dict[str, np.ndarray] = {}
        self.n_cells_: dict[str, int] = {}
        self.n_batches_: dict[str, int] = {}
        self.dataset_names_: list[str] = []
        self.frozen_: set[str] = set()
        self.unshared_names_: dict[str, np.ndarray | None] = {}
        self.n_steps_ = self.n_epochs_ = 0
        self.objective_: list[float] = []
        self.var_names_in_ = None if var_names is None else np.asarray(var_names).astype(str)
        self._mode = "fit"

    def _add_dataset(self, name: str, V: np.ndarray, n_cells: int, unshared_names: Any = None) -> None:
        K, G = V.shape  # G: the model's genes, plus the dataset's unshared features (UINMF)
        if G > self.W_.shape[1]:
            self.unshared_names_[name] = None if unshared_names is None else np.asarray(unshared_names).astype(str)
        self.dataset_names_.append(name)
        self.V_[name] = V
        self.A_[name], self.A_old_[name] = np.zeros((K, K), self._dt), np.zeros((K, K), self._dt)
        self.B_[name], self.B_old_[name] = np.zeros((K, G), self._dt), np.zeros((K, G), self._dt)
        self.n_cells_[name], self.n_batches_[name] = int(n_cells), 0

    def _state(self) -> dict:
        """Everything a fitted model is, as plain values and arrays (what :mod:`onlinemf.model_io` saves)."""
        self._check_fitted()
        return _state.describe(self, _STATS)

    @classmethod
    def _from_state(cls, state: dict) -> OnlineINMF:
        """The estimator :meth:`_state` described (parameters validated, arrays in the working dtype)."""
        return _state.rebuild(cls(**state["params"]), state, _STATS)

    def _check_genes(self, n_genes: int, var_names: np.ndarray | None, what: str, n_unshared: int = 0) -> None:
        T.check_genes(self.W_.shape[1], self.var_names_in_, n_genes, var_names, what, n_unshared)

    # ------------------------------------------------------------------ one iteration
    def _step(self, batch: dict, new_epoch: bool, executor: Any) -> dict[str, float]:
        """One iteration over ``batch`` (name -> matrix or row blocks): H, A/B, HALS; returns mini-batch losses.

        Losses come from the H just solved and the factors before this iteration's W/V update.
        """
        factors = {name: _step.dataset_factors(self.W_, self.V_[name], float(self.lam)) for name in batch}
        units = [(name, unit) for name, X in batch.items() for unit in _step.work_units(X)]
        results = executor.map(_step.UnitTask(factors, self.h_sweeps), units)
        losses = {}
        for name in batch:
            total = _step.sum_stats([r for (n, _), r in zip(units, results, strict=True) if n == name])
            self.n_batches_[name] += 1
            S.update_stats(self.A_[name], self.B_[name], self.A_old_[name], self.B_old_[name], total.HtH,
                           total.XtH, total.n_rows, self.n_batches_[name], new_epoch)
            losses[name] = total.loss
        names = self.dataset_names_
        S.hals_update(self.W_, [self.V_[n] for n in names], [self.A_[n] for n in names],
                      [self.B_[n] for n in names], float(self.lam), [n in batch for n in names],
                      n_sweeps=self.hals_iter)
        self.n_steps_ += 1
        return losses

    def partial_fit(self, X: Any, y: None = None, *, dataset: str | None = None, new_epoch: bool = False,
                    unshared: Mapping[str, int] | None = None) -> OnlineINMF:
        """One mini-batch update.

        Parameters
        ----------
        X : CSR matrix or ndarray of shape (n_cells, n_genes), list of such row blocks, or dict name -> X
            A prepared mini-batch (a list is its row blocks, in order); a dict updates several datasets in one
            iteration (as every iteration of :meth:`fit` does, so a loop over :meth:`minibatches` replays ``fit``).
        y : ignored
        dataset : str, optional
            Name of the dataset of ``X`` (not with a dict). An unseen name starts a new V/A/B, V drawn from K
            random non-empty cells of ``X``. Default: the model's only dataset, or "dataset" for a new model.
        new_epoch : bool, default=False
            The stream just started a new pass over the data: statistics older than the previous epoch
            boundary are dropped (rliger).
        unshared : dict name -> int, optional
            For a dataset first seen here: its last u columns are its unshared features (see :meth:`fit`).
        """
        batch = T.as_batch(X, dataset, self._default_dataset, self._dt)
        counts = _uinmf.unshared_counts(unshared, list(batch))
        if not hasattr(self, "W_"):
            self._validate_params()
            rng = np.random.default_rng(self.random_state)
            first = next(iter(batch))
            n_genes = _uinmf.n_shared_genes(S.row_blocks(batch[first])[0].shape[1], counts[first], first)
            self._reset(S.init_w(self.n_components, n_genes, rng, self._dt), None, rng)
        for name, x in batch.items():
            for block in S.row_blocks(x):
                self._check_genes(block.shape[1], None, name, self._n_unshared(name) if name in self.V_ else counts[name])
            if name in self.frozen_:
                msg = f"partial_fit: expected a new or active dataset, found {name!r} which is frozen (old data after update)"
                raise InputError(msg)
        for name, x in batch.items():
            if name not in self.V_:
                self._add_dataset(name, T.sample_v_from_block(x, name, self.n_components, self._rng, self._dt,
                                                              self.W_.shape[1]), S.n_rows(x))
        with local_executor(self.n_threads) as executor:
            self._step(batch, new_epoch, executor)
        return self

    def _default_dataset(self) -> str:
        names = [n for n in getattr(self, "dataset_names_", []) if n not in self.frozen_]
        if len(names) > 1:
            msg = f"partial_fit: expected a dataset name with a single mini-batch, found dataset=None and datasets {names}"
            raise InputError(msg)
        return names[0] if names else "dataset"

    # ------------------------------------------------------------------ plans
    def initialize(self, X: Any, *, unshared: Mapping[str, int] | None = None) -> OnlineINMF:
        """Start a new model: W ~ U(0,2) (unit-norm factors), V_i from K random cells; draws W, then each V_i."""
        sources = T.as_sources(X)
        self._validate_params()
        counts = _uinmf.unshared_counts(unshared, [s.name for s in sources])
        rng = np.random.default_rng(self.random_state)
        first = sources[0]
        G = _uinmf.n_shared_genes(first.n_genes, counts[first.name], first.name)
        names = T.gene_names(first)
        self._reset(S.init_w(self.n_components, G, rng, self._dt), None if names is None else names[:G], rng)
        self._add_sources(sources, counts, rng)
        return self

    def _add_sources(self, sources: list[Source], counts: dict[str, int], rng: np.random.Generator) -> None:
        """Check new datasets' genes (the model's, then ``counts[name]`` unshared features), then draw their V_i."""
        for s in sources:
            self._check_genes(s.n_genes, T.gene_names(s), s.name, counts[s.name])
        G = self.W_.shape[1]
        for s in sources:
            self._add_dataset(s.name, T.sample_v(s, self.n_components, rng, self._dt, G), s.n_cells,
                              _uinmf.unshared_names(T.gene_names(s), G))

    def make_plan(self, X: Any) -> MinibatchPlan:
        """The mini-batch plan over the datasets of ``X``, drawing from the model's Generator."""
        sources = T.as_sources(X)
        return MinibatchPlan([s.n_cells for s in sources], self.batch_size, self.max_epochs, self.chunk_size,
                             self._rng)

    def minibatches(self, X: Any, plan: MinibatchPlan | None = None, *, skip: int = 0):
        """Yield ``(step, {name: row blocks})`` over a plan (``partial_fit`` takes each dict: it replays ``fit``)."""
        sources = T.as_sources(X)
        yield from T.iter_batches(sources, self.make_plan(sources) if plan is None else plan, self._dt, skip)

    # ------------------------------------------------------------------ scenarios
    def fit(self, X: Any, y: None = None, *, progress: Callable | None = None, callback: T.StepCallback | None = None,
            resume: dict | None = None, client: Any = None, unshared: Mapping[str, int] | None = None) -> OnlineINMF:
        """Scenario 1: factorise all datasets of ``X`` from scratch.

        Parameters
        ----------
        X : matrix of shape (n_cells, n_genes), list of Source, or dict name -> matrix
            Prepared (normalised, gene-selected, scaled) data; one matrix is one dataset named "dataset".
        y : ignored
        progress : callable ``progress(step, n_steps, epoch)``, optional
        callback : callable ``callback(estimator, position)``, optional
            Called after every mini-batch, e.g. :class:`onlinemf.model_io.Checkpoint`.
        resume : dict, optional
            The plan position of a checkpoint whose state this estimator holds
            (``onlinemf.model_io.read_checkpoint``); the result equals an uninterrupted run.
        client : dask.distributed.Client, optional
            Run the steps' work units on this cluster; its workers read their rows from the datasets' files
            (:mod:`onlinemf._dask`). The model equals the local one.
        unshared : dict name -> int, optional
            UINMF: dataset ``name``'s last u columns are features only it has (after the model's genes); they are
            learned as U_i with penalty ``lam`` like V_i. Datasets not named have the model's genes only.
        """
        sources = T.as_sources(X)
        if resume is None:
            self.initialize(sources, unshared=unshared)
        else:
            self._resume(resume, sources, "fit")
        self._mode = "fit"
        with T.open_executor(self.n_threads, client) as executor:
            T.run_plan(self, sources, executor, progress=progress, callback=callback, position=resume)
        return self

    def update(self, X: Any, *, progress: Callable | None = None, callback: T.StepCallback | None = None,
               resume: dict | None = None, client: Any = None, unshared: Mapping[str, int] | None = None) -> OnlineINMF:
        """Scenario 2: add new datasets; W continues, the existing datasets are frozen.

        Old V/A/B still enter the W update but are not changed, and old data are never read. New datasets get
        V from K random cells, zero A/B and their own plan. Re-solving H of old cells is a separate step
        (:meth:`transform`). ``X``, ``progress``, ``callback``, ``resume``, ``client``, ``unshared``: as in :meth:`fit`
        (new datasets only); frozen datasets keep their U_i as they keep V_i.
        """
        sources = T.as_sources(X)
        self._validate_params()
        if resume is not None:
            self._resume(resume, sources, "update")
        else:
            self._check_fitted()
            for s in sources:
                if s.name in self.V_:
                    msg = f"update: expected new dataset names, found {s.name!r} already in the model"
                    raise InputError(msg)
            old = list(self.dataset_names_)
            self._add_sources(sources, _uinmf.unshared_counts(unshared, [s.name for s in sources]), self._rng)
            self.frozen_.update(old)
        self._mode = "update"
        with T.open_executor(self.n_threads, client) as executor:
            T.run_plan(self, sources, executor, progress=progress, callback=callback, position=resume)
        return self

    def _resume(self, position: dict, sources: list[Source], mode: str) -> None:
        self._check_fitted()
        self._validate_params()
        T.check_position(position, sources, mode)
        for s in sources:  # the checkpoint's genes, in its order
            self._check_genes(s.n_genes, T.gene_names(s), s.name, self._n_unshared(s.name))

    def fit_transform(self, X: Any, y: None = None, **fit_params: Any) -> np.ndarray | list[np.ndarray]:
        """Fit, then H: for one matrix ``fit(X).transform(X)`` (shape (n_cells, K), on W as scikit-learn
        expects); for several datasets the list of each dataset's H with its own ``W + V_i``."""
        self.fit(X, **fit_params)
        if T.is_matrix(X):
            return self.transform(X)
        return [self.transform_source(s, dataset=s.name)[0] for s in T.as_sources(X)]

    # ------------------------------------------------------------------ H and objective
    def _factors(self, dataset: str | None) -> DatasetFactors:
        self._check_fitted()
        if dataset is not None and dataset not in self.V_:
            msg = f"dataset: expected one of {self.dataset_names_}, found {dataset!r}"
            raise InputError(msg)
        V = None if dataset is None else self.V_[dataset]
        return _step.dataset_factors(self.W_, V, float(self.lam) if V is not None else 0.0)

    def transform(self, X: Any, *, dataset: str | None = None) -> np.ndarray:
        """H of the cells in ``X``, shape (n_cells, K); never changes the model.

        ``dataset``: a known dataset uses ``W + V_dataset`` and ``lam`` (with unshared features, ``X`` has them after
        the model's genes and H solves the stacked UINMF system); None projects on W only, on the model's genes
        only (scenario 3: U_i, like V_i, belongs to its dataset).
        """
        factors = self._factors(dataset)
        names = T._column_names(X)
        X = as_matrix(materialize(X), "X" if dataset is None else str(dataset), dtype=self._dt)
        self._check_genes(X.shape[1], names, "X", self._n_unshared(dataset))
        H = np.empty((X.shape[0], self.n_components), dtype=self._dt)
        blocks = ((a, min(a + 4 * _step.UNIT_ROWS, X.shape[0]), CsrRowRange(X, a, min(a + 4 * _step.UNIT_ROWS, X.shape[0])))
                  for a in range(0, X.shape[0], 4 * _step.UNIT_ROWS))
        for start, stop, H_block, _ in T.h_blocks(blocks, factors, self._dt, self.h_sweeps, self.n_threads, False):
            H[start:stop] = H_block
        return H

    def transform_source(self, source: Source, *, dataset: str | None = None, block_size: int = 10000,
                         with_objective: bool = False) -> tuple[np.ndarray, float | None]:
        """H of every cell of ``source`` (n_cells, K), streamed in blocks, and the dataset's exact loss if asked."""
        factors = self._factors(dataset)
        self._check_genes(source.n_genes, T.gene_names(source), source.name, self._n_unshared(dataset))
        H = np.empty((source.n_cells, self.n_components), dtype=self._dt)
        total = 0.0
        for start, stop, H_block, loss in T.h_blocks(source.iter_blocks(block_size), factors, self._dt, self.h_sweeps,
                                                                self.n_threads, with_objective):
            H[start:stop] = H_block
            total += loss
        return H, (total if with_objective else None)

    def objective(self, X: Any, *, block_size: int = 10000) -> float:
        """Exact objective over known datasets, H re-solved per block, streamed."""
        return sum(self.transform_source(s, dataset=s.name, block_size=block_size, with_objective=True)[1]  # type: ignore[misc]
                   for s in T.as_sources(X))  # with_objective=True: never None

