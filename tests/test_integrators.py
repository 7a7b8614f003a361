"""Every integrator step against a float64 dense computation (docs/algorithms.md §1–3, §8)."""

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankConv2d, LowRankLinear

from .helpers import DT, LeastSquares, ref_augment, ref_orth, ref_rank, ref_truncate

LR = 0.3


def make(n=12, m=9, r=3, tau=0.05, integrator="bug", **kw):
    kw.setdefault(
        "tau_mode", "relative"
    )  # the references truncate by the relative rule (test_rank_rule: the gradient rule)
    problem = LeastSquares(n, m)
    layer = LowRankLinear(m, n, rank=r, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=LR, tau=tau, **kw)
    return problem, layer, opt


def factors(layer):
    return layer.U.detach().clone(), layer.S.detach().clone(), layer.V.detach().clone()


def ref_bug(problem, U0, S0, V0, tau, s_steps=1):
    G0 = problem.G(U0 @ S0 @ V0.T)
    K1 = U0 @ S0 - LR * G0 @ V0
    L1 = V0 @ S0.T - LR * G0.T @ U0
    U_hat = ref_augment(U0, K1)
    V_hat = ref_augment(V0, L1)
    S = U_hat.T @ U0 @ S0 @ V0.T @ V_hat
    for _ in range(s_steps):
        S = S - LR * U_hat.T @ problem.G(U_hat @ S @ V_hat.T) @ V_hat
    return ref_truncate(U_hat, S, V_hat, tau)


def ref_parallel(problem, U0, S0, V0, tau, s_steps=1):
    r = S0.shape[0]
    G0 = problem.G(U0 @ S0 @ V0.T)
    U_new = ref_augment(U0, G0 @ V0)[:, r:]
    V_new = ref_augment(V0, G0.T @ U0)[:, r:]
    S_hat = torch.zeros(r + U_new.shape[1], r + V_new.shape[1], dtype=DT)
    S_hat[:r, :r] = S0 - LR * U0.T @ G0 @ V0
    S_hat[:r, r:] = -LR * (G0.T @ U0).T @ V_new
    S_hat[r:, :r] = -LR * U_new.T @ (G0 @ V0)
    U_hat, V_hat = torch.cat([U0, U_new], 1), torch.cat([V0, V_new], 1)
    for _ in range(s_steps - 1):
        S_hat = S_hat - LR * U_hat.T @ problem.G(U_hat @ S_hat @ V_hat.T) @ V_hat
    return ref_truncate(U_hat, S_hat, V_hat, tau)


def ref_fixed(problem, U0, S0, V0):
    G0 = problem.G(U0 @ S0 @ V0.T)
    U1 = ref_orth(U0 @ S0 - LR * G0 @ V0)
    V1 = ref_orth(V0 @ S0.T - LR * G0.T @ U0)
    S = U1.T @ U0 @ S0 @ V0.T @ V1
    S = S - LR * U1.T @ problem.G(U1 @ S @ V1.T) @ V1
    return U1, S, V1


def ref_abc(problem, U0, S0, V0, tau, s_steps=1):
    """ABC-PSI (docs/algorithms.md §10): K-step, Û ⊇ U₀, Ŝ = ÛᵀU₀S₀, L-step at Û Ŝ V₀ᵀ = W₀, truncation."""
    G0 = problem.G(U0 @ S0 @ V0.T)
    U_hat = ref_augment(U0, -LR * G0 @ V0)
    S_hat = U_hat.T @ U0 @ S0
    L1 = V0 @ S_hat.T - LR * problem.G(U_hat @ S_hat @ V0.T).T @ U_hat
    if s_steps == 1:
        P, s, Qh = torch.linalg.svd(L1.T, full_matrices=False)
        r = ref_rank(s, tau)
        return U_hat @ P[:, :r], torch.diag(s[:r]), Qh.T[:, :r]
    V_hat = ref_orth(L1)
    S = V_hat.T @ L1  # = Rᵀ transposed back: W₁ = Û L1ᵀ = Û (V̂ᵀL1)ᵀ V̂ᵀ
    S = S.T
    for _ in range(s_steps - 1):
        S = S - LR * U_hat.T @ problem.G(U_hat @ S @ V_hat.T) @ V_hat
    return ref_truncate(U_hat, S, V_hat, tau)


def assert_same_point(layer, U, S, V):
    assert layer.rank == U.shape[1]
    torch.testing.assert_close(layer.matrix().detach(), U @ S @ V.T, atol=1e-10, rtol=1e-10)
    # Same subspaces, not only the same product.
    torch.testing.assert_close(layer.U @ layer.U.T, U @ U.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.V @ layer.V.T, V @ V.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.3])
def test_bug_steps_match_dense_reference(tau):
    problem, layer, opt = make(tau=tau)
    closure = problem.closure(layer, opt)
    for _ in range(4):
        expected = ref_bug(problem, *factors(layer), tau)
        opt.step(closure)
        assert_same_point(layer, *expected)


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.3])
def test_parallel_steps_match_dense_reference(tau):
    problem, layer, opt = make(tau=tau, integrator="parallel")
    closure = problem.closure(layer, opt)
    for _ in range(4):
        expected = ref_parallel(problem, *factors(layer), tau)
        opt.step(closure)
        assert_same_point(layer, *expected)


def test_fixed_steps_match_dense_reference():
    problem, layer, opt = make(integrator="fixed")
    closure = problem.closure(layer, opt)
    for _ in range(4):
        expected = ref_fixed(problem, *factors(layer))
        opt.step(closure)
        assert_same_point(layer, *expected)
        assert layer.rank == 3


@pytest.mark.parametrize("tau", [0.0, 0.05, 0.3])
def test_abc_steps_match_dense_reference(tau):
    # τ = 0: the step is W₁ = Û L¹ᵀ exactly (nothing truncated but round-off).
    problem, layer, opt = make(tau=tau, integrator="abc")
    closure = problem.closure(layer, opt)
    for _ in range(4):
        expected = ref_abc(problem, *factors(layer), tau)
        opt.step(closure)
        assert_same_point(layer, *expected)


def test_abc_takes_fewer_qr_decompositions_per_step_than_bug():
    counts = {}
    for integrator in ("bug", "abc", "parallel"):
        problem, layer, opt = make(tau=0.05, integrator=integrator)
        closure = problem.closure(layer, opt)
        opt.step(closure)
        with dlrt.linalg.count_decompositions() as n:
            opt.step(closure)
        counts[integrator] = (n.qr, n.svd)
    assert counts["bug"] == (2, 1) and counts["parallel"] == (2, 1)
    assert counts["abc"] == (1, 1)
    with dlrt.linalg.count_decompositions() as outer:  # nested blocks both count
        with dlrt.linalg.count_decompositions() as inner:
            dlrt.linalg.orth(torch.randn(6, 2, dtype=DT))
        dlrt.linalg.svd_truncate(torch.randn(3, 3, dtype=DT), rank=2)
    assert (outer.qr, outer.svd, inner.qr, inner.svd) == (1, 1, 1, 0)


@pytest.mark.parametrize("integrator, ref", [("bug", ref_bug), ("parallel", ref_parallel), ("abc", ref_abc)])
def test_coefficient_steps_match_dense_reference(integrator, ref):
    problem, layer, opt = make(tau=0.05, integrator=integrator, coefficient_steps=3)
    closure = problem.closure(layer, opt)
    for _ in range(2):
        expected = ref(problem, *factors(layer), 0.05, s_steps=3)
        r = layer.rank
        opt.step(closure)
        assert layer.U.shape[1] > r and opt.phase == 1  # held on the augmented basis
        opt.step(closure)
        assert opt.phase == 2
        opt.step(closure)
        assert opt.phase == 0
        assert_same_point(layer, *expected)


def test_near_full_rank_layer_gets_a_rectangular_augmented_core():
    problem, layer, opt = make(n=12, m=5, r=4, tau=0.0, coefficient_steps=2)
    opt.step(problem.closure(layer, opt))
    assert layer.S.shape == (8, 5)  # at most m - r = 1 new V-direction
    opt.step(problem.closure(layer, opt))
    assert layer.S.shape[0] == layer.S.shape[1] <= 5


def test_step_on_a_two_layer_network_matches_dense_reference():
    # The projected gradients of every layer come from one backward through the whole network.
    net = nn.Sequential(LowRankLinear(7, 6, 3, dtype=DT), nn.Tanh(), LowRankLinear(6, 5, 2, dtype=DT))
    x, y = torch.randn(16, 7, dtype=DT), torch.randn(16, 5, dtype=DT)
    opt = dlrt.DLRTOptimizer(net, integrator="parallel", optimizer="sgd", lr=LR, tau=0.0, tau_mode="relative")

    def dense_grads(Ws, bs):
        Ws = [W.clone().requires_grad_() for W in Ws]
        h = torch.tanh(x @ Ws[0].T + bs[0])
        ((h @ Ws[1].T + bs[1] - y) ** 2).mean().backward()
        return [W.grad for W in Ws]

    layers = [net[0], net[2]]
    before = [factors(layer) for layer in layers]
    biases = [layer.bias.detach().clone() for layer in layers]
    Gs = dense_grads([U @ S @ V.T for U, S, V in before], biases)

    def closure():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for layer, (U0, S0, V0), G0 in zip(layers, before, Gs):
        r = S0.shape[0]
        U_new = ref_augment(U0, G0 @ V0)[:, r:]
        V_new = ref_augment(V0, G0.T @ U0)[:, r:]
        a, b = U_new.shape[1], V_new.shape[1]
        S_hat = torch.zeros(r + a, r + b, dtype=DT)
        S_hat[:r, :r] = S0 - LR * U0.T @ G0 @ V0
        S_hat[:r, r:] = -LR * U0.T @ G0 @ V_new
        S_hat[r:, :r] = -LR * U_new.T @ G0 @ V0
        W = torch.cat([U0, U_new], 1) @ S_hat @ torch.cat([V0, V_new], 1).T
        torch.testing.assert_close(layer.matrix().detach(), W, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("integrator", ["bug", "parallel", "fixed", "abc"])
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.2), ("adam", 0.01), ("geo-heavyball", 0.05), ("geo-adam", 0.01)])
def test_bases_stay_orthonormal_over_500_steps(integrator, optimizer, lr):
    # Invariant 1 in float64; a problem whose target is full rank keeps ranks moving.
    problem = LeastSquares(24, 16, B=32)
    layer = LowRankLinear(16, 24, rank=6, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer=optimizer, lr=lr, tau=0.1, max_rank=12)
    closure = problem.closure(layer, opt)
    for _ in range(500):
        opt.step(closure)
    r = layer.rank
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(r, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(r, dtype=DT), atol=1e-10, rtol=0)
    assert r <= 12


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_bases_stay_orthonormal_in_float32(integrator):
    problem = LeastSquares(24, 16, B=32)
    X, Y = problem.X.float(), problem.Y.float()
    layer = LowRankLinear(16, 24, rank=6, bias=False)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=0.1, momentum=0.9, tau=0.1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    for _ in range(500):
        opt.step(closure)
    r = layer.rank
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(r), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_bases_stay_orthonormal_in_float32_over_3000_steps_of_cholesky_augmentation(integrator):
    # Large enough for the Cholesky-QR augmentation (2r <= n), with Adam: the basis is
    # re-orthonormalized at every augmentation, so round-off does not build up (worst seen 1.5e-6).
    torch.manual_seed(0)
    problem = LeastSquares(64, 48, B=64)
    X, Y = problem.X.float(), problem.Y.float()
    layer = LowRankLinear(48, 64, rank=8, bias=False)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="adam", lr=1e-2, tau=0.05, max_rank=20)
    calls = []
    householder = dlrt.linalg._qr

    def counted(A):
        calls.append(A.shape)
        return householder(A)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    worst = 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dlrt.linalg, "HOUSEHOLDER_MAX_COLUMNS", 0)  # the narrow blocks too: Cholesky QR is under test
        mp.setattr(dlrt.linalg, "_qr", counted)
        for i in range(3000):
            opt.step(closure)
            if i % 100 == 99:
                for B in (layer.U, layer.V):
                    B = B.detach()
                    worst = max(worst, float((B.T @ B - torch.eye(B.shape[1])).abs().max()))
    assert worst <= 1e-5
    assert not calls  # Householder QR is only the fallback: every augmentation here took Cholesky QR


@pytest.mark.parametrize(
    "integrator, start_rank, tau", [("bug", 16, 0.01), ("parallel", 16, 0.01), ("fixed", 4, 0.0), ("abc", 16, 0.01)]
)
def test_planted_low_rank_is_recovered(integrator, start_rank, tau):
    # Least squares with a rank-4 target W* (64×48), started at rank 16.
    problem = LeastSquares(64, 48, B=256, rank=4)
    layer = LowRankLinear(48, 64, rank=start_rank, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=0.5, tau=tau)
    closure = problem.closure(layer, opt)
    for _ in range(300):
        opt.step(closure)
    W = layer.matrix().detach()
    rel = float((W - problem.W_target).norm() / problem.W_target.norm())
    assert layer.rank == 4
    assert rel < 1e-6


def test_conv_network_trains_with_every_integrator():
    x = torch.randn(8, 2, 8, 8)
    y = torch.randint(0, 3, (8,))
    for integrator in ("bug", "parallel", "fixed", "abc"):
        torch.manual_seed(0)
        net = nn.Sequential(
            LowRankConv2d(2, 8, 3, rank=4, padding=1), nn.ReLU(), nn.Flatten(), LowRankLinear(8 * 64, 3, rank=3)
        )
        opt = dlrt.DLRTOptimizer(net, integrator=integrator, optimizer="sgd", lr=0.05, momentum=0.9, tau=0.05)

        def closure(net=net, opt=opt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        first = float(closure().detach())
        for _ in range(30):
            last = float(opt.step(closure).detach())
        assert last < 0.5 * first, integrator
        conv = net[0]
        torch.testing.assert_close(conv.U.T @ conv.U, torch.eye(conv.rank), atol=1e-5, rtol=0)
