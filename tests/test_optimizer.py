"""The torch.optim contract, state transport, dense parameters and failure handling of DLRTOptimizer."""

import copy

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankLinear, NonFiniteError
from dlrt.integrators.base import change_basis
from dlrt.optim import RULES

from .helpers import DT, LeastSquares, mse_closure


def net(dtype=DT):
    return nn.Sequential(LowRankLinear(10, 8, 3, dtype=dtype), nn.Tanh(), nn.Linear(8, 4, dtype=dtype))


def data(dtype=DT):
    return torch.randn(32, 10, dtype=dtype), torch.randn(32, 4, dtype=dtype)


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
    mse_closure(model, opt, x, y)()
    expected = head_before - 0.1 * model[2].weight.grad
    opt.step(mse_closure(model, opt, x, y))
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
        opt_a.step(mse_closure(a, opt_a, x, y))
        opt_b.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_two_pass_integrator_without_closure_is_a_clear_error():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="fixed")
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="two passes.*closure"):
        opt.step()
    for integrator in ("parallel", "bug"):
        opt2 = dlrt.DLRTOptimizer(net(), integrator=integrator)
        with pytest.raises(RuntimeError, match="backward"):
            opt2.step()


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_one_pass_integrators_step_after_a_plain_backward_as_with_a_closure(integrator):
    a, b = net(), net()
    b.load_state_dict(a.state_dict())
    x, y = data()
    kw = dict(integrator=integrator, optimizer="adam", lr=0.05, tau=0.1, coefficient_steps=2)
    opt_a, opt_b = dlrt.DLRTOptimizer(a, **kw), dlrt.DLRTOptimizer(b, **kw)
    for _ in range(4):
        opt_a.step(mse_closure(a, opt_a, x, y))
        opt_b.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        opt_b.step()
    assert dlrt.ranks(a) == dlrt.ranks(b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=name)


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
    # docs/algorithms.md §5: after a basis change the buffers represent the old full-matrix directions projected
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


def test_adam_state_follows_a_relabelling_of_the_basis_and_the_step_in_W_is_unchanged():
    # Permuting and sign-flipping basis vectors only relabels coordinates: the transported Adam state must
    # be the relabelled state (second moments and weights without the signs), and the next step, seen as
    # a full matrix U ΔS Vᵀ, must be the same step in either labelling.
    layer = LowRankLinear(9, 12, 3, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="adam", lr=0.1)
    rule, group = opt.rule, opt.lowrank_group
    U0, V0, S0 = layer.U.detach().clone(), layer.V.detach().clone(), layer.S.detach().clone()
    state = {}
    for _ in range(4):  # a genuine Adam state after a few steps
        rule.step(S0, torch.randn(3, 3, dtype=DT), state, group)
    opt.state[layer.S] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    pu, pv = [2, 0, 1], [1, 2, 0]
    su, sv = torch.tensor([1.0, -1.0, -1.0], dtype=DT), torch.tensor([-1.0, 1.0, -1.0], dtype=DT)
    change_basis(opt, layer, U0[:, pu] * su, V0[:, pv] * sv)
    moved = opt.state[layer.S]
    signs = su[:, None] * sv[None, :]
    assert moved["step"] == 4
    torch.testing.assert_close(moved["exp_avg"], state["exp_avg"][pu][:, pv] * signs, atol=1e-14, rtol=0)
    for key in ("exp_avg_sq", "weight1", "weight2"):
        torch.testing.assert_close(moved[key], state[key][pu][:, pv], atol=1e-14, rtol=0)
    G = torch.randn(12, 9, dtype=DT)  # one full-matrix gradient, seen in both labellings
    d_old = rule.step(S0, U0.T @ G @ V0, {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}, group)
    U1, V1 = layer.U.detach(), layer.V.detach()
    d_new = rule.step(layer.S.detach(), U1.T @ G @ V1, moved, group)
    torch.testing.assert_close(U1 @ d_new @ V1.T, U0 @ d_old @ V0.T, atol=1e-12, rtol=0)


def test_momentum_survives_truncation_events():
    # At full rank on a square layer the bases span everything, so rank-adaptive BUG with tau=0 must follow
    # dense heavy-ball SGD exactly, although every step rotates the bases twice (augmentation, truncation)
    # and the momentum is transported each time.
    problem = LeastSquares(8, 8)
    layer = LowRankLinear(8, 8, 8, bias=False, dtype=DT)
    W = layer.matrix().detach().clone().requires_grad_(True)
    dense = torch.optim.SGD([W], lr=0.1, momentum=0.9)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=0.1, momentum=0.9, tau=0.0)
    closure = problem.closure(layer, opt)
    for _ in range(6):
        opt.step(closure)
        W.grad = problem.G(W.detach())
        dense.step()
        assert layer.rank == 8
        torch.testing.assert_close(layer.matrix().detach(), W.detach(), atol=1e-10, rtol=0)
    assert float((W.detach() - problem.W_target).norm()) < 0.5 * float(problem.W_target.norm())


def test_state_dict_round_trip():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="adam", lr=0.01, coefficient_steps=2)
    opt.step(mse_closure(model, opt, x, y))
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


@pytest.mark.parametrize("integrator, bad_call", [("bug", 1), ("parallel", 1), ("fixed", 1), ("fixed", 2)])
def test_non_finite_loss_raises_naming_the_step_and_changes_nothing(integrator, bad_call):
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=0.1, momentum=0.9)
    good = mse_closure(model, opt, x, y)
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


def test_an_overflow_only_in_G_V_is_caught_and_named():
    # The fused check reads S.grad, which carries G V's overflow (see test_layers); the message names G V.
    layer = LowRankLinear(6, 5, 2, bias=False)
    U = torch.zeros(5, 2)
    U[1, 0] = U[2, 1] = 1.0
    layer.set_factors(U, torch.eye(2), dlrt.linalg.orth(torch.randn(6, 2)))
    opt = dlrt.DLRTOptimizer(layer, integrator="parallel")
    x, dy = torch.randn(16, 6), torch.zeros(16, 5)
    dy[:, 0] = 3e38

    def closure():
        opt.zero_grad()
        out = layer(x)
        out.backward(dy)
        return out.detach().sum()

    snap = _snapshot(layer, opt)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in layer '' \(G V\)"):
        opt.step(closure)
    _assert_unchanged(layer, opt, snap)


def test_on_nonfinite_skip_warns_and_skips():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", on_nonfinite="skip")
    snap = _snapshot(model, opt)

    def bad():
        return mse_closure(model, opt, x, y)() * float("inf")

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
        opt.step(mse_closure(model, opt, x, y))
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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_deferring_the_kl_state_transport_to_the_truncation_changes_nothing(optimizer, monkeypatch):
    # bug moves the K/L states once, at the truncation that ends its one-step cycle, instead of padding them
    # at the augmentation and multiplying the zeros at the truncation: the same states and factors.
    import dlrt.integrators.base as base
    import dlrt.integrators.bug as bug

    runs = []
    for defer in (True, False):
        torch.manual_seed(0)
        model = net()
        x, y = data()
        kw = {"momentum": 0.9} if optimizer == "sgd" else {}
        opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer=optimizer, lr=0.05, tau=0.1, **kw)
        if not defer:
            monkeypatch.setattr(bug, "augment", lambda *a, **k: base.augment(*a, **{**k, "defer_kl_state": False}))
        for _ in range(5):
            opt.step(mse_closure(model, opt, x, y))
        assert not opt.deferred_kl_state
        runs.append((model, opt))
        monkeypatch.undo()
    (a, opt_a), (b, opt_b) = runs
    assert dlrt.ranks(a) == dlrt.ranks(b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    layer_a, layer_b = a[0], b[0]
    for key_a, key_b in ((layer_a.U, layer_b.U), (layer_a.V, layer_b.V), (layer_a.S, layer_b.S)):
        sa, sb = opt_a.state[key_a], opt_b.state[key_b]
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            if torch.is_tensor(sa[k]):
                torch.testing.assert_close(sa[k], sb[k], atol=1e-12, rtol=0, msg=k)


@pytest.mark.parametrize("name, kw", [("sgd", {"momentum": 0.9}), ("adam", {"weight_decay": 0.1}), ("adamw", {})])
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_fused_steps_of_several_tensors_equal_their_single_steps_bit_for_bit(name, kw, dtype):
    rule = RULES[name]()
    group = {**rule.defaults, **kw}
    shapes = [(5, 3), (4,), (6, 6)]
    xs = [torch.randn(s, dtype=dtype) for s in shapes]
    single = [{} for _ in shapes]
    fused = [{} for _ in shapes]
    fused[1] = {"step": 0}  # a state the rule has not filled yet, beside fresh ones
    single[1] = {"step": 0}
    for _ in range(3):
        gs = [torch.randn(s, dtype=dtype) for s in shapes]
        kept = [dict(st) for st in fused]
        olds = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for st in fused]
        deltas = rule.step_many(xs, gs, fused, group)
        for x, g, st, d in zip(xs, gs, single, deltas):
            assert torch.equal(rule.step(x, g, st, group), d)
        for st, ref in zip(fused, single):
            assert st.keys() == ref.keys()
            for k, v in st.items():
                assert torch.equal(v, ref[k]) if torch.is_tensor(v) else v == ref[k]
        for st, old in zip(kept, olds):  # never in place: a shallow copy keeps the old state
            for k, v in old.items():
                assert torch.equal(st[k], v)
        xs = [x + d for x, d in zip(xs, deltas)]


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


@pytest.mark.parametrize("integrator", ["parallel", "bug"])
def test_max_grad_norm_clips_by_the_tangent_norm(integrator):
    """Clipping = the same step on a loss scaled by max_norm / ‖grad‖, with ‖·‖ the tangent-space norm.

    For bug this includes the S-step block contracted from the kept pass inputs.
    """
    x, y = data()
    models = _twins()
    clipped = dlrt.DLRTOptimizer(models[0], integrator=integrator, optimizer="sgd", lr=0.5, max_grad_norm=0.05)
    plain = dlrt.DLRTOptimizer(models[1], integrator=integrator, optimizer="sgd", lr=0.5)

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

    clipped.step(mse_closure(models[0], clipped, x, y))
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
        loose.step(mse_closure(models[0], loose, x, y))
        free.step(mse_closure(models[1], free, x, y))
    assert 0 < loose.last_grad_norm < 1e6 and free.last_grad_norm is None
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ regressions (issue 10)
@pytest.fixture(params=[torch.float64, torch.float16, torch.bfloat16])
def default_dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_step_works_under_any_default_dtype(default_dtype, integrator):
    # The fused non-finite check once built its flag in the default dtype: "inv_scale must be a float tensor".
    model = net(torch.float32)
    x, y = data(torch.float32)
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=0.1)
    W0 = model[0].matrix().detach().clone()
    opt.step(mse_closure(model, opt, x, y))
    assert opt.steps == 1 and not torch.equal(model[0].matrix().detach(), W0)
    # ... and a non-finite gradient is still caught.
    with pytest.raises(NonFiniteError):
        opt.step(lambda: mse_closure(model, opt, x, y)() * float("nan"))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_adam_on_half_precision_factors_matches_float32(half, integrator, tmp_path):
    """Adam keeps float32 moments for half-precision values: in float16, g² and eps underflow and a zero
    gradient entry stepped by 0/0 (NaN on the first step). The steps follow the float32 run to half precision."""
    torch.manual_seed(0)
    ref = net(torch.float32)
    x, y = data(torch.float32)
    with torch.no_grad():
        ref[0].S[0, 0] = 0.0  # exact zeros in the first gradients too
    model = copy.deepcopy(ref).to(half)
    opts = [
        dlrt.DLRTOptimizer(m, integrator=integrator, optimizer="adam", lr=1e-2, tau_mode="relative")
        for m in (ref, model)
    ]
    for _ in range(3):
        for m, opt, inp, out in ((ref, opts[0], x, y), (model, opts[1], x.to(half), y.to(half))):
            opt.step(mse_closure(m, opt, inp, out))
    W_ref, W = ref[0].matrix().detach(), model[0].matrix().detach().float()
    assert model[0].U.dtype == half and torch.isfinite(W).all()
    assert (W - W_ref).norm() <= 0.05 * W_ref.norm()
    state = opts[1].state[model[0].S]
    assert state["exp_avg_sq"].dtype == torch.float32
    # The float32 moments survive a checkpoint of the half-precision model.
    dlrt.save(tmp_path / "half.safetensors", model, opts[1])
    twin = copy.deepcopy(model)
    twin_opt = dlrt.DLRTOptimizer(twin, integrator=integrator, optimizer="adam", lr=1e-2, tau_mode="relative")
    dlrt.load(tmp_path / "half.safetensors", twin, twin_opt)
    assert torch.equal(twin_opt.state[twin[0].S]["exp_avg_sq"], state["exp_avg_sq"])


def bn_net():
    return nn.Sequential(
        LowRankLinear(10, 8, 3, dtype=DT), nn.BatchNorm1d(8, dtype=DT), nn.Tanh(), nn.Linear(8, 4, dtype=DT)
    )


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("with_closure", [True, False])
def test_a_failed_step_restores_batchnorm_statistics(on_nonfinite, with_closure):
    model = bn_net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=0.1, on_nonfinite=on_nonfinite)
    opt.step(mse_closure(model, opt, x, y))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    bad = mse_closure(model, opt, bad_x, y)
    expectation = pytest.raises(NonFiniteError) if on_nonfinite == "raise" else pytest.warns(UserWarning)
    with expectation:
        if with_closure:
            opt.step(bad)
        else:
            bad()  # the forward (which updates the statistics) runs before step()
            opt.step()
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_buffer_rollback_is_small_and_survives_deepcopy_and_pickle():
    import copy
    import pickle

    model = bn_net()
    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=0.1)
    x, y = data()
    opt.step(mse_closure(model, opt, x, y))
    assert opt._buffer_guard.nbytes() == 0  # a finished step drops its copies
    model(x)  # a forward before a closure-free step() saves the statistics it is about to change
    # Only the BatchNorm buffers are copied (2×8 floats and one counter), not the parameters.
    assert opt._buffer_guard.nbytes() == (8 + 8) * 8 + 8
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    pickle.loads(pickle.dumps(model))(x)


@pytest.mark.parametrize("integrator", ["parallel", "bug", "fixed"])
def test_a_step_that_makes_parameters_non_finite_is_rolled_back(integrator):
    # float32, finite gradients (~1e9), lr 1e30: the update overflows. Caught in this step, not the next.
    model = net(torch.float32)
    x, y = data(torch.float32)
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=1e30)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * 1e10
        loss.backward()
        return loss

    snap = _snapshot(model, opt)
    with pytest.raises(NonFiniteError, match=r"step 0 .*non-finite"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)
    assert opt.steps == 0


@pytest.mark.parametrize("integrator", ["parallel", "bug", "fixed"])
@pytest.mark.parametrize("optimizer, kw", [("sgd", {"momentum": 0.9}), ("adam", {})])
def test_a_failed_step_leaves_existing_optimizer_state_as_it_was(integrator, optimizer, kw):
    # The rollback keeps the old state dicts by reference: a rule that wrote a state tensor
    # in place (instead of replacing it) would corrupt them.
    model = net(torch.float32)
    x, y = data(torch.float32)
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer=optimizer, lr=0.01, **kw)
    closure = mse_closure(model, opt, x, y)
    for _ in range(2):
        opt.step(closure)
    snap = _snapshot(model, opt)
    for group in opt.param_groups:
        group["lr"] = 1e39  # overflows float32 in the update
    with pytest.raises(NonFiniteError, match=r"step 2 .*non-finite"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)


def test_a_factor_made_non_finite_is_named():
    model = net(torch.float32)
    x, y = data(torch.float32)
    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=1e30)

    def closure():
        loss = mse_closure(model, opt, x, y)()
        model[0].S.grad.mul_(1e10)  # only the core's step overflows
        return loss

    with pytest.raises(NonFiniteError, match=r"step 0 .*factors of layer '0' non-finite.*lower lr"):
        opt.step(closure)


def test_a_dense_parameter_made_non_finite_is_named_and_rolled_back():
    model = net()
    x, y = data()
    opt = dlrt.DLRTOptimizer(model, integrator="fixed", optimizer="sgd", lr=10.0, on_nonfinite="skip")
    snap = _snapshot(model, opt)

    def closure():
        loss = mse_closure(model, opt, x, y)()
        model[2].weight.grad[0, 0] = 1e308  # finite, but the step overflows the parameter
        return loss

    with pytest.warns(UserWarning, match=r"parameter '2\.weight'.*skipped"):
        assert opt.step(closure) is None
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tau=float("nan")), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(optimizer="sgd", momentum=float("nan")), "momentum"),
        (dict(optimizer="sgd", momentum=0.9, dampening=float("nan")), "dampening"),
        (dict(optimizer="sgd", dampening=1.5), "dampening"),
        (dict(optimizer="adam", betas=(float("nan"), 0.9)), "betas"),
        (dict(optimizer="adam", betas=(0.9,)), "betas"),
        (dict(optimizer="adam", eps=float("nan")), "eps"),
        (dict(optimizer="adam", eps=float("inf")), "eps"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm"),
        (dict(dense_lr=float("nan")), "dense_lr"),
        (dict(dense_lr=-1.0), "dense_lr"),
        (dict(truncation="global", budget=float("nan")), "budget"),
        (dict(truncation="global", budget=2.5), "budget"),
        (dict(lr="0.1"), "lr"),
        (dict(max_rank=2.5), "max_rank"),
    ],
)
def test_non_finite_or_mistyped_hyper_parameters_are_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dlrt.DLRTOptimizer(net(), **kwargs)


@pytest.mark.parametrize("integrator", ["fixed", "bug", "parallel"])
def test_a_starting_rank_above_max_rank_is_a_clear_error(integrator):
    layer = LowRankLinear(10, 8, 6, max_rank=6, dtype=DT)
    layer.max_rank = 3  # as a checkpoint or a hand-edited layer can leave it
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"layer '0'.*rank 6.*max_rank=3"):
        dlrt.DLRTOptimizer(model, integrator=integrator)
    assert layer.rank == 6 and layer.max_rank == 3  # validated, not mutated
    with pytest.raises(ValueError, match=r"layer '0'.*rank 6.*max_rank=4"):
        dlrt.DLRTOptimizer(nn.Sequential(LowRankLinear(10, 8, 6, dtype=DT)), integrator=integrator, max_rank=4)


# --------------------------------------------- truncation rules through the optimizer, against dense SVDs
def _square_full_rank(n, seed):
    torch.manual_seed(seed)
    return LowRankLinear(n, n, n, bias=False, dtype=DT), LeastSquares(n, n, rank=2)


def _dense_sgd_step(layer, problem, lr):
    """W̃ = W − lr·G(W): at full rank on a square layer, BUG's augmented point before truncation."""
    W = layer.matrix().detach()
    return W - lr * problem.G(W)


def _best_rank(W, r):
    P, s, Qh = torch.linalg.svd(W)
    return P[:, :r] @ torch.diag(s[:r]) @ Qh[:r]


def test_absolute_tau_through_the_optimizer():
    layer, problem = _square_full_rank(8, 0)
    sigma = torch.linalg.svdvals(_dense_sgd_step(layer, problem, 0.3))
    tails = [float(sigma[k:].norm()) for k in range(9)]
    tau = 0.5 * (tails[3] + tails[2])  # ‖σ[3:]‖ <= τ < ‖σ[2:]‖: the absolute rule keeps 3
    assert tails[3] <= tau < tails[2]
    assert next(k for k in range(9) if tails[k] <= tau * tails[0]) != 3  # as a relative τ it would keep another rank
    W_tilde = _dense_sgd_step(layer, problem, 0.3)
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=0.3, tau=tau, tau_mode="absolute")
    opt.step(problem.closure(layer, opt))
    assert layer.rank == 3
    torch.testing.assert_close(layer.matrix().detach(), _best_rank(W_tilde, 3), atol=1e-10, rtol=0)


def _pooled_ranks(sigmas, keep_extra):
    """Each layer keeps its largest σ (min_rank 1); of the rest, pooled, the largest ``keep_extra``."""
    pool = sorted(((float(s), i) for i, sig in enumerate(sigmas) for s in sig[1:]), reverse=True)
    ranks = [1] * len(sigmas)
    for _, i in pool[:keep_extra]:
        ranks[i] += 1
    return ranks


def step_both(opt, a, pa, b, pb):
    """One optimizer step on the sum of two layers' least-squares losses."""

    def closure():
        opt.zero_grad()
        loss = pa.loss(a(pa.X)) + pb.loss(b(pb.X))
        loss.backward()
        return loss

    opt.step(closure)


@pytest.mark.parametrize("budget", [None, 7])
def test_global_truncation_through_the_optimizer(budget):
    (a, pa), (b, pb) = _square_full_rank(8, 1), _square_full_rank(6, 2)
    for layer in (a, b):  # different scales, so the pooled cut differs from two local ones
        layer.set_factors(layer.U.detach(), layer.S.detach() * (3.0 if layer is a else 0.5), layer.V.detach())
    lr = 0.2
    W_tilde = [_dense_sgd_step(a, pa, lr), _dense_sgd_step(b, pb, lr)]
    sigmas = [torch.linalg.svdvals(W) for W in W_tilde]
    if budget is None:
        tau = 0.2
        pool = torch.cat([s[1:] for s in sigmas]).sort(descending=True).values
        theta = tau * float(torch.cat(sigmas).norm())
        keep = next(k for k in range(pool.numel() + 1) if float(pool[k:].norm()) <= theta)
    else:
        tau, keep = 0.0, budget - 2
    expected = _pooled_ranks(sigmas, keep)
    local = [next(k for k in range(1, s.numel() + 1) if float(s[k:].norm()) <= tau * float(s.norm())) for s in sigmas]
    assert expected != local or budget is not None  # the pooled rule is not the local one here

    model = nn.ModuleDict({"a": a, "b": b})
    opt = dlrt.DLRTOptimizer(
        model,
        integrator="bug",
        optimizer="sgd",
        lr=lr,
        tau=tau,
        truncation="global",
        budget=budget,
        tau_mode="relative",
    )

    step_both(opt, a, pa, b, pb)
    assert [a.rank, b.rank] == expected
    if budget is not None:
        assert sum(expected) == budget
    for layer, W, r in zip((a, b), W_tilde, expected):
        torch.testing.assert_close(layer.matrix().detach(), _best_rank(W, r), atol=1e-10, rtol=0)


def test_dense_lr_steps_the_dense_parameters_at_their_own_rate():
    model = net()
    ref = copy.deepcopy(model)
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.01, dense_lr=0.3)
    x, y = data()
    dense = [(n, p) for n, p in model.named_parameters() if not n.endswith((".U", ".S", ".V"))]
    assert dense, "the test net needs a dense parameter"
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in dense}
    opt.step()
    before = dict(ref.named_parameters())
    for n, p in dense:
        torch.testing.assert_close(p.detach(), before[n].detach() - 0.3 * grads[n], rtol=0, atol=1e-12)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_small_factors_step_on_one_thread_and_the_passes_on_the_callers(integrator, monkeypatch):
    import dlrt.integrators.base as base
    import dlrt.linalg as linalg

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = data()
        model = net()
        opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="adam", lr=0.01, tau=0.05)
        seen = {"pass": [], "factors": []}
        change_basis = base.change_basis

        def watched_change_basis(*args, **kwargs):
            seen["factors"].append(torch.get_num_threads())
            return change_basis(*args, **kwargs)

        monkeypatch.setattr(base, "change_basis", watched_change_basis)
        closure = mse_closure(model, opt, x, y)

        def watched():
            seen["pass"].append(torch.get_num_threads())
            return closure()

        opt.step(watched)
        assert seen["pass"] and set(seen["pass"]) == {2}
        assert seen["factors"] and set(seen["factors"]) == {1}  # the truncation's change of bases
        assert torch.get_num_threads() == 2

        # Factors above the limit keep the caller's threads; a failing step restores them too.
        monkeypatch.setattr(linalg, "ONE_THREAD_FACTOR_ENTRIES", 0)
        seen["factors"].clear()
        opt.step(watched)
        assert seen["factors"] and set(seen["factors"]) == {2}
        monkeypatch.setattr(linalg, "ONE_THREAD_FACTOR_ENTRIES", 2**16)

        def failing():
            watched()
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            opt.step(failing)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_budget_in_parameters_through_the_optimizer():
    """budget_unit="params": the pooled σ, largest first, while the next rank's U, S, V parameters fit."""
    torch.manual_seed(1)
    a, pa = LowRankLinear(12, 12, 12, bias=False, dtype=DT), LeastSquares(12, 12, rank=2)
    b, pb = _square_full_rank(4, 2)
    lr, budget = 0.2, 150
    W_tilde = [_dense_sgd_step(a, pa, lr), _dense_sgd_step(b, pb, lr)]
    sigmas = [torch.linalg.svdvals(W) for W in W_tilde]
    # The k-th rank of an n×n layer adds a column of U and of V and grows the core from (k−1)² to k².
    ranks, left = [1, 1], budget - (12 + 12 + 1) - (4 + 4 + 1)
    for _, i in sorted(((float(s), i) for i, sig in enumerate(sigmas) for s in sig[1:]), reverse=True):
        n = (12, 4)[i]
        cost = 2 * n + 2 * (ranks[i] + 1) - 1
        if cost > left:
            break
        left, ranks[i] = left - cost, ranks[i] + 1
    assert ranks == [4, 2] and left == 18  # here the next value is a's (33): b's next rank (13) would fit
    model = nn.ModuleDict({"a": a, "b": b})
    opt = dlrt.DLRTOptimizer(
        model,
        integrator="bug",
        optimizer="sgd",
        lr=lr,
        tau=0.0,
        tau_mode="relative",
        truncation="global",
        budget=budget,
        budget_unit="params",
    )
    assert opt.lowrank_group["budget_unit"] == "params"

    step_both(opt, a, pa, b, pb)
    assert [a.rank, b.rank] == ranks
    assert sum(p.numel() for m in (a, b) for p in m.factor_parameters()) == budget - left
    for layer, W, r in zip((a, b), W_tilde, ranks):
        torch.testing.assert_close(layer.matrix().detach(), _best_rank(W, r), atol=1e-10, rtol=0)


@pytest.mark.parametrize("order", ["sigma", "energy"])
@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_a_budget_in_parameters_holds_with_the_gradient_rule(integrator, order):
    """The gradient rule's new directions get only the parameters the weights' ranks leave."""
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(24, 16, 3, dtype=DT), nn.Tanh(), LowRankLinear(16, 6, 3, dtype=DT))
    x, y = torch.randn(64, 24, dtype=DT), torch.randn(64, 6, dtype=DT)
    budget = 3 * (24 + 16) + 3 * (16 + 6)  # what rank-3 LoRA factors would hold
    opt = dlrt.DLRTOptimizer(
        model,
        integrator=integrator,
        optimizer="adam",
        lr=0.05,
        tau=0.0,
        truncation="global",
        budget=budget,
        budget_unit="params",
        budget_order=order,
    )
    largest = max(n + m + 2 * min(n, m) - 1 for n, m in ((16, 24), (6, 16)))  # the dearest rank
    for _ in range(8):
        opt.step(mse_closure(model, opt, x, y))
        held = sum(p.numel() for m in (model[0], model[2]) for p in m.factor_parameters())
        assert budget - largest < held <= budget  # tau 0: the budget binds, within one rank's price
    assert dlrt.ranks(model) != {"0": 3, "2": 3}  # the ranks moved


def test_budget_unit_is_checked_and_survives_a_state_dict_round_trip(tmp_path):
    model = net()
    with pytest.raises(ValueError, match=r"budget_unit must be one of \('rank', 'params'\), got 'parameters'"):
        dlrt.DLRTOptimizer(model, truncation="global", budget=100, budget_unit="parameters")
    with pytest.raises(ValueError, match="budget_unit='params' prices the ranks against a budget in parameters"):
        dlrt.DLRTOptimizer(model, truncation="global", budget_unit="params")
    with pytest.raises(ValueError, match=r"below what min_rank costs over 1 layers \(19\)"):  # 10 + 8 + 1
        dlrt.DLRTOptimizer(model, truncation="global", budget=18, budget_unit="params")
    tucker = dlrt.convert(nn.Sequential(nn.Conv2d(3, 4, 3).double()), rank=2, conv="tucker")
    with pytest.raises(ValueError, match="budget_unit='params' prices the ranks of matrix layers only"):
        dlrt.DLRTOptimizer(tucker, truncation="global", budget=500, budget_unit="params")
    with pytest.raises(ValueError, match=r"budget_order must be one of \('sigma', 'energy'\), got 'sigma2'"):
        dlrt.DLRTOptimizer(model, truncation="global", budget=100, budget_order="sigma2")
    with pytest.raises(ValueError, match="budget_order='energy' orders what a budget keeps: give budget="):
        dlrt.DLRTOptimizer(model, truncation="global", budget_order="energy")
    group = dlrt.DLRTOptimizer(model).lowrank_group
    assert (group["budget_unit"], group["budget_order"]) == ("rank", "sigma")  # the defaults: nothing changes

    x, y = data()
    opt = dlrt.DLRTOptimizer(
        model, optimizer="adam", truncation="global", budget=60, budget_unit="params", budget_order="energy"
    )
    opt.step(mse_closure(model, opt, x, y))
    sd = opt.state_dict()
    keys = ("budget", "budget_unit", "budget_order")
    fresh = dlrt.DLRTOptimizer(model, optimizer="adam", truncation="global", budget=3)
    fresh.load_state_dict(sd)
    assert [fresh.lowrank_group[k] for k in keys] == [60, "params", "energy"]
    dlrt.save(tmp_path / "ckpt.safetensors", model, opt)
    again = dlrt.DLRTOptimizer(model, optimizer="adam", truncation="global", budget=3)
    dlrt.load(tmp_path / "ckpt.safetensors", model, again)
    assert [again.lowrank_group[k] for k in keys] == [60, "params", "energy"]
    # A saved group with a bad unit is refused before anything changes; one saved before the key existed counts ranks.
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["budget_unit"] = "flops"
    with pytest.raises(ValueError, match="the state dict's low-rank group: budget_unit must be one of"):
        fresh.load_state_dict(bad)
    old = copy.deepcopy(sd)
    del old["param_groups"][0]["budget_unit"], old["param_groups"][0]["budget_order"]
    old["param_groups"][0]["budget"] = 3
    fresh.load_state_dict(old)
    assert [fresh.lowrank_group[k] for k in keys] == [3, "rank", "sigma"]
