"""The geometric optimizers (docs/algorithms.md §9) against float64 dense computations, and their invariances."""

import copy

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankLinear, linalg
from dlrt.integrators.base import change_basis, factor_state

from .helpers import DT, LeastSquares, ref_augment, ref_truncate

LR, BETA = 0.1, 0.8


def tangent(layer, opt):
    """The layer's momentum as the dense n×m tangent vector M = K Vᵀ + U Lᵀ − U S Vᵀ."""
    K, L, S = (factor_state(opt, layer, kind)["tangent"] for kind in ("K", "L", "S"))
    U, V = layer.U.detach(), layer.V.detach()
    return K @ V.T + U @ L.T - U @ S @ V.T


def proj(U, V, M):
    return linalg.tangent_project(U, V, M)


def ref_geo_bug(problem, U0, S0, V0, M, tau):
    """One bug step with heavy-ball momentum M (dense, tangent at W₀); returns the point and the new momentum."""
    G0 = problem.G(U0 @ S0 @ V0.T)
    D = G0 + BETA * M
    U_hat = ref_augment(U0, -LR * D @ V0)
    V_hat = ref_augment(V0, -LR * D.T @ U0)
    S_hat = U_hat.T @ U0 @ S0 @ V0.T @ V_hat - LR * U_hat.T @ D @ V_hat
    U1, S1, V1 = ref_truncate(U_hat, S_hat, V_hat, tau)
    return (U1, S1, V1), proj(U1, V1, proj(U0, V0, D))


def make(integrator="bug", optimizer="geo-heavyball", n=12, m=9, r=3, tau=0.05, seed=0, **kw):
    torch.manual_seed(seed)
    problem = LeastSquares(n, m, rank=4)
    layer = LowRankLinear(m, n, rank=r, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer=optimizer, tau=tau, **kw)
    return problem, layer, opt


@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_heavy_ball_steps_and_transported_momentum_match_dense_reference(tau):
    # The momentum, kept factored and moved through augmentation and truncation, equals the full
    # n×m buffer projected onto each new tangent space; the points equal the dense reference.
    problem, layer, opt = make(lr=LR, momentum=BETA, tau=tau, tau_mode="relative")
    closure = problem.closure(layer, opt)
    M = torch.zeros(12, 9, dtype=DT)
    for _ in range(5):
        U0, S0, V0 = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
        (U1, S1, V1), M = ref_geo_bug(problem, U0, S0, V0, M, tau)
        opt.step(closure)
        torch.testing.assert_close(layer.matrix().detach(), U1 @ S1 @ V1.T, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(tangent(layer, opt), M, atol=1e-10, rtol=1e-10)
        assert M.norm() > 0.1  # the reference momentum is not trivially zero


@pytest.mark.parametrize(
    "integrator, coefficient_steps",
    [("bug", 1), ("bug", 3), ("parallel", 1), ("parallel", 3), ("abc", 1), ("abc", 3), ("fixed", 1)],
)
def test_zero_momentum_reduces_exactly_to_the_plain_integrator(integrator, coefficient_steps):
    runs = []
    for optimizer, kw in (("sgd", {}), ("geo-heavyball", {"momentum": 0.0})):
        problem, layer, opt = make(integrator, optimizer, lr=0.2, coefficient_steps=coefficient_steps, **kw)
        closure = problem.closure(layer, opt)
        for _ in range(9):
            opt.step(closure)
        runs.append(layer.matrix().detach())
    torch.testing.assert_close(runs[0], runs[1], atol=1e-12, rtol=0)


def rotate(opt, layer, seed):
    """Change the representation: U → UQ, V → VP, S → QᵀSP (W unchanged), the state moved along."""
    g = torch.Generator().manual_seed(seed)
    r_u, r_v = layer.S.shape
    Q = linalg.orth(torch.randn(r_u, r_u, generator=g, dtype=DT))
    P = linalg.orth(torch.randn(r_v, r_v, generator=g, dtype=DT))
    U, S, V = layer.U.detach(), layer.S.detach(), layer.V.detach()
    W = layer.matrix().detach().clone()
    with torch.no_grad():
        change_basis(opt, layer, U @ Q, V @ P, S1=Q.T @ S @ P, A=Q.T, B=P)
    torch.testing.assert_close(layer.matrix().detach(), W, atol=1e-12, rtol=0)


def trajectory_after_rotation(integrator, optimizer, rotated, steps=20, **kw):
    problem, layer, opt = make(integrator, optimizer, n=16, m=12, r=4, tau=0.05, **kw)
    closure = problem.closure(layer, opt)
    for _ in range(5):
        opt.step(closure)
    if rotated:
        rotate(opt, layer, seed=7)
    for _ in range(steps):
        opt.step(closure)
    return layer.matrix().detach()


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
@pytest.mark.parametrize("optimizer, kw", [("geo-heavyball", {"lr": 0.1}), ("geo-adam", {"lr": 0.05})])
def test_geometric_trajectory_is_invariant_to_the_factor_representation(integrator, optimizer, kw):
    plain = trajectory_after_rotation(integrator, optimizer, rotated=False, **kw)
    rotated = trajectory_after_rotation(integrator, optimizer, rotated=True, **kw)
    torch.testing.assert_close(rotated, plain, atol=1e-10, rtol=0)


def test_per_entry_adam_is_not_invariant_to_the_factor_representation():
    # The property above is not automatic: per-entry Adam on K, L, S changes its steps under the same rotation.
    plain = trajectory_after_rotation("bug", "adam", rotated=False, lr=0.05)
    rotated = trajectory_after_rotation("bug", "adam", rotated=True, lr=0.05)
    assert float((rotated - plain).norm()) > 1e-3


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_geo_adam_is_invariant_to_the_scale_of_the_loss(integrator):
    # With eps = 0 the step depends on the gradient only through m / √v: scaling the loss by c changes nothing.
    out = []
    for scale in (1.0, 1000.0):
        problem, layer, opt = make(integrator, "geo-adam", lr=0.05, eps=0.0)

        def closure(problem=problem, layer=layer, opt=opt, scale=scale):
            opt.zero_grad()
            loss = scale * problem.loss(layer(problem.X))
            loss.backward()
            return loss

        for _ in range(15):
            opt.step(closure)
        out.append(layer.matrix().detach())
    torch.testing.assert_close(out[0], out[1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("optimizer, invariant", [("geo-heavyball", True), ("geo-adam", True), ("adam", False)])
def test_trajectory_commutes_with_orthogonal_changes_of_input_and_output_coordinates(optimizer, invariant):
    # W → O₁ W O₂ᵀ with inputs x → O₂ x and targets y → O₁ y: the geometric methods see the same problem.
    torch.manual_seed(3)
    problem = LeastSquares(10, 8, rank=3)
    O1, O2 = linalg.orth(torch.randn(10, 10, dtype=DT)), linalg.orth(torch.randn(8, 8, dtype=DT))
    out = []
    for rotated in (False, True):
        layer = LowRankLinear(8, 10, rank=3, bias=False, dtype=DT)
        torch.manual_seed(4)
        layer.init_from_matrix(torch.randn(10, 8, dtype=DT), rank=3)
        X, Y = problem.X, problem.Y
        if rotated:
            with torch.no_grad():
                layer.set_factors(O1 @ layer.U, layer.S.detach(), O2 @ layer.V)
            X, Y = X @ O2.T, Y @ O1.T
        opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer=optimizer, lr=0.05, tau=0.05)

        def closure(layer=layer, opt=opt, X=X, Y=Y):
            opt.zero_grad()
            loss = 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()
            loss.backward()
            return loss

        for _ in range(20):
            opt.step(closure)
        W = layer.matrix().detach()
        out.append(O1.T @ W @ O2 if rotated else W)
    gap = float((out[0] - out[1]).abs().max())
    assert gap < 1e-10 if invariant else gap > 1e-3


def test_geo_adam_second_moment_is_non_negative_and_bias_corrected():
    problem, layer, opt = make("bug", "geo-adam", lr=0.05, tau=0.2)
    closure = problem.closure(layer, opt)
    ranks = set()
    for t in range(1, 31):
        opt.step(closure)
        state = factor_state(opt, layer, "S")
        assert state["step"] == t and float(state["exp_avg_sq"]) >= 0.0
        ranks.add(layer.rank)
    # The first step moves W by lr·√r in Frobenius norm along the normalized gradient (bias correction).
    problem, layer, opt = make("parallel", "geo-adam", lr=0.05, eps=0.0)
    W0 = layer.matrix().detach().clone()
    opt.step(problem.closure(layer, opt))
    assert float((layer.matrix().detach() - W0).norm()) == pytest.approx(0.05 * 3**0.5, rel=0.3)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_geo_adam_per_coordinate_second_moment_scales_the_step_by_the_layer_size(integrator):
    # second_moment="coordinates" averages ‖P(G)‖² over the r(n + m − r) tangent coordinates instead of
    # the rank r: at a fixed rank every step is √(n + m − r) times the "rank" step at the same lr
    # (eps = 0), so the two trajectories coincide when the lr makes up that factor.
    n, m, r = 12, 9, 3
    out = []
    for moment, lr in (("rank", 0.05), ("coordinates", 0.05 / (n + m - r) ** 0.5)):
        problem, layer, opt = make(
            integrator, "geo-adam", n=n, m=m, r=r, lr=lr, eps=0.0, min_rank=r, max_rank=r, second_moment=moment
        )
        closure = problem.closure(layer, opt)
        for _ in range(6):
            opt.step(closure)
        assert layer.rank == r
        out.append(layer.matrix().detach())
    torch.testing.assert_close(out[0], out[1], atol=1e-10, rtol=1e-10)
    # At the same lr the per-coordinate step is the larger one, by about that factor.
    moved = []
    for moment in ("rank", "coordinates"):
        problem, layer, opt = make(integrator, "geo-adam", n=n, m=m, r=r, lr=1e-3, eps=0.0, second_moment=moment)
        W0 = layer.matrix().detach().clone()
        opt.step(problem.closure(layer, opt))
        moved.append(float((layer.matrix().detach() - W0).norm()))
    assert moved[1] / moved[0] == pytest.approx((n + m - r) ** 0.5, rel=0.05)


def test_second_moment_is_checked_before_anything_changes():
    torch.manual_seed(0)
    layer = LowRankLinear(9, 12, rank=3, bias=False, dtype=DT)
    with pytest.raises(ValueError, match="second_moment must be one of"):
        dlrt.DLRTOptimizer(layer, optimizer="geo-adam", second_moment="entries")
    with pytest.raises(ValueError, match="second_moment= does not apply to optimizer='adam'"):
        dlrt.DLRTOptimizer(layer, optimizer="adam", second_moment="coordinates")


def test_momentum_carries_new_directions_across_augmentation():
    # After a step the K-part of the momentum has columns along the new V-directions (zero padding
    # would lose them): the dense reference above covers the values, this the mechanism.
    problem, layer, opt = make("bug", "geo-heavyball", lr=LR, momentum=BETA, tau=0.0, coefficient_steps=2)
    closure = problem.closure(layer, opt)
    opt.step(closure)  # augmentation; the cycle holds the augmented basis
    r_v = 3
    K = factor_state(opt, layer, "K")["tangent"]
    assert K.shape[1] > r_v and float(K[:, r_v:].norm()) > 1e-3


@pytest.mark.parametrize("optimizer", ["geo-heavyball", "geo-adam"])
def test_failed_step_leaves_the_momentum_and_the_gradient_as_they_were(optimizer):
    (problem, layer, opt), (_, twin_layer, twin_opt) = make("bug", optimizer, lr=0.05), make("bug", optimizer, lr=0.05)
    closure = problem.closure(layer, opt)
    for _ in range(3):
        opt.step(closure)
        twin_opt.step(problem.closure(twin_layer, twin_opt))
    before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    problem.loss(layer(problem.X)).backward()
    gS = layer.S.grad.clone()
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = float("inf")  # the update is non-finite: a NonFiniteError, nothing changes
    with pytest.raises(dlrt.NonFiniteError):
        opt.step()
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for idx, st in before["state"].items():
        for k, v in st.items():
            now = after["state"][idx][k]
            assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v
    assert torch.equal(layer.S.grad, gS)  # the direction is built beside the gradient, never into it
    opt.param_groups[0]["lr"] = lr
    opt.step()  # the retry, on the same backward, takes the step an untroubled optimizer takes
    twin_opt.step(problem.closure(twin_layer, twin_opt))
    torch.testing.assert_close(layer.matrix().detach(), twin_layer.matrix().detach(), atol=0, rtol=0)


@pytest.mark.parametrize("optimizer", ["geo-heavyball", "geo-adam"])
def test_checkpointed_momentum_resumes_the_same_trajectory(optimizer, tmp_path):
    net = nn.Sequential(LowRankLinear(9, 8, rank=3, dtype=DT), nn.Tanh(), LowRankLinear(8, 5, rank=2, dtype=DT))
    x, y = torch.randn(32, 9, dtype=DT), torch.randn(32, 5, dtype=DT)

    def run(model, opt, steps):
        for _ in range(steps):

            def closure():
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)

    opt = dlrt.DLRTOptimizer(net, integrator="bug", optimizer=optimizer, lr=0.05, tau=0.1)
    run(net, opt, 4)
    dlrt.save(tmp_path / "ck.safetensors", net, opt)
    resumed = copy.deepcopy(net)
    ropt = dlrt.DLRTOptimizer(resumed, integrator="bug", optimizer=optimizer, lr=0.05, tau=0.1)
    dlrt.load(tmp_path / "ck.safetensors", resumed, ropt)
    run(net, opt, 5)
    run(resumed, ropt, 5)
    for a, b in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_closure_free_step_equals_the_closure_step():
    runs = []
    for free in (False, True):
        problem, layer, opt = make("bug", "geo-adam", lr=0.05)
        for _ in range(6):
            if free:
                opt.zero_grad()
                problem.loss(layer(problem.X)).backward()
                opt.step()
            else:
                opt.step(problem.closure(layer, opt))
        runs.append(layer.matrix().detach())
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


def test_dense_parameters_step_with_the_flat_space_method():
    # A bias under geo-heavyball moves exactly as under torch.optim.SGD(momentum=β).
    torch.manual_seed(0)
    net = nn.Sequential(LowRankLinear(6, 5, rank=2, dtype=DT), nn.Linear(5, 3, dtype=DT))
    ref = copy.deepcopy(net[1])
    x, y = torch.randn(16, 6, dtype=DT), torch.randn(16, 3, dtype=DT)
    opt = dlrt.DLRTOptimizer(net, integrator="bug", optimizer="geo-heavyball", lr=0.05, momentum=0.7)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.7)
    for _ in range(3):
        h = net[0](x).detach()
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        sgd.zero_grad()
        ((ref(h) - y) ** 2).mean().backward()
        sgd.step()
    for a, b in zip(net[1].parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "geo-mom"}, r"unknown optimizer 'geo-mom'; choose one of .*'geo-adam', 'geo-heavyball'"),
        ({"optimizer": "geo-heavyball", "momentum": 1.0}, r"momentum must be finite and in \[0, 1\)"),
        ({"optimizer": "geo-heavyball", "momentum": float("nan")}, r"momentum must be finite and in \[0, 1\)"),
        ({"optimizer": "geo-adam", "betas": (0.9, 1.0)}, r"betas\[1\] must be finite and in \[0, 1\)"),
        ({"optimizer": "geo-adam", "betas": (-0.1, 0.9)}, r"betas\[0\] must be finite and in \[0, 1\)"),
        ({"optimizer": "geo-heavyball", "betas": (0.9, 0.99)}, r"betas= does not apply to optimizer='geo-heavyball'"),
    ],
)
def test_bad_hyper_parameters_name_the_valid_choices(kwargs, match):
    layer = LowRankLinear(6, 5, rank=2)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=match):
        dlrt.DLRTOptimizer(layer, **kwargs)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k])
