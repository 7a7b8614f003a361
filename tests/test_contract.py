"""The integrator ↔ optimizer contract: one end-of-cycle rule, per-layer cycle state, coefficient_steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankLinear
from dlrt.integrators import BUG, ParallelBUG
from dlrt.layers import LowRankLayer
from dlrt.peft import GeoLoRAConfig, get_geolora_model

from .helpers import mse_closure

DT = torch.float64


class Two(nn.Module):
    """Two adaptable layers; ``only_a`` leaves ``b`` out of the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 20)

    def forward(self, x: torch.Tensor, only_a: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return h if only_a else self.b(h)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 16, generator=g, dtype=DT), torch.randn(32, 20, generator=g, dtype=DT)


def adapted(targets=("a", "b"), trained=("a",), **cfg):
    """A float64 model with adapters on ``targets``; those in ``trained`` hold a non-zero core (no growth pending)."""
    torch.manual_seed(0)
    base = Two().double()
    cfg = {"r": 6, "tau": 0.1, "truncation": "local", "coefficient_steps": 1, "target_modules": list(targets), **cfg}
    model = get_geolora_model(base, GeoLoRAConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    for name in trained:
        lora = model.adapters()[name].lora
        with torch.no_grad():
            lora.S.copy_(torch.randn(lora.S.shape, generator=g, dtype=DT) / 4)
        lora.pending_growth = False
    return model


def step(model, opt, only_a: bool = False) -> None:
    x, y = data()
    opt.zero_grad()
    out = model(x, only_a=only_a)
    ((out if only_a else out - y) ** 2).mean().backward()
    opt.step()


def factors(model) -> dict[str, tuple[torch.Tensor, ...]]:
    return {n: tuple(t.detach().clone() for t in (a.lora.U, a.lora.S, a.lora.V)) for n, a in model.adapters().items()}


def test_finish_cycle_right_after_growth_keeps_the_grown_rank():
    model = adapted(trained=(), coefficient_steps=3)
    x, _ = data()
    before = model(x).detach()
    opt = model.make_optimizer(lr=1e-2)
    step(model, opt)
    assert opt.phase == 1 and model.ranks() == {"a": 6, "b": 6}
    opt.finish_cycle()
    assert opt.phase == 0
    assert model.ranks() == {"a": 6, "b": 6}  # was cut to min_rank = 1: the cores are still zero
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    step(model, opt)  # the next cycle starts with an augmentation of the grown bases
    assert all(a.lora.S.detach().any() for a in model.adapters().values())


def test_mixed_step_truncates_the_augmented_layer_and_keeps_the_grown_one():
    """One step, one cycle: ``a`` is augmented and truncated exactly as when it is alone; ``b`` grows, rank 6."""
    model = adapted()
    alone = adapted(targets=("a",))
    with torch.no_grad():  # the same trained adapter on a; b's fresh adapter adds 0 to the output
        for p, q in zip(alone.adapters()["a"].lora.parameters(), model.adapters()["a"].lora.parameters()):
            p.copy_(q)
    opt, opt_alone = model.make_optimizer(lr=0.05), alone.make_optimizer(lr=0.05)
    step(model, opt)
    step(alone, opt_alone)
    a, b = model.adapters()["a"].lora, model.adapters()["b"].lora
    ref = alone.adapters()["a"].lora
    assert ref.rank < 12 and a.S.shape == ref.S.shape  # truncated (12 = the augmented rank)
    torch.testing.assert_close(a.matrix(), ref.matrix(), rtol=0, atol=1e-12)
    assert b.rank == 6 and not b.S.detach().any() and not b.pending_growth


@pytest.mark.parametrize("integrator", ["parallel", "bug"])
@pytest.mark.parametrize("truncation", [{"truncation": "local"}, {"truncation": "global", "budget": 9}])
def test_step_and_finish_cycle_end_a_cycle_by_the_same_rule(integrator, truncation):
    """A one-step cycle ends inside ``step``; a longer one cut after its first step ends in ``finish_cycle``
    (as the finetune loop does): the first step is the same, so both must give the same layers."""
    one = adapted(integrator=integrator, **truncation)
    cut = adapted(integrator=integrator, coefficient_steps=4, **truncation)
    opt_one, opt_cut = one.make_optimizer(lr=0.05), cut.make_optimizer(lr=0.05)
    closure_one = _closure(one, opt_one)
    closure_cut = _closure(cut, opt_cut)
    opt_one.step(closure_one)
    opt_cut.step(closure_cut)
    assert opt_cut.phase == 1
    opt_cut.finish_cycle()
    assert opt_one.phase == opt_cut.phase == 0
    assert one.ranks() == cut.ranks()
    for (U1, S1, V1), (U2, S2, V2) in zip(factors(one).values(), factors(cut).values()):
        torch.testing.assert_close(U1 @ S1 @ V1.T, U2 @ S2 @ V2.T, rtol=0, atol=1e-12)


def _closure(model, opt):
    return mse_closure(model, opt, *data())


def test_grown_layers_count_against_the_budget():
    model = adapted(truncation="global", budget=8, tau=0.0)
    opt = model.make_optimizer(lr=0.05)
    step(model, opt)
    ranks = model.ranks()
    assert ranks["b"] == 6  # grown: holds its rank
    assert ranks["a"] == 2  # tau = 0 keeps every value the budget allows: 8 − 6
    # When the ranks held leave less than the truncated layers' min_rank, they keep min_rank.
    tight = adapted(truncation="global", budget=5, tau=0.0)
    opt = tight.make_optimizer(lr=0.05)
    step(tight, opt)
    assert tight.ranks() == {"a": 1, "b": 6}


def test_a_fresh_adapter_the_loss_does_not_reach_is_left_alone():
    model = adapted(trained=("a",))
    b = model.adapters()["b"].lora
    U, V = b.U.detach().clone(), b.V.detach().clone()
    opt = model.make_optimizer(lr=0.05)
    step(model, opt, only_a=True)
    assert b.pending_growth and b.rank == 6  # was augmented by nothing and truncated to rank 1
    assert torch.equal(b.U, U) and torch.equal(b.V, V) and not b.S.detach().any()
    step(model, opt)  # reached now: grows from the gradient
    assert not b.pending_growth and b.rank == 6 and not torch.equal(b.U, U)


def test_a_failed_step_restores_the_cycle_flags(monkeypatch):
    """The step rollback covers the per-layer cycle state: a step that fails after some S-steps changes nothing."""
    model = adapted(trained=(), coefficient_steps=3)
    opt = model.make_optimizer(lr=1e-2)
    step(model, opt)  # both grown, phase 1
    set_core = LowRankLayer.set_core
    calls = []

    def failing(self, S):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second S-step")
        return set_core(self, S)  # the first layer's core and flags change

    monkeypatch.setattr(LowRankLayer, "set_core", failing)
    with pytest.raises(RuntimeError, match="injected"):
        step(model, opt)
    monkeypatch.undo()
    assert opt.phase == 1
    opt.finish_cycle()
    assert model.ranks() == {"a": 6, "b": 6}


def test_coefficient_steps_beside_an_integrator_instance_must_agree():
    layer = LowRankLinear(9, 12, rank=3, bias=False, dtype=DT)
    with pytest.raises(ValueError, match=r"coefficient_steps=5 disagrees.*BUG\(coefficient_steps=1\)"):
        dlrt.DLRTOptimizer(layer, integrator=BUG(), coefficient_steps=5)
    opt = dlrt.DLRTOptimizer(layer, integrator=ParallelBUG(coefficient_steps=4), coefficient_steps=4)
    assert opt.integrator.coefficient_steps == 4
    named = dlrt.DLRTOptimizer(copy.deepcopy(layer), integrator="bug", coefficient_steps=3)
    assert named.integrator.coefficient_steps == 3


def test_bug_restarts_a_reset_adapter_of_another_rank():
    """BUG moves a fresh adapter by its K/L step; the optimizer state of the old, larger factors is dropped."""
    model = adapted(trained=(), integrator="bug")
    opt = model.make_optimizer(optimizer="adam", lr=1e-2)
    closure = _closure(model, opt)
    for _ in range(2):
        opt.step(closure)
    adapter = model.adapters()["b"]
    adapter.reset_adapter(2)
    assert adapter.lora.pending_growth
    opt.step(closure)  # crashed: Adam moments of the old rank
    assert not adapter.lora.pending_growth and adapter.lora.S.detach().any()
    with pytest.raises(ValueError, match=r"r=0 is out of range.*max_rank=20"):
        adapter.reset_adapter(0)


def test_the_cycle_flags_survive_a_checkpoint(tmp_path):
    """Saved right after growth, loaded into a fresh model: the grown layers keep their rank at the cycle's end."""
    model = adapted(trained=(), coefficient_steps=3)
    opt = model.make_optimizer(lr=1e-2)
    step(model, opt)  # both grown, phase 1
    dlrt.save(tmp_path / "ckpt.safetensors", model, opt)
    fresh = adapted(trained=(), coefficient_steps=3)
    fresh_opt = fresh.make_optimizer(lr=1e-2)
    fresh.adapters()["a"].lora.pending_growth = fresh.adapters()["b"].lora.pending_growth = False
    dlrt.load(tmp_path / "ckpt.safetensors", fresh, fresh_opt)
    assert all(a.lora.just_grown and not a.lora.pending_growth for a in fresh.adapters().values())
    fresh_opt.finish_cycle()
    assert fresh.ranks() == {"a": 6, "b": 6}  # without the flags in the file: cut to min_rank (1)
