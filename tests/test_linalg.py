import pytest
import torch

from dlrt import linalg

from .helpers import DT, ref_orth, ref_rank


def eye(k):
    return torch.eye(k, dtype=DT)


def _no_householder(monkeypatch):
    """The matrix-product paths only: Householder QR refused, also for the narrow CPU blocks it takes by default."""

    def refuse(A):
        raise AssertionError("Householder QR ran where matrix products suffice")

    monkeypatch.setattr(linalg, "HOUSEHOLDER_MAX_COLUMNS", 0)
    monkeypatch.setattr(linalg, "_qr", refuse)


@pytest.mark.parametrize("r0, k", [(8, 8), (12, 12)])
def test_narrow_cpu_blocks_take_householder_qr_and_wide_ones_cholesky_qr_with_the_same_result(monkeypatch, r0, k):
    U0 = linalg.orth(torch.randn(200, r0, dtype=DT))
    X = torch.randn(200, k, dtype=DT)
    A = torch.randn(200, r0 + k, dtype=DT)
    used = []
    for name in ("_qr", "_cholesky_pass"):
        real = getattr(linalg, name)
        monkeypatch.setattr(linalg, name, lambda *a, real=real, name=name, **kw: used.append(name) or real(*a, **kw))
    narrow = r0 + k <= linalg.HOUSEHOLDER_MAX_COLUMNS
    U_hat, R = linalg.augment_basis_qr(U0, X)
    Q, RA = linalg.qr(A)
    assert set(used) == ({"_qr"} if narrow else {"_cholesky_pass"})
    # the other path gives the same factors to round-off
    monkeypatch.setattr(linalg, "HOUSEHOLDER_MAX_COLUMNS", 0 if narrow else 1000)
    used.clear()
    U_other, R_other = linalg.augment_basis_qr(U0, X)
    Q_other, RA_other = linalg.qr(A)
    assert set(used) == ({"_cholesky_pass"} if narrow else {"_qr"})
    for mine, other in ((U_hat, U_other), (R, R_other), (Q, Q_other), (RA, RA_other)):
        torch.testing.assert_close(mine, other, atol=1e-12, rtol=0)
    torch.testing.assert_close(U_hat[:, :r0], U0, atol=1e-12, rtol=0)


def test_orth_is_orthonormal_with_nonnegative_diagonal():
    A = torch.randn(30, 7, dtype=DT)
    Q = linalg.orth(A)
    torch.testing.assert_close(Q.T @ Q, eye(7), atol=1e-13, rtol=0)
    R = Q.T @ A
    assert (torch.diagonal(R) >= 0).all()
    torch.testing.assert_close(Q @ R, A, atol=1e-12, rtol=0)


def test_orth_half_precision_is_computed_in_float32():
    Q = linalg.orth(torch.randn(16, 4, dtype=torch.bfloat16))
    assert Q.dtype == torch.bfloat16
    torch.testing.assert_close(Q.float().T @ Q.float(), torch.eye(4), atol=2e-2, rtol=0)


def test_augment_basis_keeps_U0_and_stays_orthonormal_when_X_is_rank_deficient():
    U0 = linalg.orth(torch.randn(20, 5, dtype=DT))
    # X lies almost entirely in range(U0): its complement has rank 1, of size 1e-9.
    X = U0 @ torch.randn(5, 5, dtype=DT)
    X[:, 0] += 1e-9 * torch.randn(20, dtype=DT)
    U_hat = linalg.augment_basis(U0, X)
    assert U_hat.shape == (20, 6)
    torch.testing.assert_close(U_hat.T @ U_hat, eye(6), atol=1e-13, rtol=0)
    torch.testing.assert_close(U_hat[:, :5], U0, atol=1e-13, rtol=0)
    # The new direction is the one X adds.
    residual = X - U_hat @ (U_hat.T @ X)
    assert float(residual.norm()) < 1e-13
    # X inside range(U0) or zero adds nothing.
    assert linalg.augment_basis(U0, U0 @ torch.randn(5, 3, dtype=DT)).shape == (20, 5)
    assert linalg.augment_basis(U0, torch.zeros(20, 3, dtype=DT)).shape == (20, 5)


def test_augment_basis_max_new_keeps_the_dominant_directions(monkeypatch):
    U0 = linalg.orth(torch.randn(20, 3, dtype=DT))
    _no_householder(monkeypatch)  # the spectral first pass caps the count
    comp = torch.eye(20, dtype=DT) - U0 @ U0.T
    big, small = comp @ torch.randn(20, dtype=DT), comp @ torch.randn(20, dtype=DT)
    X = torch.stack([1e-3 * small, big], 1)
    U_hat = linalg.augment_basis(U0, X, max_new=1)
    assert U_hat.shape == (20, 4)
    torch.testing.assert_close(abs(float(U_hat[:, 3] @ big)) / float(big.norm()), 1.0, atol=1e-5, rtol=0)


def test_augment_basis_caps_new_directions_at_n_minus_r():
    U0 = linalg.orth(torch.randn(8, 6, dtype=DT))
    U_hat = linalg.augment_basis(U0, torch.randn(8, 6, dtype=DT))
    assert U_hat.shape == (8, 8)
    torch.testing.assert_close(U_hat.T @ U_hat, eye(8), atol=1e-13, rtol=0)
    full = linalg.orth(torch.randn(8, 8, dtype=DT))
    assert linalg.augment_basis(full, torch.randn(8, 3, dtype=DT)).shape == (8, 8)


def test_well_conditioned_augmentation_is_cholesky_qr_equal_to_the_householder_result(monkeypatch):
    U0 = linalg.orth(torch.randn(40, 5, dtype=DT))
    X = torch.randn(40, 4, dtype=DT)
    Q, R = torch.linalg.qr(torch.cat([U0, X], 1))
    signs = torch.sign(torch.diagonal(R))
    _no_householder(monkeypatch)
    U_hat, R_hat = linalg.augment_basis_qr(U0, X)
    torch.testing.assert_close(U_hat, Q * signs, atol=1e-13, rtol=0)  # the QR factor with diag(R) >= 0
    torch.testing.assert_close(R_hat, R * signs[:, None], atol=1e-13, rtol=0)
    torch.testing.assert_close(R_hat, U_hat.T @ torch.cat([U0, X], 1), atol=1e-13, rtol=0)
    torch.testing.assert_close(linalg.orth(X), ref_orth(X), atol=1e-13, rtol=0)


def test_augmentation_re_orthonormalizes_a_drifted_basis(monkeypatch):
    # U0 off orthonormality by 1e-6 (round-off built up elsewhere): Û is orthonormal to machine
    # precision again, and its first columns still span range(U0).
    U0 = linalg.orth(torch.randn(40, 5, dtype=DT))
    U0 = U0 + 1e-6 * torch.randn_like(U0)
    _no_householder(monkeypatch)
    U_hat, R = linalg.augment_basis_qr(U0, torch.randn(40, 3, dtype=DT))
    torch.testing.assert_close(U_hat.T @ U_hat, eye(8), atol=1e-14, rtol=0)
    P = U_hat[:, :5] @ U_hat[:, :5].T
    torch.testing.assert_close(P @ U0, U0, atol=1e-14, rtol=0)
    torch.testing.assert_close(R[:, :5], U_hat.T @ U0, atol=1e-14, rtol=0)


def _ill_conditioned():
    # The part of X outside range(U0) has singular values 1, 1e-4 and 1e-9 (condition 1e9: hopeless for
    # Cholesky QR in either precision), all above float64's rank tolerance, the last below float32's.
    U0 = linalg.orth(torch.randn(50, 4, dtype=DT))
    comp = torch.linalg.qr(torch.randn(50, 50, dtype=DT))[0][:, 4:7]
    comp = comp - U0 @ (U0.T @ comp)
    return U0, U0 @ torch.randn(4, 3, dtype=DT) + comp * torch.tensor([1.0, 1e-4, 1e-9], dtype=DT)


def test_an_ill_conditioned_float32_complement_keeps_its_singular_directions_above_round_off(monkeypatch):
    U0, X = _ill_conditioned()
    U0, X = U0.float(), X.float()
    _no_householder(monkeypatch)  # the spectral first pass resolves it without Householder QR
    U_hat, R = linalg.augment_basis_qr(U0, X)
    assert U_hat.shape[1] == 6  # float32 cannot resolve the 1e-9 direction above round-off
    torch.testing.assert_close(U_hat.T @ U_hat, torch.eye(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(R, U_hat.T @ torch.cat([U0, X], 1), atol=1e-5, rtol=0)
    residual = X - U_hat @ (U_hat.T @ X)  # what is left is the dropped 1e-9 direction and round-off
    assert float(residual.norm()) < 1e-5


def test_an_ill_conditioned_float64_complement_takes_householder_qr_and_keeps_every_direction():
    U0, X = _ill_conditioned()
    U_hat, R = linalg.augment_basis_qr(U0, X)
    assert U_hat.shape[1] == 7
    torch.testing.assert_close(U_hat.T @ U_hat, eye(7), atol=1e-13, rtol=0)
    torch.testing.assert_close(R, U_hat.T @ torch.cat([U0, X], 1), atol=1e-13, rtol=0)
    assert float((X - U_hat @ (U_hat.T @ X)).norm()) < 1e-13


def test_galerkin_matches_dense_projection():
    U0, V0 = linalg.orth(torch.randn(12, 3, dtype=DT)), linalg.orth(torch.randn(9, 3, dtype=DT))
    U1, V1 = linalg.orth(torch.randn(12, 5, dtype=DT)), linalg.orth(torch.randn(9, 4, dtype=DT))
    S0 = torch.randn(3, 3, dtype=DT)
    W = U0 @ S0 @ V0.T
    torch.testing.assert_close(linalg.galerkin(U1, U0, S0, V0, V1), U1.T @ W @ V1, atol=1e-13, rtol=0)


@pytest.mark.parametrize("tau", [0.0, 0.01, 0.1, 0.3, 0.9])
def test_truncation_rank_matches_the_rule(tau):
    sigma = torch.sort(torch.rand(20, dtype=DT) ** 3, descending=True).values
    assert linalg.truncation_rank(sigma, tau) == ref_rank(sigma, tau)


def test_truncation_rank_absolute_and_clamps():
    sigma = torch.tensor([5.0, 2.0, 1.0, 0.1, 0.01], dtype=DT)
    assert linalg.truncation_rank(sigma, 0.2, absolute=True) == 3
    assert linalg.truncation_rank(sigma, 0.2, absolute=True, max_rank=2) == 2
    assert linalg.truncation_rank(sigma, 10.0, absolute=True) == 1
    assert linalg.truncation_rank(sigma, 10.0, absolute=True, min_rank=2) == 2
    assert linalg.truncation_rank(sigma, 0.0) == 5
    assert linalg.truncation_rank(torch.tensor([3.0, 1.0, 0.0, 0.0]), 0.0) == 2
    with pytest.raises(ValueError, match="tau"):
        linalg.truncation_rank(sigma, -0.1)


def test_svd_truncate_with_tau_zero_leaves_the_matrix_unchanged():
    # Invariant 2: the right singular vectors are the columns of Qᴴᵀ (the public codes' transpose bug breaks this).
    S = torch.randn(6, 6, dtype=DT)
    U_hat, V_hat = linalg.orth(torch.randn(15, 6, dtype=DT)), linalg.orth(torch.randn(11, 6, dtype=DT))
    t = linalg.svd_truncate(S, tau=0.0)
    assert t.rank == 6
    W_before = U_hat @ S @ V_hat.T
    W_after = (U_hat @ t.P) @ t.S @ (V_hat @ t.Q).T
    torch.testing.assert_close(W_after, W_before, atol=1e-12, rtol=0)


def test_svd_truncate_rectangular_core():
    S = torch.randn(5, 3, dtype=DT)
    t = linalg.svd_truncate(S, tau=0.0)
    torch.testing.assert_close(t.P @ t.S @ t.Q.T, S, atol=1e-12, rtol=0)


def test_global_truncation_pools_singular_values():
    s1 = torch.tensor([10.0, 1.0, 0.5], dtype=DT)
    s2 = torch.tensor([3.0, 2.0, 0.1], dtype=DT)
    assert linalg.global_truncation_ranks([s1, s2], budget=4) == [2, 2]
    assert linalg.global_truncation_ranks([s1, s2], budget=3) == [1, 2]
    assert linalg.global_truncation_ranks([s1, s2], budget=2) == [1, 1]  # min_rank 1 each
    assert linalg.global_truncation_ranks([s1, s2], budget=6) == [3, 3]
    # Global relative tau: drop while the pooled tail norm <= tau * ||all sigma||.
    total = float(torch.cat([s1, s2]).norm())
    ranks = linalg.global_truncation_ranks([s1, s2], tau=0.55 / total)
    assert ranks == [2, 2]  # drops 0.5 and 0.1 (tail norm 0.51), keeps 1.0
    assert linalg.global_truncation_ranks([s1, s2], budget=4, max_ranks=[1, None]) == [1, 3]
    with pytest.raises(ValueError, match="budget"):
        linalg.global_truncation_ranks([s1, s2], budget=1)


def test_a_budget_in_parameters_prices_every_rank_and_stops_at_the_first_that_does_not_fit():
    """Two layer sizes: the pooled order is the same, the budget is spent on what each rank costs."""
    big = torch.tensor([10.0, 5.0, 4.0, 1.0], dtype=DT)  # each rank costs 10
    small = torch.tensor([8.0, 3.0, 2.0, 0.5], dtype=DT)  # each rank costs 2
    costs = [[10.0] * 4, [2.0] * 4]
    # Counted in ranks, a total of 4 keeps the two largest pooled values beyond the floors: 5 and 4, both big.
    assert linalg.global_truncation_ranks([big, small], budget=4) == [3, 1]
    # 34 parameters: floors 10 + 2, then 5 (10), 4 (10) and 3 (2) exactly fill it.
    assert linalg.global_truncation_ranks([big, small], budget=34, costs=costs) == [3, 2]
    # 26: after 5 (10) four are left; the next value, 4, costs 10 and stops the cut although 3 (2) would fit.
    assert linalg.global_truncation_ranks([big, small], budget=26, costs=costs) == [2, 1]
    # 38: floors 12, then 5, 4, 3, 2 (24); the next, 1, costs 10 of the 2 left.
    assert linalg.global_truncation_ranks([big, small], budget=38, costs=costs) == [3, 3]
    # A price growing with the rank (as the core's k² of a matrix layer): the big layer's 2nd and 3rd ranks
    # cost 12 and 14, so the same 38 buys 5 and 4 only, and 3 (2) does not come after 4 no longer fits.
    rising = [[10.0, 12.0, 14.0, 16.0], [2.0] * 4]
    assert linalg.global_truncation_ranks([big, small], budget=38, costs=rising) == [3, 1]
    assert linalg.global_truncation_ranks([big, small], budget=37, costs=rising) == [2, 1]
    # Floors hold and are paid first; tau still cuts within the budget; max_rank caps the candidates.
    assert linalg.global_truncation_ranks([big, small], budget=12, costs=costs) == [1, 1]
    assert linalg.global_truncation_ranks([big, small], budget=100, costs=costs, min_ranks=[1, 3]) == [4, 4]
    assert linalg.global_truncation_ranks([big, small], budget=100, costs=costs, max_ranks=[2, None]) == [2, 4]
    total = float(torch.cat([big, small]).norm())
    assert linalg.global_truncation_ranks([big, small], tau=1.2 / total, budget=100, costs=costs) == [3, 3]
    with pytest.raises(ValueError, match=r"below what the layers' min_rank cost \(12\)"):
        linalg.global_truncation_ranks([big, small], budget=11, costs=costs)
    with pytest.raises(ValueError, match="give budget= too"):
        linalg.global_truncation_ranks([big, small], tau=0.1, costs=costs)
    with pytest.raises(ValueError, match="one cost per rank"):
        linalg.global_truncation_ranks([big, small], budget=40, costs=[[10.0] * 3, [2.0] * 4])


def test_the_energy_order_takes_the_largest_sigma_squared_per_unit_of_budget():
    big = torch.tensor([10.0, 5.0, 4.0, 1.0], dtype=DT)  # σ²/cost beyond the floor: 2.5, 1.6, 0.1
    small = torch.tensor([8.0, 3.0, 2.0, 0.5], dtype=DT)  # 4.5, 2, 0.125
    costs = [[10.0] * 4, [2.0] * 4]
    # 26: σ order buys 5 (10) and stops at 4; by energy 3 (2), 5 (10), 2 (2) fill the 14 left after the floors.
    assert linalg.global_truncation_ranks([big, small], budget=26, costs=costs) == [2, 1]
    assert linalg.global_truncation_ranks([big, small], budget=26, costs=costs, order="energy") == [2, 3]
    # Within what tau keeps (5, 4, 3, 2; see the test above): the same 26 takes 3, 5, 2 again, and 38 all four.
    total = float(torch.cat([big, small]).norm())
    assert linalg.global_truncation_ranks([big, small], tau=1.2 / total, budget=26, costs=costs, order="energy") == [
        2,
        3,
    ]
    assert linalg.global_truncation_ranks([big, small], tau=1.2 / total, budget=99, costs=costs, order="energy") == [
        3,
        3,
    ]
    # Without costs (a budget in ranks) σ² orders as σ does.
    for budget in (2, 3, 4, 5, 8):
        assert linalg.global_truncation_ranks([big, small], budget=budget, order="energy") == (
            linalg.global_truncation_ranks([big, small], budget=budget)
        )
    with pytest.raises(ValueError, match="order must be one of"):
        linalg.global_truncation_ranks([big, small], budget=4, order="sigma2")


@pytest.mark.parametrize("absolute", [False, True])
def test_global_truncation_of_one_layer_is_the_local_rule_even_when_max_rank_binds(absolute):
    """Values beyond max_rank are dropped anyway; they count towards the dropped norm as in the local rule."""
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=DT)
    for tau in (0.05, 0.2, 0.3, 0.5, 1.2, 1.5) if absolute else (0.05, 0.2, 0.3, 0.4, 0.6):
        for max_rank in (1, 2, 3, 4):
            local = linalg.truncation_rank(sigma, tau, absolute=absolute, max_rank=max_rank)
            pooled = linalg.global_truncation_ranks([sigma], tau=tau, absolute=absolute, max_ranks=[max_rank])
            assert pooled == [local], (tau, max_rank)
    # σ = [3, 2, 1, 1], max_rank 3, ϑ = 1.2: the forced drop (1) leaves room for nothing more.
    assert linalg.global_truncation_ranks([sigma], tau=1.2, absolute=True, max_ranks=[3]) == [3]


@pytest.mark.parametrize("target", ["random", "augmented", "truncated"])
def test_tangent_transport_equals_dense_tangent_projection(target):
    """The factored transport equals projecting the full n×m tangent vector onto the new tangent space."""
    n, m, r0_u, r0_v = 14, 10, 3, 4
    U0, V0 = linalg.orth(torch.randn(n, r0_u, dtype=DT)), linalg.orth(torch.randn(m, r0_v, dtype=DT))
    M = linalg.tangent_project(U0, V0, torch.randn(n, m, dtype=DT))  # a tangent vector at (U0, V0)
    torch.testing.assert_close(linalg.tangent_project(U0, V0, M), M, atol=1e-12, rtol=0)
    if target == "random":
        U1, V1 = linalg.orth(torch.randn(n, 5, dtype=DT)), linalg.orth(torch.randn(m, 2, dtype=DT))
    elif target == "augmented":  # the old bases plus new directions: the new K, L blocks are not zero
        U1 = linalg.augment_basis(U0, torch.randn(n, 3, dtype=DT))
        V1 = linalg.augment_basis(V0, torch.randn(m, 2, dtype=DT))
    else:  # a rotated sub-basis of the old one, as a truncation leaves
        U1, V1 = U0 @ linalg.orth(torch.randn(r0_u, 2, dtype=DT)), V0 @ linalg.orth(torch.randn(r0_v, 2, dtype=DT))
    K1, L1, S1 = linalg.tangent_transport(U0, V0, M @ V0, M.T @ U0, U0.T @ M @ V0, U1, V1)
    P1 = linalg.tangent_project(U1, V1, M)
    torch.testing.assert_close(K1, P1 @ V1, atol=1e-10, rtol=0)
    torch.testing.assert_close(L1, P1.T @ U1, atol=1e-10, rtol=0)
    torch.testing.assert_close(S1, U1.T @ P1 @ V1, atol=1e-10, rtol=0)
    if target == "augmented":
        assert (K1[:, r0_v:].norm() > 0.1) and (L1[:, r0_u:].norm() > 0.1)  # zero padding would be wrong here


@pytest.mark.parametrize("tau", [float("nan"), float("inf"), -0.1])
def test_non_finite_or_negative_tau_is_a_clear_error(tau):
    # NaN once slipped past "tau < 0" and failed as an IndexError in the first truncation.
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=DT)
    with pytest.raises(ValueError, match="tau must be a finite number"):
        linalg.truncation_rank(sigma, tau)
    with pytest.raises(ValueError, match="tau must be a finite number"):
        linalg.global_truncation_ranks([sigma, sigma], tau=tau)
