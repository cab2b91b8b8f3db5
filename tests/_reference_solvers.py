"""Reference solvers kept for the tests only: exact NNLS by block principal pivoting, batch iNMF by ANLS.

They are slow and exact; the library uses coordinate descent (``onlinemf._solvers.nnls_cd``) and the online
loop, and the tests check both against these.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from onlinemf._solvers import gram, hals_update, init_w, nnls_cd, pick_nonempty_rows, rhs, squared_norm, v_from_cells, xt_times


def nnls_bpp(G: np.ndarray, C: np.ndarray, *, max_iter: int = 500, chunk: int = 2048) -> np.ndarray:
    """Exact NNLS by block principal pivoting (Kim & Park 2011), batched over cells.

    Every pivot step solves all still-infeasible cells at once with one batched masked
    ``numpy.linalg.solve`` (rows/columns outside the passive set replaced by the identity).
    Used as the test oracle. Computed in float64.

    Parameters
    ----------
    G : ndarray of shape (K, K)
    C : ndarray of shape (K, n)

    Returns
    -------
    Ht : ndarray of shape (K, n), float64
    """
    G = np.asarray(G, dtype=np.float64)
    Ct_all = np.asarray(C, dtype=np.float64).T
    n, K = Ct_all.shape
    out = np.empty((n, K))
    eye = np.eye(K, dtype=bool)
    for lo in range(0, n, chunk):
        Ct = Ct_all[lo : lo + chunk]
        m = Ct.shape[0]
        tol = 1e-12 * max(1.0, float(np.abs(Ct).max(initial=0.0)))
        F = np.zeros((m, K), dtype=bool)
        x = np.zeros((m, K))
        y = -Ct.copy()
        alpha = np.full(m, 3)
        beta = np.full(m, K + 1)
        for _ in range(max_iter):
            infeasible = (F & (x < 0)) | (~F & (y < -tol))
            n_inf = infeasible.sum(axis=1)
            todo = n_inf > 0
            if not todo.any():
                break
            full = todo & (n_inf < beta)
            beta[full] = n_inf[full]
            alpha[full] = 3
            partial = todo & ~full & (alpha >= 1)
            alpha[partial] -= 1
            backup = np.flatnonzero(todo & ~full & ~partial)
            flip = infeasible & todo[:, None]
            if backup.size:
                last = K - 1 - np.argmax(infeasible[backup, ::-1], axis=1)
                flip[backup] = False
                flip[backup, last] = True
            F ^= flip
            rows = np.flatnonzero(todo)
            Fr = F[rows]
            M = np.where(Fr[:, :, None] & Fr[:, None, :], G, 0.0)
            M[:, eye] += ~Fr
            xr = np.linalg.solve(M, np.where(Fr, Ct[rows], 0.0)[..., None])[..., 0]
            x[rows] = xr
            yr = xr @ G - Ct[rows]
            yr[Fr] = 0.0
            y[rows] = yr
        out[lo : lo + m] = x
    np.maximum(out, 0, out=out)
    return out.T


def fit_batch_inmf(Xs, k: int, lam: float, n_iter: int, rng: np.random.Generator, *, h_solver: str = "bpp",
                   hals_sweeps: int = 5, h_sweeps: int = 20, dtype=np.float64):
    """Batch iNMF by ANLS (reference for tests): exact/warm CD NNLS for H, HALS sweeps for W, V.

    Every block step does not increase the objective, so the returned objective sequence is
    non-increasing (``h_solver="cd"`` warm-starts from the previous H to keep that property).

    Parameters
    ----------
    Xs : list of CSR matrices or ndarrays, each (n_i, genes)
    k : int
    lam : float
    n_iter : int
    rng : numpy.random.Generator

    Returns
    -------
    W : ndarray (K, genes)
    Vs : list of ndarray (K, genes)
    Hs : list of ndarray (n_i, K)
    objectives : list of float, one per iteration (after its W/V update)
    """
    n_genes = Xs[0].shape[1]
    W = init_w(k, n_genes, rng, dtype)
    Vs = []
    for X in Xs:
        idx = pick_nonempty_rows(X, k, rng)
        if idx is None:
            msg = f"fit_batch_inmf: expected at least {k} non-empty cells per dataset, found fewer"
            raise ValueError(msg)
        Vs.append(v_from_cells(X[idx], dtype))
    Xs = [sp.csr_matrix(X, dtype=dtype) if sp.issparse(X) else np.asarray(X, dtype=dtype) for X in Xs]
    norms = [squared_norm(X) for X in Xs]
    Hts = [None] * len(Xs)
    objectives = []
    for _ in range(n_iter):
        As, Bs = [], []
        for i, X in enumerate(Xs):
            L = W + Vs[i]
            G = gram(W, Vs[i], lam)
            C = rhs(X, L).T
            if h_solver == "bpp":
                Hts[i] = nnls_bpp(G, C).astype(dtype)
            else:
                Hts[i] = nnls_cd(G, C, n_sweeps=h_sweeps, H0=Hts[i])
            Ht = Hts[i]
            As.append(Ht @ Ht.T)
            Bs.append(np.ascontiguousarray(xt_times(X, Ht.T).T))
        hals_update(W, Vs, As, Bs, lam, [True] * len(Xs), n_sweeps=hals_sweeps)
        total = 0.0
        for i in range(len(Xs)):
            L = W + Vs[i]
            total += norms[i] - 2.0 * float(np.vdot(Bs[i], L)) + float(np.vdot(As[i], gram(W, Vs[i], lam)))
        objectives.append(total)
    return W, Vs, [Ht.T for Ht in Hts], objectives
