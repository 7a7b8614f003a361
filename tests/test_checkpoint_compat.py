"""Checkpoints written before ``DLRTOptimizer`` became a package still load, and the next step is the same.

``fixtures/checkpoint_v1.json`` holds, for each case, the tensors and the JSON header
that :func:`dlrt.save` wrote at commit 973790f (``src/dlrt/optimizer.py`` still one
file), and the model after loading that file into a fresh model and optimizer and
taking one more step there. The test writes the same safetensors file from these
literals, loads it with today's code and steps once.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import dlrt

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "checkpoint_v1.json").read_text())
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _tensor(entry):
    return torch.tensor(entry["data"], dtype=getattr(torch, entry["dtype"])).reshape(entry["shape"])


def _build(case, seed):
    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(seed)
    model = nn.Sequential(dlrt.LowRankLinear(4, 3, rank=2, max_rank=3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    opt = dlrt.DLRTOptimizer(
        model,
        case["integrator"],
        case["optimizer"],
        lr=case["lr"],
        tau=0.1,
        tau_mode="relative",
        coefficient_steps=case["coefficient_steps"],
    )
    return model, opt


def _step(model, opt, dtype, k):
    x = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).reshape(6, 4).to(dtype) * (1 + 0.5 * k)
    y = torch.tensor([0, 1, 1, 0, 1, 0])

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return float(opt.step(closure).detach())


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_a_checkpoint_of_the_one_file_optimizer_loads_and_steps(tmp_path, name):
    from safetensors.torch import save_file

    saved = FIXTURE["cases"][name]
    case, after = saved["build"], saved["after_step"]
    path = tmp_path / "checkpoint.safetensors"
    tensors = {key: _tensor(entry) for key, entry in saved["tensors"].items()}
    save_file(tensors, str(path), metadata={"dlrt": json.dumps(saved["header"])})

    model, opt = _build(case, seed=1)  # another initialisation: the checkpoint must replace all of it
    extra = dlrt.load(path, model, opt)
    assert extra == {"note": "written before the optimizer split"}
    meta = saved["header"]["optimizer"]["dlrt"]
    assert (opt.phase, opt.steps) == (meta["phase"], meta["steps"])
    assert [list(m.core.shape) for _, m in dlrt.lowrank_layers(model)] == list(meta["layers"].values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[f"model/{key}"]), key

    loss = _step(model, opt, getattr(torch, case["dtype"]), case["steps"])
    tol = TOLERANCE[case["dtype"]]
    assert loss == pytest.approx(after["loss"], rel=tol, abs=tol)
    assert (opt.phase, opt.steps) == (after["phase"], after["steps"])
    assert dlrt.ranks(model) == after["ranks"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, _tensor(after["model"][key]), rtol=tol, atol=tol, msg=key)
