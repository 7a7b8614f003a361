"""The torch.optim contract, state transport, dense parameters and failure handling of DLRTOptimizer."""

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankLinear, NonFiniteError
from dlrt.integrators.base import change_basis
from dlrt.optim import RULES

from .helpers import DT, LeastSquares


def net(dtype=DT):
    return nn.Sequential(LowRankLinear(10, 8, 3, dtype=dtype), nn.Tanh(), nn.Linear(8, 4, dtype=dtype))


def data(dtype=DT):
    return torch.randn(32, 10, dtype=dtype), torch.randn(32, 4, dtype=dtype)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def test_param_groups_hold_factors_and_dense_parameters():
    model = net()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.1, momentum=0.9)
    low, dense = opt.param_groups
    assert low["kind"] == "lowrank" and dense["kind"] == "dense"
    layer = model[0]
    assert [id(p) for p in low["params"]] == [id(layer.U), id(layer.S), id(layer.V)]
    assert {id(p) for p in dense["params"]} == {id(layer.bias), id(model[2].weight), id(model[2].bias)}
    assert low["lr"] == dense["lr"] == 0.1 and low["momentum"] == 0.9 and low["tau"] == 0.1


def test_dense_parameters_take_the_same_inner_step():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=0.1)
    head_before = model[2].weight.detach().clone()
    closure_for(model, opt, x, y)()
    expected = head_before - 0.1 * model[2].weight.grad
    opt.step(closure_for(model, opt, x, y))
    torch.testing.assert_close(model[2].weight.detach(), expected)


def test_lr_scheduler_drives_the_integrator():
    problem = LeastSquares(8, 6)
    layer = LowRankLinear(6, 8, 2, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="fixed", optimizer="sgd", lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    opt.step(problem.closure(layer, opt))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    W = layer.matrix().detach().clone()
    opt.step(problem.closure(layer, opt))  # lr 0: the fixed-rank step leaves W in place
    torch.testing.assert_close(layer.matrix().detach(), W, atol=1e-12, rtol=0)


def test_closure_free_step_for_the_parallel_integrator_equals_step_with_closure():
    x, y = data()
    torch.manual_seed(1)
    a = net()
    torch.manual_seed(1)
    b = net()
    opt_a = dlrt.DLRTOptimizer(a, integrator="parallel", optimizer="adam", lr=0.01, tau=0.05)
    opt_b = dlrt.DLRTOptimizer(b, integrator="parallel", optimizer="adam", lr=0.01, tau=0.05)
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_b.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_two_pass_integrator_without_closure_is_a_clear_error():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="bug")
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    opt2 = dlrt.DLRTOptimizer(net(), integrator="parallel")
    with pytest.raises(RuntimeError, match="backward"):
        opt2.step()


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_weight_decay_shrinks_W_and_never_touches_the_bases(integrator):
    layer = LowRankLinear(10, 8, 3, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="adamw", lr=0.1, weight_decay=0.5, tau=0.0)
    U0, W0 = layer.U.detach().clone(), layer.matrix().detach().clone()
    x = torch.randn(4, 10, dtype=DT)

    def closure():  # zero loss gradient: only weight decay acts
        opt.zero_grad()
        loss = 0.0 * layer(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(layer.matrix().detach(), (1 - 0.1 * 0.5) * W0, atol=1e-12, rtol=0)
    assert layer.rank == 3
    torch.testing.assert_close(layer.U @ layer.U.T, U0 @ U0.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(3, dtype=DT), atol=1e-12, rtol=0)


def _states(opt, layer):
    return opt.state[layer.U], opt.state[layer.S], opt.state[layer.V]


@pytest.mark.parametrize("grow", [True, False])
def test_transport_keeps_the_full_matrix_momentum_projected_on_the_new_bases(grow):
    # ALGORITHMS §5: after a basis change the buffers represent the old full-matrix directions projected
    # onto the new bases; when the new bases contain the old ones nothing is lost.
    layer = LowRankLinear(9, 12, 3, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=0.1, momentum=0.9)
    U0, V0 = layer.U.detach().clone(), layer.V.detach().clone()
    mS = torch.randn(3, 3, dtype=DT)
    mK = torch.randn(12, 3, dtype=DT)  # K-buffer: n×r, columns in V-coordinates
    mL = torch.randn(9, 3, dtype=DT)  # L-buffer: m×r, columns in U-coordinates
    opt.state[layer.U] = {"momentum_buffer": mK}
    opt.state[layer.S] = {"momentum_buffer": mS}
    opt.state[layer.V] = {"momentum_buffer": mL}
    if grow:
        U1 = dlrt.linalg.augment_basis(U0, torch.randn(12, 3, dtype=DT))
        V1 = dlrt.linalg.augment_basis(V0, torch.randn(9, 2, dtype=DT))
    else:
        U1 = dlrt.linalg.orth(torch.randn(12, 4, dtype=DT))
        V1 = dlrt.linalg.orth(torch.randn(9, 4, dtype=DT))
    change_basis(opt, layer, U1, V1)
    nK, nS, nL = (s["momentum_buffer"] for s in _states(opt, layer))
    PU, PV = U1 @ U1.T, V1 @ V1.T
    M_S, M_K, M_L = U0 @ mS @ V0.T, mK @ V0.T, U0 @ mL.T
    torch.testing.assert_close(U1 @ nS @ V1.T, PU @ M_S @ PV, atol=1e-12, rtol=0)
    torch.testing.assert_close(nK @ V1.T, M_K @ PV, atol=1e-12, rtol=0)
    torch.testing.assert_close(U1 @ nL.T, PU @ M_L, atol=1e-12, rtol=0)
    if grow:
        torch.testing.assert_close(U1 @ nS @ V1.T, M_S, atol=1e-12, rtol=0)
        torch.testing.assert_close(nK @ V1.T, M_K, atol=1e-12, rtol=0)
        torch.testing.assert_close(U1 @ nL.T, M_L, atol=1e-12, rtol=0)
    # The S-buffer's full-matrix direction, projected on the new tangent space, is unchanged too.
    torch.testing.assert_close(
        dlrt.linalg.tangent_project(U1, V1, U1 @ nS @ V1.T),
        PU @ dlrt.linalg.tangent_project(U1, V1, M_S) @ PV,
        atol=1e-12,
        rtol=0,
    )


def test_adam_second_moments_are_transported_through_square_roots():
    layer = LowRankLinear(9, 12, 3, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="adam")
    U0, V0 = layer.U.detach().clone(), layer.V.detach().clone()
    m, v = torch.randn(3, 3, dtype=DT), torch.rand(3, 3, dtype=DT)
    opt.state[layer.S] = {"step": 7, "exp_avg": m, "exp_avg_sq": v}
    U1, V1 = dlrt.linalg.orth(torch.randn(12, 4, dtype=DT)), dlrt.linalg.orth(torch.randn(9, 5, dtype=DT))
    change_basis(opt, layer, U1, V1)
    st = opt.state[layer.S]
    A, B = U1.T @ U0, V0.T @ V1
    assert st["step"] == 7
    torch.testing.assert_close(st["exp_avg"], A @ m @ B)
    torch.testing.assert_close(st["exp_avg_sq"], (A @ v.sqrt() @ B) ** 2)
    assert (st["exp_avg_sq"] >= 0).all()


def test_momentum_survives_truncation_events():
    problem = LeastSquares(16, 12, rank=3)
    layer = LowRankLinear(12, 16, 6, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=0.1, momentum=0.9, tau=0.05)
    closure = problem.closure(layer, opt)
    for _ in range(5):
        opt.step(closure)
        K, S, L = _states(opt, layer)
        r = layer.rank
        assert S["momentum_buffer"].shape == (r, r)
        assert K["momentum_buffer"].shape == (16, r) and L["momentum_buffer"].shape == (12, r)
        assert float(S["momentum_buffer"].norm()) > 0


def test_state_dict_round_trip():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="adam", lr=0.01, coefficient_steps=2)
    opt.step(closure_for(model, opt, x, y))
    sd = opt.state_dict()
    assert sd["dlrt"]["phase"] == 1 and sd["dlrt"]["steps"] == 1
    opt2 = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="adam", lr=0.5, coefficient_steps=2)
    opt2.load_state_dict(sd)
    assert opt2.phase == 1 and opt2.param_groups[0]["lr"] == 0.01
    for p in opt.state:
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p][k]) if torch.is_tensor(v) else v == opt2.state[p][k]
    with pytest.raises(ValueError, match="integrator"):
        dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="adam").load_state_dict(sd)


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    return params, state, opt.phase


def _assert_unchanged(model, opt, snap):
    params, state, phase = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    assert opt.phase == phase
    assert {id(p) for p in opt.state} >= set(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]


@pytest.mark.parametrize("integrator, bad_call", [("bug", 1), ("bug", 2), ("parallel", 1), ("fixed", 2)])
def test_non_finite_loss_raises_naming_the_step_and_changes_nothing(integrator, bad_call):
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=0.1, momentum=0.9)
    good = closure_for(model, opt, x, y)
    for _ in range(2):
        opt.step(good)
    snap = _snapshot(model, opt)
    calls = []

    def bad():
        calls.append(1)
        loss = good()
        return loss * float("nan") if len(calls) == bad_call else loss

    with pytest.raises(NonFiniteError, match="step 2"):
        opt.step(bad)
    _assert_unchanged(model, opt, snap)
    opt.step(good)  # and training goes on
    assert opt.steps == 3


def test_non_finite_gradient_names_the_layer():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=0.1)
    snap = _snapshot(model, opt)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        model[0].S.grad[0, 0] = float("inf")
        return loss.detach()

    with pytest.raises(NonFiniteError, match="layer '0'"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)


def test_on_nonfinite_skip_warns_and_skips():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", on_nonfinite="skip")
    snap = _snapshot(model, opt)

    def bad():
        return closure_for(model, opt, x, y)() * float("inf")

    with pytest.warns(UserWarning, match="skipped"):
        assert opt.step(bad) is None
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(integrator="euler"), "unknown integrator"),
        (dict(optimizer="lion"), "unknown optimizer"),
        (dict(tau=-0.1), "tau"),
        (dict(lr=-1.0), "lr"),
        (dict(optimizer="adam", momentum=0.9), "momentum"),
        (dict(optimizer="sgd", betas=(0.9, 0.99)), "betas"),
        (dict(truncation="everywhere"), "truncation"),
        (dict(budget=4), "budget"),
        (dict(truncation="global", budget=0), "budget"),
        (dict(min_rank=9), "min_rank"),
        (dict(coefficient_steps=0), "coefficient_steps"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(tau_mode="sometimes"), "tau_mode"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dlrt.DLRTOptimizer(net(), **kwargs)


def test_model_without_low_rank_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="convert"):
        dlrt.DLRTOptimizer(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        dlrt.DLRTOptimizer([torch.zeros(3)])


def test_global_budget_is_respected_after_every_truncation():
    model = nn.Sequential(LowRankLinear(12, 10, 4, dtype=DT), nn.Tanh(), LowRankLinear(10, 6, 4, dtype=DT))
    x, y = torch.randn(32, 12, dtype=DT), torch.randn(32, 6, dtype=DT)
    opt = dlrt.DLRTOptimizer(
        model, integrator="parallel", optimizer="sgd", lr=0.2, tau=0.0, truncation="global", budget=7
    )
    for _ in range(6):
        opt.step(closure_for(model, opt, x, y))
        assert sum(dlrt.ranks(model).values()) == 7


def test_rank_bounds_from_the_optimizer_override_the_layers():
    problem = LeastSquares(16, 12)
    layer = LowRankLinear(12, 16, 4, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", lr=0.2, tau=0.0, max_rank=6, min_rank=2)
    for _ in range(3):
        opt.step(problem.closure(layer, opt))
        assert 2 <= layer.rank <= 6
    assert layer.rank == 6


def test_inner_rules_match_torch_optimizers_on_dense_parameters():
    for name, cls, kw in [
        ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
        ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
        ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ]:
        rule = RULES[name]()
        group = {**rule.defaults, **kw}
        x_ref = torch.randn(5, 3, dtype=DT, requires_grad=True)
        x = x_ref.detach().clone()
        ref = cls([x_ref], **kw)
        state = {}
        for _ in range(4):
            g = torch.randn(5, 3, dtype=DT)
            x_ref.grad = g.clone()
            ref.step()
            rule.update_(x, g, state, group)
        torch.testing.assert_close(x, x_ref.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("integrator", ["bug", "parallel", "fixed"])
def test_a_layer_the_loss_does_not_reach_keeps_its_weights(integrator):
    used, unused = LowRankLinear(6, 5, 2, dtype=DT), LowRankLinear(6, 5, 2, dtype=DT)
    model = nn.ModuleDict({"used": used, "unused": unused})
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=0.1, tau=0.0)
    W = unused.matrix().detach().clone()
    x = torch.randn(8, 6, dtype=DT)

    def closure():
        opt.zero_grad()
        loss = used(x).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    torch.testing.assert_close(unused.matrix().detach(), W, atol=1e-12, rtol=0)


def test_adam_bias_correction_is_per_entry_across_basis_changes():
    """An entry in a new direction takes Adam's first step (±lr), however many steps the old ones had."""
    from dlrt.optim.inner import Adam, transport_state

    rule, group = Adam(), {"lr": 0.1, "betas": (0.9, 0.999), "eps": 0.0, "weight_decay": 0.0}
    x, state = torch.zeros(2, 2, dtype=DT), {}
    for _ in range(50):
        rule.step(x, torch.ones(2, 2, dtype=DT), state, group)
    embed = torch.eye(3, 2, dtype=DT)  # augmentation: the old 2×2 block sits in a 3×3 core
    state = transport_state(state, rule, embed, embed.T)
    torch.testing.assert_close(state["weight2"][:2, :2], torch.full((2, 2), 1 - 0.999**50, dtype=DT))
    assert not state["weight2"][2].any() and not state["weight2"][:, 2].any()
    g = torch.full((3, 3), -2.0, dtype=DT)
    delta = rule.step(torch.zeros(3, 3, dtype=DT), g, state, group)
    torch.testing.assert_close(delta[2], torch.full((3,), 0.1, dtype=DT))  # sign(−g)·lr, not 3.2·lr
    torch.testing.assert_close(delta[:, 2], torch.full((3,), 0.1, dtype=DT))
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=DT)  # a rotation keeps uniform weights
    moved = transport_state({"weight1": torch.full((2, 2), 0.5, dtype=DT)}, rule, rotation, rotation.T)
    torch.testing.assert_close(moved["weight1"], torch.full((2, 2), 0.5, dtype=DT))


def _twins():
    torch.manual_seed(3)
    template = net()
    models = [net(), net()]
    for m in models:
        m.load_state_dict(template.state_dict())
    return models


def test_max_grad_norm_clips_by_the_tangent_norm():
    """Clipping = the same step on a loss scaled by max_norm / ‖grad‖, with ‖·‖ the tangent-space norm."""
    x, y = data()
    models = _twins()
    clipped = dlrt.DLRTOptimizer(models[0], integrator="parallel", optimizer="sgd", lr=0.5, max_grad_norm=0.05)
    plain = dlrt.DLRTOptimizer(models[1], integrator="parallel", optimizer="sgd", lr=0.5)

    # The norm by hand: ‖P(G)‖² = ‖GV‖² + ‖GᵀU‖² − ‖UᵀGV‖² for the low-rank layer (G formed
    # densely, float64), plus the dense gradients.
    layer = models[0][0]
    W = layer.matrix().detach().clone().requires_grad_(True)
    h = torch.tanh(x @ W.T + layer.bias)
    loss = ((models[0][2](h) - y) ** 2).mean()
    G, *dense = torch.autograd.grad(loss, [W, layer.bias, *models[0][2].parameters()])
    U, V = layer.U.detach(), layer.V.detach()
    P = U @ U.T @ G + G @ V @ V.T - U @ U.T @ G @ V @ V.T
    expected = (P.square().sum() + sum(g.square().sum() for g in dense)).sqrt()

    clipped.step(closure_for(models[0], clipped, x, y))
    torch.testing.assert_close(torch.tensor(clipped.last_grad_norm, dtype=DT), expected)
    scale = 0.05 / clipped.last_grad_norm
    assert scale < 1

    def scaled():
        plain.zero_grad()
        loss = ((models[1](x) - y) ** 2).mean() * scale
        loss.backward()
        return loss

    plain.step(scaled)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_max_grad_norm_above_the_norm_changes_nothing(integrator):
    x, y = data()
    models = _twins()
    loose = dlrt.DLRTOptimizer(models[0], integrator=integrator, optimizer="sgd", lr=0.5, max_grad_norm=1e6)
    free = dlrt.DLRTOptimizer(models[1], integrator=integrator, optimizer="sgd", lr=0.5)
    for _ in range(2):
        loose.step(closure_for(models[0], loose, x, y))
        free.step(closure_for(models[1], free, x, y))
    assert 0 < loose.last_grad_norm < 1e6 and free.last_grad_norm is None
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
