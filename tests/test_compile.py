"""torch.compile of low-rank models: inference in one graph; training steps equal to eager ones through rank changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dlrt


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _conv_net(conv: str) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 24),
        nn.Tanh(),
        nn.Linear(24, 5),
    )
    return dlrt.convert(net, rank=3, conv=conv, exclude=())


@pytest.mark.parametrize("conv", ["matrix", "tucker"])
def test_inference_compiles_to_one_graph(conv):
    """fullgraph=True fails on any graph break: the low-rank forward (no_grad) traces whole."""
    model = _conv_net(conv).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for batch in (4, 9):  # a second batch size: recompiled or dynamic, still equal
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def _train(model, integrator, compiled, steps=8):
    torch.manual_seed(1)
    opt = dlrt.DLRTOptimizer(model, integrator, "sgd", lr=0.5, tau=0.08)
    forward = torch.compile(model) if compiled else model
    x, y = torch.randn(48, 16, dtype=torch.float64), torch.randint(0, 4, (48,))
    losses, ranks = [], []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
        ranks.append([layer.rank for _, layer in dlrt.lowrank_layers(model)])
    return losses, ranks, model


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_training_under_compile_equals_eager(integrator):
    """Each step's loss, the ranks (which change) and the final factors equal eager training's (float64).

    The layers' custom backward records (x, dy) for the integrator's projected
    gradients, a side effect torch.compile cannot trace: the graph breaks at each
    low-rank linear layer (docs/export.md), and the rest compiles.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    base = dlrt.convert(net.double(), rank=3)
    eager_losses, eager_ranks, eager = _train(copy.deepcopy(base), integrator, compiled=False)
    comp_losses, comp_ranks, comp = _train(copy.deepcopy(base), integrator, compiled=True)
    assert eager_ranks == comp_ranks
    assert len({tuple(r) for r in eager_ranks}) > 1, "the ranks must change for the test to cover recompiles"
    assert comp_losses == pytest.approx(eager_losses, rel=1e-10, abs=1e-12)
    assert eager_losses[-1] < eager_losses[0]
    for (_, a), (_, b) in zip(dlrt.lowrank_layers(eager), dlrt.lowrank_layers(comp)):
        torch.testing.assert_close(a.matrix(), b.matrix(), atol=1e-10, rtol=1e-10)


@pytest.mark.slow
def test_exported_model_compiles_with_autotuned_kernels_and_frozen_weights():
    """The recipe of docs/export.md for small-batch CPU serving: max-autotune with Inductor's freezing.

    Freezing folds the exported factors into the graph as constants; the outputs must stay
    the plain model's, and a second batch size (dynamic batch) must too.
    """
    from dlrt.exporting import plain_and_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    plain, layers = plain_and_layers(dlrt.convert(net, rank=4, exclude=()).eval(), rule="factored")
    assert {info["form"] for info in layers.values()} == {"factored"}
    compiled = torch.compile(plain, mode="max-autotune-no-cudagraphs")
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        for batch in (1, 7):
            x = torch.randn(batch, 40)
            torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)
