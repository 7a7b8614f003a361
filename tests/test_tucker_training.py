"""Training Tucker layers (TDLRT): every integrator step against a dense float64 reference, and training behaviour."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import LowRankLinear, TuckerConv2d, linalg
from dlrt.integrators.base import S_steps, truncate, tucker_augment, tucker_galerkin_grad

from .helpers import DT, mse_closure, ref_augment, ref_orth, ref_rank

LR = 0.2
TOL = {"atol": 1e-10, "rtol": 1e-10}


# ------------------------------------------------------------------------------------------------ helpers


def _tucker(in_ch=3, out_ch=5, ranks=(2, 2, 2, 2), **kw):
    return TuckerConv2d(in_ch, out_ch, 3, ranks, padding=1, dtype=DT, **kw)


def _data(batch=6, in_ch=3, out_ch=5, size=6):
    return torch.randn(batch, in_ch, size, size, dtype=DT), torch.randn(batch, out_ch, size, size, dtype=DT)


def _dense_conv(layer, x, W, bias):
    return F.conv2d(x, W, bias, layer.stride, layer.padding, layer.dilation)


def _kernel_grad(layer, x, y, W=None):
    """The dense kernel gradient ``G`` of the MSE at ``W`` (default: the layer's kernel), by plain autograd."""
    W = (layer.kernel() if W is None else W).detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach()
    ((_dense_conv(layer, x, W, bias) - y) ** 2).mean().backward()
    return W.grad


def _snapshot(layer):
    return layer.C.detach().clone(), [U.detach().clone() for U in layer.bases]


def _project(T, mats):
    return linalg.multi_mode_product(T, mats)


def _mode_grad(G, bases, C, i, Q=None):
    """``Mat_i(G ×_{j≠i} U_jᵀ) Q_i`` with ``Mat_i(C)ᵀ = Q_i R_i`` (any sign convention where only its range is used)."""
    Q = torch.linalg.qr(linalg.unfold(C, i).T)[0] if Q is None else Q
    return linalg.unfold(_project(G, [None if j == i else U.T for j, U in enumerate(bases)]), i) @ Q


def _ref_truncate(C1, bases, tau, modes, bounds):
    """Truncated HOSVD of the core: each adapted mode by the SVD of its unfolding of ``C1`` (the τ rule)."""
    mats = [None] * 4
    for i in modes:
        P, s, _ = torch.linalg.svd(linalg.unfold(C1, i), full_matrices=False)
        k = ref_rank(s, tau, *bounds[i])
        mats[i] = P[:, :k]
    core = _project(C1, [None if P is None else P.T for P in mats])
    new = [U if P is None else U @ P for U, P in zip(bases, mats)]
    return _project(core, new), tuple(core.shape)


def _ref_adaptive(C, bases, G, tau, modes, bounds, parallel=False):
    """One ``bug`` (or ``parallel``) step of a Tucker layer from ``(C, bases)`` with the kernel gradient ``G``."""
    hats = [ref_augment(U, _mode_grad(G, bases, C, i)) if i in modes else U for i, U in enumerate(bases)]
    C_hat = _project(C, [H.T @ U for H, U in zip(hats, bases)])
    G_hat = _project(G, [H.T for H in hats])
    if parallel:  # no step in the blocks where two or more modes are new
        new = torch.zeros(G_hat.shape, dtype=torch.int64)
        for i, U in enumerate(bases):
            idx = (torch.arange(G_hat.shape[i]) >= U.shape[1]).long()
            new = new + idx.reshape([-1 if j == i else 1 for j in range(4)])
        G_hat = torch.where(new >= 2, torch.zeros_like(G_hat), G_hat)
    return _ref_truncate(C_hat - LR * G_hat, hats, tau, modes, bounds)


def _assert_orthonormal(layer, tol=1e-10):
    for i, U in enumerate(B.detach() for B in layer.bases):
        err = float((U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max())
        assert err < tol, f"basis {i} is off orthonormality by {err:.2e}"


def _bounds(layer):
    return [layer.mode_bounds(i) for i in range(4)]


# ------------------------------------------------------------------------------ 1. one step vs the reference


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
@pytest.mark.parametrize("tau", [0.0, 0.02, 0.1])
@pytest.mark.parametrize("route", ["thin", "dense"])
def test_adaptive_step_matches_dense_reference(integrator, tau, route):
    layer = _tucker()
    layer.contraction = route  # both the thin products and the full kernel's gradient G give the same step
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=LR, tau=tau, tau_mode="relative")
    closure = mse_closure(layer, opt, x, y)
    seen = set()
    for _ in range(3):
        C, bases = _snapshot(layer)
        G = _kernel_grad(layer, x, y)
        b_expected = layer.bias.detach() - LR * 2 * (layer(x) - y).detach().sum((0, 2, 3)) / y.numel()
        W_expected, ranks = _ref_adaptive(
            C, bases, G, tau, layer.tucker_modes, _bounds(layer), parallel=integrator == "parallel"
        )
        opt.step(closure)
        assert layer.ranks == ranks
        torch.testing.assert_close(layer.weight, W_expected, **TOL)
        torch.testing.assert_close(layer.bias.detach(), b_expected, **TOL)
        seen.add(layer.ranks)
    if tau == 0.0:
        assert layer.ranks == layer.full_ranks  # the step fills the augmented core: nothing is cut
    if tau == 0.02:
        assert len(seen) > 1  # the rule keeps some new directions and drops others


@pytest.mark.parametrize("route", ["thin", "dense"])
def test_fixed_step_matches_dense_reference(route):
    layer = _tucker()
    layer.contraction = route
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator="fixed", optimizer="sgd", lr=LR)
    closure = mse_closure(layer, opt, x, y)
    for _ in range(3):
        C, bases = _snapshot(layer)
        G = _kernel_grad(layer, x, y)
        new = []
        for i, U in enumerate(bases):
            Q, R = torch.linalg.qr(linalg.unfold(C, i).T)
            new.append(ref_orth(U @ R.T - LR * _mode_grad(G, bases, C, i, Q)))  # the K-step of K_i = U_i R_iᵀ
        C1 = _project(C, [N.T @ U for N, U in zip(new, bases)])
        G1 = _kernel_grad(layer, x, y, W=_project(C1, new))  # the second pass, at the new bases
        W_expected = _project(C1 - LR * _project(G1, [N.T for N in new]), new)
        opt.step(closure)
        assert layer.ranks == (2, 2, 2, 2)
        torch.testing.assert_close(layer.weight, W_expected, **TOL)
        _assert_orthonormal(layer)


class _Mixed(nn.Module):
    def __init__(self, conv_ranks=(2, 2, 2, 2), fc_rank=3, **kw):
        super().__init__()
        self.conv = TuckerConv2d(3, 4, 3, conv_ranks, padding=1, dtype=DT, **kw)
        self.fc = LowRankLinear(4 * 6 * 6, 5, rank=fc_rank, dtype=DT)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_mixed_model_steps_tucker_and_matrix_layers_in_the_same_step():
    torch.manual_seed(1)
    model = _Mixed()
    x, y = torch.randn(6, 3, 6, 6, dtype=DT), torch.randn(6, 5, dtype=DT)
    tau = 0.1
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=LR, tau=tau, tau_mode="relative")
    conv, fc = model.conv, model.fc
    C, bases = _snapshot(conv)
    U0, S0, V0 = (t.detach().clone() for t in (fc.U, fc.S, fc.V))
    # Dense gradients of both kernels through the whole network, at the current point.
    W = conv.kernel().detach().clone().requires_grad_()
    M = fc.matrix().detach().clone().requires_grad_()
    h = torch.tanh(_dense_conv(conv, x, W, conv.bias.detach())).flatten(1)
    ((F.linear(h, M, fc.bias.detach()) - y) ** 2).mean().backward()
    W_expected, ranks = _ref_adaptive(C, bases, W.grad, tau, conv.tucker_modes, _bounds(conv))
    # The matrix BUG (tests/test_integrators.py): one pass at W₀ serves the K, L and S steps.
    G = M.grad
    U_hat = ref_augment(U0, U0 @ S0 - LR * G @ V0)
    V_hat = ref_augment(V0, V0 @ S0.T - LR * G.T @ U0)
    S_hat = U_hat.T @ U0 @ S0 @ V0.T @ V_hat - LR * U_hat.T @ G @ V_hat
    P, s, Qh = torch.linalg.svd(S_hat)
    r = ref_rank(s, tau)
    M_expected = U_hat @ P[:, :r] @ torch.diag(s[:r]) @ Qh[:r] @ V_hat.T

    opt.step(mse_closure(model, opt, x, y))
    assert conv.ranks == ranks
    torch.testing.assert_close(conv.weight, W_expected, **TOL)
    assert fc.rank == r
    assert not torch.allclose(fc.matrix().detach(), U0 @ S0 @ V0.T)
    torch.testing.assert_close(fc.matrix().detach(), M_expected, **TOL)
    # Both layers compute with their new factors.
    z = torch.randn(4, fc.in_features, dtype=DT)
    torch.testing.assert_close(fc(z).detach(), F.linear(z, M_expected, fc.bias.detach()), **TOL)
    torch.testing.assert_close(conv(x).detach(), _dense_conv(conv, x, W_expected, conv.bias.detach()), **TOL)


# ------------------------------------------------------------------------------------- 2. orthonormality


@pytest.mark.parametrize("integrator", ["bug", "parallel", "fixed"])
def test_bases_stay_orthonormal_over_many_steps(integrator):
    layer = _tucker()
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=0.5, tau=0.1)
    closure = mse_closure(layer, opt, x, y)
    seen = {layer.ranks}
    for step in range(500):
        opt.step(closure)
        seen.add(layer.ranks)
        if step % 50 == 49:
            _assert_orthonormal(layer)
    _assert_orthonormal(layer)
    if integrator == "fixed":
        assert seen == {(2, 2, 2, 2)}
    else:
        assert len(seen) > 1, f"the ranks never changed: {seen}"


# ------------------------------------------------------------------------------------------ 3. τ = 0


def test_truncation_with_tau_zero_keeps_the_kernel():
    layer = _tucker()
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=LR, tau=0.0, tau_mode="relative")
    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    W0 = layer.weight
    assert layer.ranks == (2, 2, 2, 2)
    tucker_augment(opt, layer)
    augmented = layer.ranks
    assert augmented == (4, 3, 3, 3)
    torch.testing.assert_close(layer.weight, W0, atol=1e-12, rtol=0)  # the Galerkin core represents W₀
    truncate(opt, [layer], opt.lowrank_group)  # on the augmented core, whose new rows are zero
    torch.testing.assert_close(layer.weight, W0, atol=1e-12, rtol=0)
    _assert_orthonormal(layer)

    # After a core step the augmented core has full multilinear rank: τ = 0 keeps all of it.
    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    inputs, gC = layer.pass_inputs, layer.C.grad
    tucker_augment(opt, layer)
    S_steps(opt, [layer], [tucker_galerkin_grad(opt, layer, inputs, gC)])
    W1, ranks = layer.weight, layer.ranks
    assert ranks == (4, 3, 3, 3)
    truncate(opt, [layer], opt.lowrank_group)
    assert layer.ranks == ranks
    torch.testing.assert_close(layer.weight, W1, atol=1e-12, rtol=0)
    # With a positive τ in the group the same truncation does cut.
    opt.lowrank_group["tau"] = 0.3
    truncate(opt, [layer], opt.lowrank_group)
    assert math.prod(layer.ranks) < math.prod(ranks)


# ------------------------------------------------------------------------- 4. a planted multilinear rank


def test_bug_recovers_a_planted_multilinear_rank():
    planted = (2, 2, 2, 2)
    in_ch, out_ch = 4, 6
    core = torch.randn(*planted, dtype=DT)
    teacher_bases = [ref_orth(torch.randn(n, r, dtype=DT)) for n, r in zip((out_ch, in_ch, 3, 3), planted)]
    W_teacher = _project(core, teacher_bases)
    W_teacher = W_teacher / W_teacher.norm() * 3.0
    x = torch.randn(16, in_ch, 6, 6, dtype=DT)
    y = F.conv2d(x, W_teacher, None, 1, 1)  # 576 patches of 36 values: the kernel is identifiable
    # The student starts at full multilinear rank from an unrelated random convolution.
    student = TuckerConv2d.from_conv(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False, dtype=DT), ranks=(6, 4, 3, 3))
    assert student.ranks == (6, 4, 3, 3)
    opt = dlrt.DLRTOptimizer(student, integrator="bug", optimizer="sgd", lr=1.0, tau=0.05, tau_mode="relative")
    closure = mse_closure(student, opt, x, y)
    history = []
    for _ in range(150):
        loss = float(opt.step(closure).detach())
        history.append(student.ranks)
    assert loss < 1e-12 * float((y**2).mean())
    assert student.ranks == planted
    assert set(history[-50:]) == {planted}  # settled, not passing through
    assert float((student.weight - W_teacher).norm()) < 1e-8 * float(W_teacher.norm())
    _assert_orthonormal(student)


# --------------------------------------------------------------------------------------- 5. checkpoints


def _optimizer_tensors(opt):
    return [
        {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} if p in opt.state else {}
        for g in opt.param_groups
        for p in g["params"]
    ]


def test_save_load_step_is_bit_identical_after_a_rank_change(tmp_path):
    model = _Mixed()
    x, y = torch.randn(6, 3, 6, 6, dtype=DT), torch.randn(6, 5, dtype=DT)
    kw = {"integrator": "bug", "optimizer": "adam", "lr": 0.02, "tau": 0.1}
    opt = dlrt.DLRTOptimizer(model, **kw)
    start = model.conv.ranks
    for _ in range(30):
        opt.step(mse_closure(model, opt, x, y))
        if model.conv.ranks != start:
            break
    assert model.conv.ranks != start, "no Tucker rank changed: the test does not exercise resizing"
    opt.step(mse_closure(model, opt, x, y))  # Adam state on the new ranks, transported by a step
    path = dlrt.save(tmp_path / "ckpt.safetensors", model, opt)

    torch.manual_seed(7)
    other = _Mixed(conv_ranks=(1, 1, 1, 1), fc_rank=1)
    opt2 = dlrt.DLRTOptimizer(other, **kw)
    assert dlrt.ranks(other) != dlrt.ranks(model)
    dlrt.load(path, other, opt2)
    assert dlrt.ranks(other) == dlrt.ranks(model)

    x2, y2 = torch.randn(6, 3, 6, 6, dtype=DT), torch.randn(6, 5, dtype=DT)
    opt.step(mse_closure(model, opt, x2, y2))
    opt2.step(mse_closure(other, opt2, x2, y2))
    assert dlrt.ranks(other) == dlrt.ranks(model)
    ref, got = model.state_dict(), other.state_dict()
    assert list(ref) == list(got)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    for a, b in zip(_optimizer_tensors(opt), _optimizer_tensors(opt2)):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert opt2.steps == opt.steps


# ------------------------------------------------------------------------------------------ 6. modes


def test_only_the_chosen_modes_adapt():
    layer = _tucker(tucker_modes=(0, 1))
    U2, U3 = layer.U2.detach().clone(), layer.U3.detach().clone()
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=0.5, tau=0.1)
    closure = mse_closure(layer, opt, x, y)
    seen = set()
    for _ in range(100):
        opt.step(closure)
        seen.add(layer.ranks[:2])
        assert layer.ranks[2:] == (2, 2)
    assert torch.equal(layer.U2.detach(), U2) and torch.equal(layer.U3.detach(), U3)
    assert len(seen) > 1  # the channel modes did adapt
    _assert_orthonormal(layer)


# ------------------------------------------------------------------------------------ 7. global budget


@pytest.mark.parametrize("modes", [(0, 1, 2, 3), (0, 1)])
@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_global_truncation_keeps_the_total_rank_within_the_budget(modes, tau):
    budget = 9 if len(modes) == 4 else 6
    model = _Mixed(tucker_modes=modes)
    x, y = torch.randn(6, 3, 6, 6, dtype=DT), torch.randn(6, 5, dtype=DT)
    opt = dlrt.DLRTOptimizer(
        model, integrator="bug", optimizer="sgd", lr=LR, tau=tau, truncation="global", budget=budget
    )
    fixed = [model.conv.ranks[i] for i in range(4) if i not in modes]
    for _ in range(4):
        opt.step(mse_closure(model, opt, x, y))
        total = sum(model.conv.ranks[i] for i in modes) + model.fc.rank
        assert total <= budget
        if tau == 0.0:  # nothing is below the tolerance: the budget alone decides
            assert total == budget
        assert [model.conv.ranks[i] for i in range(4) if i not in modes] == fixed


# ------------------------------------------------------------------------------------------- 8. errors


def test_optimizer_and_conversion_errors():
    model = nn.Sequential(_tucker())
    with pytest.raises(ValueError, match="integrator='abc' does not drive Tucker layers"):
        dlrt.DLRTOptimizer(model, integrator="abc")
    with pytest.raises(ValueError, match="optimizer='geo-adam' does not drive Tucker layers"):
        dlrt.DLRTOptimizer(model, optimizer="geo-adam")
    with pytest.raises(ValueError, match=r"ranks \(2, 2, 2, 2\), above max_rank=1"):
        dlrt.DLRTOptimizer(model, max_rank=1)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=DT))
    with pytest.raises(ValueError, match="tucker_modes= applies to conv='tucker' only"):
        dlrt.convert(dense, rank=4, conv="matrix", tucker_modes=(0,))
    assert type(dense[0]) is nn.Conv2d  # nothing changed


# ------------------------------------------------------------------------------------- 9. conversion


def test_convert_to_tucker_ranks_compression_and_back_to_dense():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=DT), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5, dtype=DT)
    )
    dense_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 3, 6, 6, dtype=DT)
    dlrt.convert(model, rank=2, conv="tucker")
    conv, fc = model[0], model[3]
    assert isinstance(conv, TuckerConv2d) and isinstance(fc, LowRankLinear)
    assert dlrt.ranks(model) == {"0": (2, 2, 2, 2), "3": 2}
    stored = sum(p.numel() for p in (*conv.bases, conv.C, conv.bias))
    stored += sum(p.numel() for p in (fc.U, fc.S, fc.V, fc.bias))
    assert stored == 4 * 2 + 3 * 2 + 3 * 2 + 3 * 2 + 2**4 + 4 + (5 * 2 + 4 + 144 * 2 + 5)
    assert dlrt.parameter_counts(model) == (stored, dense_params)
    assert dlrt.compression(model) == pytest.approx(1 - stored / dense_params, abs=1e-15)
    out = model(x).detach()
    W, b = conv.weight, conv.bias.detach().clone()
    dlrt.to_dense(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    torch.testing.assert_close(model[0].weight.detach(), W, atol=1e-12, rtol=0)
    assert torch.equal(model[0].bias.detach(), b)
    torch.testing.assert_close(model(x).detach(), out, **TOL)

    adapted = dlrt.convert(nn.Sequential(nn.Conv2d(3, 4, 3, dtype=DT)), rank=2, conv="tucker", tucker_modes=(1, 0))
    assert adapted[0].tucker_modes == (0, 1)


# ------------------------------------------------------------------------------------ 10. robustness


def test_nonfinite_loss_is_skipped_and_changes_nothing():
    layer = _tucker()
    x, y = _data()
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="adam", lr=0.01, tau=0.1, on_nonfinite="skip")
    opt.step(mse_closure(layer, opt, x, y))  # Adam state to keep
    factors = [p.detach().clone() for p in (*layer.factor_parameters(), layer.bias)]
    state = [{k: v.clone() for k, v in st.items()} for st in _optimizer_tensors(opt)]
    assert any(state)

    def bad():
        opt.zero_grad()
        loss = ((layer(x) - y) ** 2).mean() * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="step skipped"):
        assert opt.step(bad) is None
    after = [p.detach() for p in (*layer.factor_parameters(), layer.bias)]
    assert all(torch.equal(a, b) for a, b in zip(factors, after))
    for a, b in zip(state, _optimizer_tensors(opt)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert opt.steps == 1 and opt.phase == 0
    opt.step(mse_closure(layer, opt, x, y))  # and training goes on
    assert opt.steps == 2 and torch.isfinite(layer.weight).all()


def test_max_grad_norm_clips_the_tucker_step():
    layer = _tucker()
    x, y = _data()
    twin, plain = copy.deepcopy(layer), copy.deepcopy(layer)
    W0 = layer.weight
    # The tangent norm of the pass: the core gradient, each mode's K-gradient outside its basis, the bias.
    C, bases = _snapshot(layer)
    G = _kernel_grad(layer, x, y)
    square = float(_project(G, [U.T for U in bases]).square().sum())
    for i, U in enumerate(bases):
        g = _mode_grad(G, bases, C, i)
        square += float(g.square().sum() - (U.T @ g).square().sum())
    gb = 2 * (layer(x) - y).detach().sum((0, 2, 3)) / y.numel()
    norm = math.sqrt(square + float(gb.square().sum()))

    free = dlrt.DLRTOptimizer(
        layer, integrator="bug", optimizer="sgd", lr=LR, tau=0.0, max_grad_norm=1e6, tau_mode="relative"
    )
    free.step(mse_closure(layer, free, x, y))
    assert free.last_grad_norm == pytest.approx(norm, rel=1e-10)
    unclipped = dlrt.DLRTOptimizer(plain, integrator="bug", optimizer="sgd", lr=LR, tau=0.0, tau_mode="relative")
    unclipped.step(mse_closure(plain, unclipped, x, y))
    assert unclipped.last_grad_norm is None
    torch.testing.assert_close(plain.weight, layer.weight, atol=1e-14, rtol=0)  # a bound above the norm: no clip
    clip = 1e-3
    clipped = dlrt.DLRTOptimizer(
        twin, integrator="bug", optimizer="sgd", lr=LR, tau=0.0, max_grad_norm=clip, tau_mode="relative"
    )
    clipped.step(mse_closure(twin, clipped, x, y))
    assert math.isfinite(clipped.last_grad_norm) and clipped.last_grad_norm > 0
    assert clipped.last_grad_norm == pytest.approx(norm, rel=1e-10)  # the norm before clipping
    move, small = (layer.weight - W0).norm(), (twin.weight - W0).norm()
    assert small < move
    # τ = 0 keeps the whole step, which is linear in the gradient: clipping scales it by clip / norm.
    torch.testing.assert_close(twin.weight - W0, (layer.weight - W0) * (clip / norm), atol=1e-12, rtol=1e-8)


# --------------------------------------------------------------------------------- 11. default dtype


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_float64_default_dtype(float64_default):
    layer = TuckerConv2d(3, 5, 3, (2, 2, 2, 2), padding=1)
    x, y = torch.randn(4, 3, 6, 6), torch.randn(4, 5, 6, 6)
    assert x.dtype == torch.float64
    opt = dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="sgd", lr=LR, tau=0.05)
    W0 = layer.weight
    opt.step(mse_closure(layer, opt, x, y))
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.weight.dtype == torch.float64 and not torch.equal(layer.weight, W0)
    _assert_orthonormal(layer)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_grad_scaler_unscales_every_tucker_gradient(integrator):
    """A scaled backward (GradScaler) must take the same step as an unscaled one: the mode gradients, the core
    gradient and the recorded pass the core step contracts later are all unscaled by the optimizer."""
    torch.manual_seed(3)
    plain = TuckerConv2d(3, 5, 3, (3, 2, 2, 2), padding=1)
    scaled = copy.deepcopy(plain)
    x, y = torch.randn(6, 3, 6, 6), torch.randn(6, 5, 6, 6)
    opts = [dlrt.DLRTOptimizer(m, integrator=integrator, optimizer="sgd", lr=0.1, tau=0.05) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for _ in range(3):
        mse_closure(plain, opts[0], x, y)()
        opts[0].step()
        opts[1].zero_grad()
        scaler.scale(((scaled(x) - y) ** 2).mean()).backward()
        scaler.step(opts[1])
        scaler.update()
    assert plain.ranks == scaled.ranks
    torch.testing.assert_close(scaled.weight, plain.weight, rtol=1e-5, atol=1e-6)


def test_adam_on_a_rotating_core_converges_like_dense_adam():
    """Every truncation rotates the core in four modes. Adam's second moments moved through their square roots
    ((√v ×ᵢ Pᵢᵀ)²) cancel where the first moments do not, and the steps blew up (loss 2.3 → 25 at lr 0.05, where
    dense Adam reaches 1e-13); moved by the squared rotations they keep |m|/√v bounded and Adam converges."""
    torch.manual_seed(0)
    teacher = nn.Conv2d(4, 6, 3, padding=1, dtype=DT)
    with torch.no_grad():
        bases = [ref_orth(torch.randn(n, 2, dtype=DT)) for n in (6, 4, 3, 3)]
        teacher.weight.copy_(linalg.multi_mode_product(torch.randn(2, 2, 2, 2, dtype=DT), bases))
    x = torch.randn(16, 4, 8, 8, dtype=DT)
    y = teacher(x).detach()
    start = nn.Conv2d(4, 6, 3, padding=1, dtype=DT)
    dense = copy.deepcopy(start)
    layer = TuckerConv2d.from_conv(start, ranks=(6, 4, 3, 3))
    opts = [torch.optim.Adam(dense.parameters(), lr=0.05)]
    opts.append(dlrt.DLRTOptimizer(layer, integrator="bug", optimizer="adam", lr=0.05, tau=0.0))
    losses = []
    for model, opt in zip((dense, layer), opts):
        for _ in range(300):
            loss = mse_closure(model, opt, x, y)()
            opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] < 1e-10
    assert losses[1] < 1e-10, losses
