"""Batch UINMF by ANLS, written from the formulas of ``reference/uinmf.md`` alone (tests only).

Dense float64, exact NNLS for H (block principal pivoting) and exact coordinate minimisation for every row of
W, V_i and U_i. It shares no code with the library's UINMF path (only the NNLS oracle of the iNMF tests), so the
tests can hold the online estimator against it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from _reference_solvers import nnls_bpp


def _dense(X) -> np.ndarray:
    return X.toarray().astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)


def h_system(E, P, W, V, U, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``G`` (K, K) and ``C`` (K, n) of the H problem of one dataset: min 1/2 h^T G h - c^T h, h >= 0."""
    L = W + V
    G = L @ L.T + U @ U.T + lam * (V @ V.T + U @ U.T)
    C = (E @ L.T + P @ U.T).T
    return G, C


def objective(Es, Ps, Hs, W, Vs, Us, lam: float) -> float:
    """``sum_i ||E_i - H_i (W+V_i)||^2 + ||P_i - H_i U_i||^2 + lam (||H_i V_i||^2 + ||H_i U_i||^2)``, dense."""
    total = 0.0
    for E, P, H, V, U in zip(Es, Ps, Hs, Vs, Us, strict=True):
        total += np.sum((E - H @ (W + V)) ** 2) + np.sum((P - H @ U) ** 2)
        total += lam * (np.sum((H @ V) ** 2) + np.sum((H @ U) ** 2))
    return float(total)


def _unit_rows(M: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(M, axis=1, keepdims=True)
    return np.divide(M, norm, out=np.zeros_like(M), where=norm > 0)


def fit_batch_uinmf(Es, Ps, k: int, lam: float, n_iter: int, rng: np.random.Generator, *, sweeps: int = 3):
    """Batch UINMF: per iteration exact H for every dataset, then ``sweeps`` HALS sweeps of W, each V_i, each U_i.

    Every step minimises the objective exactly over its block, so the objectives never increase.

    Parameters
    ----------
    Es : list of (n_i, genes) matrices, shared genes
    Ps : list of (n_i, u_i) matrices, unshared features (u_i may be 0)

    Returns
    -------
    W (K, genes), Vs [(K, genes)], Us [(K, u_i)], Hs [(n_i, K)], objectives (one per iteration, after its update)
    """
    Es, Ps = [_dense(E) for E in Es], [_dense(P) for P in Ps]
    g = Es[0].shape[1]
    W = _unit_rows(rng.uniform(0.0, 2.0, size=(k, g)))
    Vs, Us = [], []
    for E, P in zip(Es, Ps, strict=True):
        cells = rng.permutation(np.flatnonzero(E.any(axis=1)))[:k]
        Vs.append(_unit_rows(E[np.sort(cells)]))
        Us.append(_unit_rows(P[np.sort(cells)]))
    c = 1.0 + lam
    objectives, Hs = [], []
    for _ in range(n_iter):
        Hs = [nnls_bpp(*h_system(E, P, W, V, U, lam)).T for E, P, V, U in zip(Es, Ps, Vs, Us, strict=True)]
        As = [H.T @ H for H in Hs]
        Bs = [E.T @ H for E, H in zip(Es, Hs, strict=True)]
        BUs = [P.T @ H for P, H in zip(Ps, Hs, strict=True)]
        for _ in range(sweeps):
            for j in range(k):
                curv = sum(A[j, j] for A in As)
                if curv > 0:
                    grad = sum(B[:, j] - A[j] @ (W + V) for A, B, V in zip(As, Bs, Vs, strict=True))
                    W[j] = np.maximum(0.0, W[j] + grad / curv)
            for A, B, BU, V, U in zip(As, Bs, BUs, Vs, Us, strict=True):
                for j in range(k):
                    if A[j, j] > 0:
                        V[j] = np.maximum(0.0, V[j] + (B[:, j] - A[j] @ (W + V) - lam * (A[j] @ V)) / (c * A[j, j]))
                        U[j] = np.maximum(0.0, U[j] + (BU[:, j] - c * (A[j] @ U)) / (c * A[j, j]))
        objectives.append(objective(Es, Ps, Hs, W, Vs, Us, lam))
    return W, Vs, Us, Hs, objectives
