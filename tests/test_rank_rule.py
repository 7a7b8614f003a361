"""The gradient rank rule (docs/algorithms.md §1.2): steps against float64 references, ranks that follow a
planted target up and down, its validation, and the scaled start of ``dlrt.convert`` (§1.3)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import LowRankLinear, TuckerConv2d
from dlrt.optim import RULES
from dlrt.peft import GeoLoRAConfig
from dlrt.training import TrainConfig

from .helpers import DT, LeastSquares, mse_closure, ref_augment, ref_gradient_truncate, ref_orth

LR = 0.3
TOL = {"atol": 1e-10, "rtol": 1e-10}


def _factors(layer):
    return layer.U.detach().clone(), layer.S.detach().clone(), layer.V.detach().clone()


def _assert_same_point(layer, U, S, V):
    assert layer.rank == U.shape[1]
    torch.testing.assert_close(layer.matrix().detach(), U @ S @ V.T, **TOL)
    torch.testing.assert_close(layer.U @ layer.U.T, U @ U.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.V @ layer.V.T, V @ V.T, atol=1e-10, rtol=0)


def _step_problem(integrator, tau, r=3):
    torch.manual_seed(0)
    problem = LeastSquares(14, 10)
    layer = LowRankLinear(10, 14, rank=r, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=LR, tau=tau, tau_mode="gradient")
    return problem, layer, opt


@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_bug_step_with_the_gradient_rule_matches_dense_reference(tau):
    problem, layer, opt = _step_problem("bug", tau)
    closure = problem.closure(layer, opt)
    grew = False
    for _ in range(5):
        U0, S0, V0 = _factors(layer)
        G0 = problem.G(U0 @ S0 @ V0.T)
        U_hat = ref_augment(U0, U0 @ S0 - LR * G0 @ V0)
        V_hat = ref_augment(V0, V0 @ S0.T - LR * G0.T @ U0)
        G_hat = U_hat.T @ G0 @ V_hat  # SGD: the trend is the step's own gradient
        S1 = U_hat.T @ U0 @ S0 @ V0.T @ V_hat - LR * G_hat
        expected = ref_gradient_truncate(U_hat, S1, V_hat, G_hat, tau)
        r0 = layer.rank
        opt.step(closure)
        _assert_same_point(layer, *expected)
        grew |= layer.rank > r0
    assert grew  # the reference is not only the relative rule's


def test_parallel_step_sees_the_block_its_step_leaves_out():
    problem, layer, opt = _step_problem("parallel", 0.1)
    closure = problem.closure(layer, opt)
    for _ in range(4):
        U0, S0, V0 = _factors(layer)
        r = S0.shape[0]
        G0 = problem.G(U0 @ S0 @ V0.T)
        U_hat = ref_augment(U0, G0 @ V0)
        V_hat = ref_augment(V0, G0.T @ U0)
        G_hat = U_hat.T @ G0 @ V_hat
        step = G_hat.clone()
        step[r:, r:] = 0  # the parallel step has no Ũᵀ G₀ Ṽ ...
        S1 = torch.zeros_like(G_hat)
        S1[:r, :r] = S0
        S1 = S1 - LR * step
        # ... but the rank rule reads it: the trend is the whole gradient on the augmented bases.
        expected = ref_gradient_truncate(U_hat, S1, V_hat, G_hat, 0.1)
        opt.step(closure)
        _assert_same_point(layer, *expected)


def test_abc_step_with_the_gradient_rule_matches_dense_reference():
    problem, layer, opt = _step_problem("abc", 0.1)
    closure = problem.closure(layer, opt)
    m = layer.in_dim
    for _ in range(4):
        U0, S0, V0 = _factors(layer)
        G0 = problem.G(U0 @ S0 @ V0.T)
        U_hat = ref_augment(U0, -LR * G0 @ V0)
        S_hat = U_hat.T @ U0 @ S0
        L1 = V0 @ S_hat.T - LR * G0.T @ U_hat
        # W₁ = Û L1ᵀ: the core L1ᵀ on the right basis I_m, with trend Ûᵀ G₀.
        U1, S1, V1 = ref_gradient_truncate(U_hat, L1.T, torch.eye(m, dtype=DT), U_hat.T @ G0, 0.1)
        opt.step(closure)
        assert layer.rank == U1.shape[1]
        torch.testing.assert_close(layer.matrix().detach(), U1 @ S1 @ V1.T, **TOL)


# ------------------------------------------------------------------------------ ranks that follow the task


def _planted(n, m, rank, seed):
    g = torch.Generator().manual_seed(seed)
    U = ref_orth(torch.randn(n, 8, generator=g, dtype=DT))
    V = ref_orth(torch.randn(m, 8, generator=g, dtype=DT))
    s = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6], dtype=DT)
    return U[:, :rank] @ torch.diag(s[:rank]) @ V[:, :rank].T


def _fit(layer, opt, X, W_target, steps):
    Y = X @ W_target.T
    ranks = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((layer(X) - Y) ** 2).sum(1).mean()
            loss.backward()
            return loss

        opt.step(closure)
        ranks.append(layer.rank)
    return ranks, float((layer.matrix().detach() - W_target).norm() / W_target.norm())


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_ranks_follow_a_target_whose_rank_switches_3_8_3(integrator):
    # Nested targets: the five directions that come and go are orthogonal to the first three on both
    # sides, so at the rank-3 solution they are invisible to the tangent space (the gradient's normal
    # component). Started at rank 1.
    torch.manual_seed(0)
    X = torch.randn(200, 30, dtype=DT)
    layer = LowRankLinear(30, 40, rank=1, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=0.5, tau=0.1)
    for rank in (3, 8, 3):
        ranks, err = _fit(layer, opt, X, _planted(40, 30, rank, seed=1), 150)
        assert set(ranks[60:]) == {rank}, ranks  # there within 60 steps of the switch, and settled
        assert err < 1e-8


def _from_rank_1(target_rank, seed, steps, **optimizer):
    """Fit the planted target from a rank-1 layer: (ranks per step, final relative error, optimizer)."""
    torch.manual_seed(0)
    X = torch.randn(200, 30, dtype=DT)
    layer = LowRankLinear(30, 40, rank=1, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(layer, **optimizer)
    return (*_fit(layer, opt, X, _planted(40, 30, target_rank, seed=seed), steps), opt)


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_the_relative_rule_does_not_follow_the_same_target(integrator):
    # The old rule, by name: from rank 1 it stalls below the planted rank 3 → 8 (what the gradient rule fixes).
    ranks, _, _ = _from_rank_1(8, 1, 150, integrator=integrator, optimizer="sgd", lr=0.05, tau=0.1, tau_mode="relative")
    assert max(ranks) < 8


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_a_rank_1_start_reaches_a_planted_rank_6(integrator):
    ranks, err, _ = _from_rank_1(6, 2, 400, integrator=integrator, optimizer="sgd", lr=0.05, tau=0.05)
    assert set(ranks[-100:]) == {6}
    assert max(ranks) <= 8  # grows to what the task needs, not to everything
    assert err < 1e-3


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
@pytest.mark.parametrize("optimizer", ["adam", "geo-adam"])
def test_adaptive_optimizers_grow_a_rank_1_start_too(integrator, optimizer):
    # Adam's steps are lr-sized whatever the gradient: the relative rule alone keeps rank 1 here.
    ranks, err, _ = _from_rank_1(6, 2, 300, integrator=integrator, optimizer=optimizer, lr=0.005, tau=0.05)
    assert min(ranks[-100:]) >= 6
    assert err < 0.5  # the relative rule, stuck at rank 1, leaves 0.8


def test_tau_grad_sets_the_trend_tolerance_apart_from_the_weights():
    # A coarse tau keeps the directions a planted rank-6 target needs only with a finer trend tolerance.
    coarse, _, _ = _from_rank_1(6, 2, 100, optimizer="sgd", lr=0.05, tau=0.3)
    fine, _, opt = _from_rank_1(6, 2, 100, optimizer="sgd", lr=0.05, tau=0.3, tau_grad=0.02)
    assert opt.lowrank_group["tau_grad"] == 0.02
    assert max(fine) > max(coarse)


def test_a_tucker_layer_grows_its_modes_from_rank_1():
    torch.manual_seed(0)
    planted = (3, 3, 2, 2)
    core = torch.randn(*planted, dtype=DT)
    bases = [ref_orth(torch.randn(n, r, dtype=DT)) for n, r in zip((6, 4, 3, 3), planted)]
    W = core
    for mode, B in enumerate(bases):
        W = torch.movedim(torch.tensordot(B, torch.movedim(W, mode, 0), dims=1), 0, mode)
    W = W / W.norm() * 3.0
    x = torch.randn(16, 4, 6, 6, dtype=DT)
    y = F.conv2d(x, W, None, 1, 1)
    student = TuckerConv2d(4, 6, 3, (1, 1, 1, 1), padding=1, bias=False, dtype=DT)
    opt = dlrt.DLRTOptimizer(student, integrator="bug", optimizer="sgd", lr=1.0, tau=0.05)
    closure = mse_closure(student, opt, x, y)
    for _ in range(300):
        opt.step(closure)
    assert student.ranks == planted
    assert float((student.weight - W).norm()) < 1e-6 * float(W.norm())


def test_the_budget_caps_the_growth_of_global_truncation():
    # Two independent least-squares layers whose targets need rank 6 each, under a total budget of 9.
    torch.manual_seed(0)
    X = torch.randn(200, 30, dtype=DT)
    layers = nn.ModuleList(LowRankLinear(30, 40, rank=1, bias=False, dtype=DT) for _ in range(2))
    targets = [_planted(40, 30, 6, seed=s) for s in (3, 4)]
    opt = dlrt.DLRTOptimizer(layers, optimizer="sgd", lr=0.5, tau=0.05, truncation="global", budget=9)

    def closure():
        opt.zero_grad()
        loss = sum(0.5 * ((m(X) - X @ W.T) ** 2).sum(1).mean() for m, W in zip(layers, targets))
        loss.backward()
        return loss

    totals = []
    for _ in range(60):
        opt.step(closure)
        totals.append(sum(m.rank for m in layers))
    assert max(totals) <= 9
    assert totals[-1] == 9  # the trend asks for 12: the budget is used up, never exceeded


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("tau_mode", ["gradient", "relative"])
@pytest.mark.parametrize("tau", [1.0, 1.5, float("nan"), float("inf"), -0.1])
def test_a_relative_tolerance_outside_0_1_is_refused(tau_mode, tau):
    layer = LowRankLinear(10, 14, rank=3)
    with pytest.raises(ValueError, match="tau"):
        dlrt.DLRTOptimizer(layer, tau=tau, tau_mode=tau_mode)


def test_every_entry_point_checks_tau_and_tau_mode():
    dlrt.DLRTOptimizer(LowRankLinear(10, 14, rank=3), tau=1.5, tau_mode="absolute")  # an absolute ϑ may be any size
    with pytest.raises(ValueError, match="tau_mode"):
        dlrt.DLRTOptimizer(LowRankLinear(10, 14, rank=3), tau_mode="step")
    with pytest.raises(ValueError, match="tau=1.5"):
        TrainConfig(tau=1.5)
    with pytest.raises(ValueError, match="tau_mode"):
        TrainConfig(tau_mode="grow")
    with pytest.raises(ValueError, match="tau_grad=1.2"):
        TrainConfig(tau_grad=1.2)
    with pytest.raises(ValueError, match="tau_grad=nan"):
        dlrt.DLRTOptimizer(LowRankLinear(10, 14, rank=3), tau_grad=float("nan"))
    with pytest.raises(ValueError, match="tau=1.5"):
        GeoLoRAConfig(tau=1.5)
    model = nn.Sequential(nn.Linear(10, 14))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="tau=1.5"):
        dlrt.convert(model, tau=1.5)
    with pytest.raises(ValueError, match="init"):
        dlrt.convert(model, rank=2, init="orthogonal")
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model.state_dict(), before)


def test_trend_is_the_rules_averaged_gradient():
    g1, g2 = torch.randn(3, 3, dtype=DT), torch.randn(3, 3, dtype=DT)
    x = torch.zeros(3, 3, dtype=DT)
    adam, state = RULES["adam"](), {}
    group = dict(adam.defaults)
    adam.step(x, g1, state, group)
    torch.testing.assert_close(adam.trend(g1, state), g1)  # one step: the bias-corrected mean is g1
    adam.step(x, g2, state, group)
    torch.testing.assert_close(adam.trend(g2, state), (0.09 * g1 + 0.1 * g2) / 0.19)
    sgd, state = RULES["sgd"](), {}
    group = {**sgd.defaults, "momentum": 0.9}
    sgd.step(x, g1, state, group)
    sgd.step(x, g2, state, group)
    torch.testing.assert_close(sgd.trend(g2, state), 0.9 * g1 + g2)
    torch.testing.assert_close(RULES["sgd"]().trend(g2, {}), g2)  # no momentum: the gradient


# ------------------------------------------------------------------------------------------- the start


def test_the_scaled_start_keeps_each_layers_norm_and_svd_keeps_the_best_approximation():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.Linear(64, 10))
    for conv in ("matrix", "tucker"):
        for init in ("svd", "scaled"):
            model = dlrt.convert(copy.deepcopy(dense), rank=2, conv=conv, init=init, exclude=["3"])
            for name in ("0", "2"):
                W = dict(dense.named_modules())[name].weight.detach()
                low = dict(model.named_modules())[name].to_dense().weight.detach()
                if init == "scaled":
                    torch.testing.assert_close(low.norm(), W.norm())
                else:
                    assert low.norm() < 0.9 * W.norm()  # the truncated SVD of a random weight keeps little


def test_the_scaled_start_keeps_the_signal_of_a_deep_random_network():
    torch.manual_seed(0)
    dense = dlrt.models.get_model("mlp")
    x = torch.randn(256, 1, 28, 28)

    def features(model):  # the last hidden layer's activations (the head and biases left out)
        h = torch.flatten(x, 1)
        for i in range(1, 5):
            layer = getattr(model, f"fc{i}")
            h = torch.relu(h @ (layer.to_dense() if hasattr(layer, "to_dense") else layer).weight.T)
        return h.detach()

    ref = features(dense).std()
    svd = features(dlrt.convert(copy.deepcopy(dense), rank=5, exclude=["head"])).std()
    scaled = features(dlrt.convert(copy.deepcopy(dense), rank=5, exclude=["head"], init="scaled")).std()
    assert svd < 0.1 * ref
    assert 0.3 * ref < scaled < 3 * ref


def test_a_run_written_before_the_gradient_rule_resumes_with_the_rule_it_began_with(tmp_path):
    import yaml

    from dlrt.training.config import load_config
    from dlrt.training.loop import _started_before_the_gradient_rule

    old = TrainConfig(tau_mode="relative", init="svd").to_dict()
    del old["tau_mode"], old["init"]  # as a config.yaml of an earlier release
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "config.yaml", _started_before_the_gradient_rule(tmp_path / "config.yaml"))
    assert (cfg.tau_mode, cfg.init) == ("relative", "svd")
    new = TrainConfig(optimizer="sgd").to_dict()  # written now: resolved, and kept as written
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(new))
    cfg = load_config(tmp_path / "config.yaml", _started_before_the_gradient_rule(tmp_path / "config.yaml"))
    assert (cfg.tau_mode, cfg.init) == ("gradient", "scaled")
