"""Robustness: the condition-number regularizer, robust training, FGSM/PGD and ``dlrt robustness``."""

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import cli
from dlrt.robust import condition_numbers, condition_regularizer, core_matrix, fgsm, pgd, regularizer
from dlrt.training import TrainConfig, read_metrics, robustness, train
from dlrt.training.loop import _robust_forward
from dlrt.training.robustness import check_request

from .test_training import small

torchattacks = pytest.importorskip("torchattacks")
pytest.importorskip("yaml")

DT = torch.float64
MEAN, STD = (0.1307,), (0.3081,)  # MNIST's


# ------------------------------------------------------------------------------------------- helpers
def reference_regularizer(S):
    """``‖S Sᵀ − (‖S‖²_F / r) I‖_F`` written out independently (entry sums, no matrix_norm)."""
    r = S.shape[0]
    c = (S * S).sum() / r
    return ((S @ S.T - c * torch.eye(r, dtype=S.dtype)) ** 2).sum().sqrt()


def scaled_orthogonal(n, m, c):
    """``c`` times an ``n×m`` matrix with orthonormal rows (``n <= m``), from a QR factorisation."""
    q, _ = torch.linalg.qr(torch.randn(m, n, dtype=DT))
    return c * q.T.contiguous()


def quadrant_labels(x):
    """Which 4×4 quadrant of an 8×8 image is brightest: a task the small conv net learns."""
    q = torch.stack([x[:, 0, i : i + 4, j : j + 4].mean((1, 2)) for i in (0, 4) for j in (0, 4)], 1)
    return q.argmax(1)


@pytest.fixture(scope="module")
def attacked():
    """A fixed, briefly trained Conv2d+ReLU+Flatten+Linear on 1×8×8 pixels, and a batch of 16 it is attacked on."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    X = torch.rand(512, 1, 8, 8, generator=g)
    Y = quadrant_labels(X)
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    x = torch.rand(16, 1, 8, 8, generator=g)
    return model, x, quadrant_labels(x)


def acc_loss(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


# ------------------------------------------------------------------------------------------- 1. regularizer
def test_regularizer_is_zero_exactly_for_scaled_orthogonal_matrices():
    for S in (scaled_orthogonal(5, 5, 2.7), scaled_orthogonal(3, 7, 0.4), 3.0 * torch.eye(4, dtype=DT)):
        assert float(regularizer(S)) < 1e-12
    assert float(regularizer(torch.zeros(3, 3, dtype=DT))) == 0.0


def test_regularizer_is_positive_otherwise_and_matches_the_formula():
    D = torch.diag(torch.tensor([1.0, 2.0], dtype=DT))
    # S Sᵀ = diag(1, 4), ‖S‖² / r = 5/2: ‖diag(-3/2, 3/2)‖_F = 3/√2
    assert float(regularizer(D)) == pytest.approx(3 / math.sqrt(2), rel=1e-14)
    for shape in ((4, 4), (3, 8), (2, 5)):
        S = torch.randn(*shape, dtype=DT)
        value = float(regularizer(S))
        assert value > 0.1
        assert value == pytest.approx(float(reference_regularizer(S)), rel=1e-12)
    # r = number of rows: for a wide S the S Sᵀ form differs from the Sᵀ S form
    S = torch.randn(2, 5, dtype=DT)
    other = float(reference_regularizer(S.T))
    assert abs(float(regularizer(S)) - other) > 1e-3


def test_regularizer_gradient_matches_finite_differences():
    for shape in ((4, 4), (3, 6)):
        S = torch.randn(*shape, dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(regularizer, (S,), eps=1e-6, atol=1e-7)
        # and the closed form 2 (S Sᵀ − c I) S / ℛ (the trace term drops out)
        (g,) = torch.autograd.grad(regularizer(S), S)
        with torch.no_grad():
            A = S @ S.T - (S * S).sum() / shape[0] * torch.eye(shape[0], dtype=DT)
            expected = 2 * A @ S / torch.linalg.matrix_norm(A)
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_regularizer_gradient_at_a_scaled_orthogonal_matrix_is_zero_not_nan():
    # Hadamard-type matrices are orthogonal up to a scale exactly in floating point: S Sᵀ − c I == 0.
    square = 1.5 * torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DT)
    wide = 0.5 * torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]], dtype=DT)
    for S0 in (square, wide, torch.zeros(2, 2, dtype=DT)):
        S = S0.clone().requires_grad_(True)
        value = regularizer(S)
        assert float(value.detach()) == 0.0
        (g,) = torch.autograd.grad(value, S)
        assert torch.equal(g, torch.zeros_like(S))
        # The textbook formula differentiated by autograd is 0/0 there: the safe gradient matters.
        S = S0.clone().requires_grad_(True)
        (g_naive,) = torch.autograd.grad(reference_regularizer(S), S)
        assert torch.isnan(g_naive).all()


def test_regularizer_refuses_a_tensor_that_is_not_a_matrix():
    with pytest.raises(ValueError, match="matrix"):
        regularizer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="matrix"):
        regularizer(torch.randn(3))


# ------------------------------------------------------------------------------------------- 2. model-level
def lowrank_model():
    return nn.Sequential(
        dlrt.TuckerConv2d(2, 6, 3, ranks=(3, 2, 2, 2), dtype=DT),
        nn.ReLU(),
        nn.Flatten(),
        dlrt.LowRankLinear(6 * 4 * 4, 5, 3, dtype=DT),
    )


def test_condition_regularizer_sums_every_lowrank_layer():
    model = lowrank_model()
    tucker, linear = model[0], model[3]
    with torch.no_grad():  # cores far from scaled orthogonal
        tucker.C.copy_(torch.randn_like(tucker.C))
        linear.S.copy_(torch.randn_like(linear.S))
    unfolding = tucker.C.reshape(tucker.C.shape[0], -1)  # mode 0 first: the mode-0 unfolding
    assert torch.equal(core_matrix(tucker), unfolding) and core_matrix(tucker).shape == (3, 8)
    assert core_matrix(linear) is linear.S
    total = condition_regularizer(model)
    value = float(total.detach())
    parts = [float(reference_regularizer(unfolding.detach())), float(reference_regularizer(linear.S.detach()))]
    assert min(parts) > 0.1
    assert value == pytest.approx(sum(parts), rel=1e-12)
    assert value == pytest.approx(float((regularizer(unfolding) + regularizer(linear.S)).detach()), rel=1e-14)
    total.backward()
    assert tucker.C.grad.abs().sum() > 0 and linear.S.grad.abs().sum() > 0


def test_condition_regularizer_without_lowrank_layers_is_an_error():
    with pytest.raises(ValueError, match="no low-rank layers"):
        condition_regularizer(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))


def test_condition_numbers_are_the_cores_singular_value_ratios():
    model = lowrank_model()
    with torch.no_grad():
        model[0].C.copy_(torch.randn_like(model[0].C))
        model[3].S.copy_(torch.randn_like(model[3].S))
    cond = condition_numbers(model)
    assert set(cond) == {"0", "3"}
    for name, core in (("0", model[0].C.detach().reshape(3, -1)), ("3", model[3].S.detach())):
        sigma = torch.linalg.svdvals(core)
        assert cond[name] == pytest.approx(float(sigma.max() / sigma.min()), rel=1e-10)
        assert cond[name] > 1.01
    with torch.no_grad():
        model[3].S.copy_(torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=DT)))
        model[0].C.copy_(2.0 * torch.eye(3, 8, dtype=DT).reshape(3, 2, 2, 2))
    cond = condition_numbers(model)
    assert cond["3"] == pytest.approx(8.0, rel=1e-12) and cond["0"] == pytest.approx(1.0, rel=1e-12)
    with torch.no_grad():
        model[3].S.copy_(torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=DT)))
    assert condition_numbers(model)["3"] == math.inf


# ------------------------------------------------------------------------------------------- 3. robust training
def test_robust_forward_adds_beta_times_the_regularizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), dlrt.LowRankLinear(16, 8, 4), nn.ReLU(), dlrt.LowRankLinear(8, 3, 2))
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        model[1].S.copy_(torch.randn(4, 4))
        logits, target, loss = _robust_forward(0.7, model, (x, y))
        assert torch.equal(target, y) and torch.equal(logits, model(x))
        expected = F.cross_entropy(model(x), y) + 0.7 * condition_regularizer(model)
        assert float(condition_regularizer(model)) > 0.1
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_robust_beta_lowers_the_condition_numbers(data_root, tmp_path):
    plain = train(small(data_root, tmp_path, name="plain", optimizer="sgd", plots=False))
    robust = train(small(data_root, tmp_path, name="robust", optimizer="sgd", robust_beta=1.0))
    assert plain.status == robust.status == "completed"
    a, b = read_metrics(plain.run_dir)[-1], read_metrics(robust.run_dir)[-1]
    for row in (a, b):
        assert set(row["cond"]) == {"conv1", "conv2", "fc1"}
        assert all(c >= 1.0 for c in row["cond"].values())
        assert row["cond_mean"] == pytest.approx(sum(row["cond"].values()) / 3, rel=1e-9)
    # seed 0: about 1.35 without, 1.09 with the regularizer; other seeds give 1.24-1.35 against 1.03-1.09
    assert b["cond_mean"] - 1 < 0.5 * (a["cond_mean"] - 1)
    header = (robust.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "cond_mean" in header and "cond" in header
    assert (robust.run_dir / "cond.png").stat().st_size > 0


def test_robust_beta_config_errors(tmp_path):
    with pytest.raises(ValueError, match="robust_beta must be >= 0"):
        TrainConfig(robust_beta=-1, runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="robust_beta.*dense"):
        TrainConfig(robust_beta=0.1, dense=True, runs_dir=str(tmp_path))
    assert TrainConfig(robust_beta=0.0, dense=True, runs_dir=str(tmp_path)).robust_beta == 0.0


# ------------------------------------------------------------------------------------------- 4. attacks
def test_zero_budget_returns_the_input(attacked):
    model, x, y = attacked
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert torch.equal(pgd(model, x, y, 0.0, seed=1), x)
    assert torch.equal(pgd(model, x, y, 0.0, norm="l2", seed=1), x)
    assert torch.equal(fgsm(model, x, y, 0.0, mean=MEAN, std=STD), x)


@pytest.mark.parametrize("eps", [0.03, 0.2])
def test_perturbations_stay_in_the_budget_and_in_pixel_range(attacked, eps):
    model, x, y = attacked
    for adv in (fgsm(model, x, y, eps), pgd(model, x, y, eps, seed=0), pgd(model, x, y, eps, random_start=False)):
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float((adv - x).abs().max()) >= eps - 1e-6  # the budget is used, not ignored
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    l2 = 5 * eps
    for start in (True, False):
        adv = pgd(model, x, y, l2, norm="l2", random_start=start, seed=0)
        norms = (adv - x).reshape(16, -1).norm(dim=1)
        assert float(norms.max()) <= l2 + 1e-6
        assert float(norms.max()) > 0.5 * l2
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_pgd_is_at_least_as_strong_as_fgsm(attacked):
    model, x, y = attacked
    eps = 0.05
    clean = acc_loss(model, x, y)
    acc_f, loss_f = acc_loss(model, fgsm(model, x, y, eps), y)
    acc_p, loss_p = acc_loss(model, pgd(model, x, y, eps, steps=10, seed=0), y)
    assert clean[0] >= 0.75 and 0.1 <= acc_f < clean[0]  # FGSM hurts but does not already reach 0 %
    assert acc_p <= acc_f
    assert loss_f > clean[1] + 1.0
    assert loss_p > loss_f


def test_pgd_is_deterministic_for_a_seed(attacked):
    model, x, y = attacked
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        a = pgd(model, x, y, eps, norm=norm, seed=3)
        torch.manual_seed(123)  # the global RNG plays no part with a seed
        b = pgd(model, x, y, eps, norm=norm, seed=3)
        c = pgd(model, x, y, eps, norm=norm, seed=4)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_attacks_restore_training_flags_and_create_no_grads(attacked):
    model = copy.deepcopy(attacked[0])
    model.append(nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a submodule deliberately left in eval mode
    flags = [m.training for m in model.modules()]
    assert flags == [True, True, False, True, True, True]
    x, y = attacked[1], attacked[2]
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append([mm.training for mm in model.modules()]))
    for attack in (lambda: fgsm(model, x, y, 0.05), lambda: pgd(model, x, y, 0.05, steps=2, seed=0)):
        adv = attack()
        assert [m.training for m in model.modules()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert not adv.requires_grad
    assert seen and all(not any(state) for state in seen)  # the attack itself ran everything in eval mode
    # dropout was off during the attack: the result is deterministic whatever the RNG
    torch.manual_seed(1)
    a = fgsm(model, x, y, 0.05)
    torch.manual_seed(2)
    assert torch.equal(a, fgsm(model, x, y, 0.05))


def test_attacks_leave_a_dlrt_optimizers_recordings_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), dlrt.LowRankLinear(64, 16, 4), nn.ReLU(), nn.Linear(16, 4))
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.1)
    layer = model[1]
    request = layer.grad_request
    assert request is not None and {"K", "L", "X"} <= set(request)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert layer.grad_K is not None and layer.grad_L is not None and len(layer.pass_inputs) == 1
    grad_K, grad_L = layer.grad_K.clone(), layer.grad_L.clone()
    passes = list(layer.pass_inputs)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    fgsm(model, x, y, 0.1)
    pgd(model, x, y, 0.1, steps=3, seed=0)
    assert layer.grad_request is request
    assert torch.equal(layer.grad_K, grad_K) and torch.equal(layer.grad_L, grad_L)
    assert len(layer.pass_inputs) == 1 and layer.pass_inputs[0] is passes[0]
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n


def test_attack_argument_errors(attacked):
    model, x, y = attacked
    with pytest.raises(ValueError, match="pixel values"):
        fgsm(model, (x - 0.1307) / 0.3081, y, 0.1)
    with pytest.raises(ValueError, match="pixel values"):
        pgd(model, (x - 0.1307) / 0.3081, y, 0.1, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="both mean= and std="):
        fgsm(model, x, y, 0.1, mean=MEAN)
    with pytest.raises(ValueError, match="both mean= and std="):
        pgd(model, x, y, 0.1, std=STD)
    for bad in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            fgsm(model, x, y, bad)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            pgd(model, x, y, bad)
    with pytest.raises(ValueError, match="norm must be 'linf' or 'l2'"):
        pgd(model, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="std must be positive"):
        fgsm(model, x, y, 0.1, mean=MEAN, std=(0.0,))


def test_normalisation_inside_the_attack_equals_a_normalising_model(attacked):
    model, x, y = attacked
    wrapped = nn.Sequential(Normalize(MEAN, STD), model)
    a = fgsm(model, x, y, 0.05, mean=MEAN, std=STD)
    b = fgsm(wrapped, x, y, 0.05)
    assert torch.equal(a, b)
    assert not torch.equal(a, fgsm(model, x, y, 0.05))  # the normalisation changes the attack
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        a = pgd(model, x, y, eps, norm=norm, seed=2, mean=MEAN, std=STD)
        b = pgd(wrapped, x, y, eps, norm=norm, seed=2)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert not torch.equal(a, pgd(model, x, y, eps, norm=norm, seed=2))


# ------------------------------------------------------------------------------------------- 5. torchattacks
def test_fgsm_matches_torchattacks(attacked):
    model, x, y = attacked
    for eps in (0.03, 0.1):
        ours = fgsm(model, x, y, eps)
        theirs = torchattacks.FGSM(model, eps=eps)(x, y)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        assert float((ours - x).abs().max()) > eps / 2


def test_pgd_linf_matches_torchattacks(attacked):
    model, x, y = attacked
    eps, alpha, steps = 0.05, 0.01, 7
    ours = pgd(model, x, y, eps, steps=steps, step_size=alpha, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for s in (5, 6):
        torch.manual_seed(s)
        ours = pgd(model, x, y, eps, steps=steps, step_size=alpha, random_start=True, seed=None)
        torch.manual_seed(s)
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.manual_seed(5)
    other = pgd(model, x, y, eps, steps=steps, step_size=alpha, random_start=True, seed=None)
    assert not torch.equal(ours, other)  # the start does depend on the global RNG


def test_pgd_l2_matches_torchattacks(attacked):
    model, x, y = attacked
    eps, alpha, steps = 0.5, 0.1, 6
    ours = pgd(model, x, y, eps, steps=steps, step_size=alpha, norm="l2", random_start=False)
    theirs = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.manual_seed(7)
    ours = pgd(model, x, y, eps, steps=steps, step_size=alpha, norm="l2", random_start=True, seed=None)
    torch.manual_seed(7)
    theirs = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_normalised_attacks_match_torchattacks(attacked):
    model, x, y = attacked
    m, s = MEAN[0], STD[0]
    x_norm = (x - m) / s  # torchattacks with set_normalization_used takes and returns normalised images

    def theirs(attack):
        attack.set_normalization_used(mean=list(MEAN), std=list(STD))
        return attack(x_norm, y) * s + m

    torch.testing.assert_close(fgsm(model, x, y, 0.05, mean=MEAN, std=STD), theirs(torchattacks.FGSM(model, 0.05)))
    ours = pgd(model, x, y, 0.05, steps=5, step_size=0.02, random_start=False, mean=MEAN, std=STD)
    ref = theirs(torchattacks.PGD(model, eps=0.05, alpha=0.02, steps=5, random_start=False))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.manual_seed(9)
    ours = pgd(model, x, y, 0.5, steps=5, step_size=0.1, norm="l2", seed=None, mean=MEAN, std=STD)
    torch.manual_seed(9)
    ref = theirs(torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=5, random_start=True))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- 6. CLI
def test_check_request_validates_before_loading():
    assert check_request("pgd", [0, 0.1], None, 10) == [0.0, 0.1]
    with pytest.raises(ValueError, match="attack must be one of fgsm, pgd"):
        check_request("cw", [0.1], None, 10)
    with pytest.raises(ValueError, match="at least one"):
        check_request("fgsm", [], None, 10)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        check_request("fgsm", [0.1, -0.1], None, 10)
    with pytest.raises(ValueError, match="limit"):
        check_request("fgsm", [0.1], 0, 10)
    with pytest.raises(ValueError, match="steps"):
        check_request("pgd", [0.1], None, 0)


def test_robustness_cli(data_root, tmp_path, capsys, monkeypatch):
    calls = []

    def spy(attack):
        def wrapped(model, x, y, eps, *args, **kw):
            calls.append((attack.__name__, float(x.min()), float(x.max()), eps, kw))
            return attack(model, x, y, eps, *args, **kw)

        return wrapped

    monkeypatch.setattr(robustness, "fgsm", spy(fgsm))
    monkeypatch.setattr(robustness, "pgd", spy(pgd))
    runs = tmp_path / "runs"
    args = [f"data_root={data_root}", f"runs_dir={runs}", "epochs=1", "batch_size=32", "progress=false"]
    assert cli.main(["train", *args, "name=r", "rank=8", "tensorboard=false"]) == 0
    run = runs / "r"
    capsys.readouterr()

    assert cli.main(["robustness", str(run), "--attack", "fgsm", "--eps", "-0.1", "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert "eps must be a finite number >= 0" in err and "-0.1" in err
    assert not (run / "robustness.json").exists() and not (run / "robustness.csv").exists()

    assert cli.main(["robustness", str(run), "--attack", "fgsm", "--eps", "0", "0.1", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "fgsm on 20 test images" in out and "ε=0.1" in out
    # pixels in, the dataset's normalisation handed to the attack (ε in pixel units)
    assert [c[3] for c in calls] == [0.0, 0.1]
    for name, lo, hi, _, kw in calls:
        assert name == "fgsm" and 0 <= lo and hi <= 1 and hi > 0.9
        assert kw["mean"] == pytest.approx(MEAN) and kw["std"] == pytest.approx(STD)
    calls.clear()
    for name in ("robustness.json", "robustness.csv", "robustness.png"):
        assert (run / name).stat().st_size > 0, name
    entry = json.loads((run / "robustness.json").read_text())["fgsm"]
    assert entry["eps"] == [0.0, 0.1] and entry["n"] == 20
    assert entry["adv_acc"][0] == entry["clean_acc"]
    assert entry["adv_acc"][1] <= entry["clean_acc"]
    assert entry["cond_mean"] >= 1.0 and 0 < entry["compression"] < 1
    csv = (run / "robustness.csv").read_text().splitlines()
    assert csv[0] == "attack,eps,clean_acc,adv_acc,n" and len(csv) == 3

    assert cli.main(["robustness", str(run), "--attack", "pgd", "--eps", "0.05", "--limit", "20", "--steps", "2"]) == 0
    results = json.loads((run / "robustness.json").read_text())
    assert set(results) == {"fgsm", "pgd"} and results["fgsm"] == entry
    assert results["pgd"]["steps"] == 2 and results["pgd"]["clean_acc"] == entry["clean_acc"]
    assert [(c[0], c[3], c[4]["steps"], c[4]["mean"]) for c in calls] == [("pgd", 0.05, 2, pytest.approx(MEAN))]
    assert len((run / "robustness.csv").read_text().splitlines()) == 4
    capsys.readouterr()

    assert cli.main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "adversarial accuracy (fgsm, 20 images)" in out and "adversarial accuracy (pgd, 20 images)" in out

    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "checkpoint.safetensors").unlink()
    (bare / "robustness.json").unlink()
    assert cli.main(["robustness", str(bare), "--attack", "fgsm", "--eps", "0.1"]) == 2
    assert "checkpoint.safetensors" in capsys.readouterr().err
    assert not (bare / "robustness.json").exists()


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_the_regularizer_reaches_a_tucker_cores_step(integrator):
    """The Tucker core step takes its old block from C.grad, so a loss on the core alone moves it: here the loss is
    ℛ of the core's mode-0 unfolding only (the data term is multiplied by 0), and five steps must lower cond."""
    torch.manual_seed(0)
    layer = dlrt.TuckerConv2d(3, 6, 3, (4, 3, 2, 2), padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.C.mul_(torch.linspace(0.2, 3.0, 4, dtype=torch.float64).view(-1, 1, 1, 1))  # spread the spectrum
    opt = dlrt.DLRTOptimizer(layer, integrator=integrator, optimizer="sgd", lr=0.05, tau=0.0, tau_mode="relative")
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = 0 * layer(x).sum() + dlrt.robust.condition_regularizer(layer)
        loss.backward()
        return loss

    before = dlrt.robust.condition_numbers(torch.nn.Sequential(layer))["0"]
    for _ in range(5):
        opt.step(closure)
    after = dlrt.robust.condition_numbers(torch.nn.Sequential(layer))["0"]
    assert after < 0.7 * before, (before, after)
