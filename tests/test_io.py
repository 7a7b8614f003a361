"""Checkpoints: bit-identical resume after rank changes, clear errors, atomic writes."""

import json

import pytest
import torch
from torch import nn

import dlrt


def build(rank=5):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    return dlrt.convert(model, rank=rank, exclude=("5",))


def batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)


def closure_for(model, opt, i):
    x, y = batch(i)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "integrator, optimizer, cs",
    [("bug", "sgd", 1), ("parallel", "adam", 1), ("bug", "adamw", 3), ("fixed", "sgd", 1)],
)
def test_save_load_then_one_step_is_bit_identical(tmp_path, integrator, optimizer, cs):
    kw = dict(integrator=integrator, optimizer=optimizer, lr=0.05, tau=0.3, coefficient_steps=cs)
    if optimizer == "sgd":
        kw["momentum"] = 0.9
    model = build()
    opt = dlrt.DLRTOptimizer(model, **kw)
    start = dlrt.ranks(model)
    for i in range(7):  # with cs=3 this stops mid-phase, on the augmented basis
        opt.step(closure_for(model, opt, i))
    if integrator != "fixed":
        assert dlrt.ranks(model) != start
    path = dlrt.save(tmp_path / "ckpt.safetensors", model, opt, extra={"epoch": 3})

    other = build(rank=2)  # different starting ranks: load must restore the shapes
    other_opt = dlrt.DLRTOptimizer(other, **kw)
    assert dlrt.load(path, other, other_opt) == {"epoch": 3}
    assert dlrt.ranks(other) == dlrt.ranks(model) and other_opt.phase == opt.phase

    for i in (7, 8):
        opt.step(closure_for(model, opt, i))
        other_opt.step(closure_for(other, other_opt, i))
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), other.parameters()):
        for key, v in opt.state[p].items():
            w = other_opt.state[q][key]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def test_load_into_a_model_without_optimizer_state(tmp_path):
    model = build()
    path = dlrt.save(tmp_path / "m.safetensors", model)
    other = build(rank=3)
    dlrt.load(path, other)
    x, _ = batch(0)
    assert torch.equal(model(x), other(x))
    with pytest.raises(ValueError, match="no optimizer state"):
        dlrt.load(path, other, dlrt.DLRTOptimizer(other))


def test_checkpoint_is_safetensors_with_json_metadata_and_no_pickle(tmp_path):
    from safetensors import safe_open

    model = build()
    path = dlrt.save(tmp_path / "m.safetensors", model)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dlrt"])
        keys = set(f.keys())
    assert meta["layers"]["0"]["type"] == "LowRankConv2d" and meta["layers"]["3"]["core"] == [5, 5]
    assert "model/3.U" in keys
    assert b"\x80\x04" not in path.read_bytes()[:16]


def test_mismatched_checkpoint_names_the_layer(tmp_path):
    model = build()
    path = dlrt.save(tmp_path / "m.safetensors", model)
    wider = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 48), nn.ReLU(), nn.Linear(48, 5)
    )
    dlrt.convert(wider, rank=4, exclude=("5",))
    with pytest.raises(ValueError, match="'3'"):
        dlrt.load(path, wider)
    dense = nn.Sequential(*build().children())
    dlrt.to_dense(dense)
    with pytest.raises(ValueError, match=r"\['0', '3'\]"):
        dlrt.load(path, dense)
    renamed = nn.Sequential()
    renamed.add_module("conv", build()[0])
    with pytest.raises(ValueError, match="low-rank layers"):
        dlrt.load(path, renamed)
    head = build()
    head[5] = nn.Linear(32, 7)
    with pytest.raises(ValueError, match=r"'5\.(weight|bias)' has shape"):
        dlrt.load(path, head)
    # Nothing was changed by the failed loads.
    assert dlrt.ranks(wider) == {"0": 4, "3": 4}


def test_optimizer_state_of_another_model_is_rejected(tmp_path):
    model = build()
    opt = dlrt.DLRTOptimizer(model, integrator="bug")
    opt.step(closure_for(model, opt, 0))
    sd = opt.state_dict()
    other = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5))
    dlrt.convert(other, rank=4, exclude=("3",))
    with pytest.raises(ValueError, match="low-rank layers do not match"):
        dlrt.DLRTOptimizer(other, integrator="bug").load_state_dict(sd)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="safetensors"):
        dlrt.load(bad, build())
    with pytest.raises(FileNotFoundError):
        dlrt.load(tmp_path / "missing.safetensors", build())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dlrt checkpoint"):
        dlrt.load(tmp_path / "plain.safetensors", build())


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    model = build()
    path = dlrt.save(tmp_path / "m.safetensors", model, extra={"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="JSON"):
        dlrt.save(path, model, extra={"epoch": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_tied_weights_are_saved(tmp_path):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 8), lin)
    model.add_module("tied", lin)
    dlrt.convert(model, rank=2, target_modules=["0"])
    path = dlrt.save(tmp_path / "t.safetensors", model)
    dlrt.load(path, model)
