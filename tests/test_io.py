"""Checkpoints: bit-identical resume after rank changes, clear errors, atomic writes."""

import copy
import json
import os
import time

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


def test_checkpoint_is_safetensors_with_json_metadata_and_no_pickle(tmp_path, monkeypatch):
    import pickle
    import struct

    model = build()
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="adam", tau_mode="relative")
    opt.step(closure_for(model, opt, 0))
    path = dlrt.save(tmp_path / "m.safetensors", model, opt)
    # The safetensors layout, read by hand: an 8-byte little-endian header length, a JSON header
    # naming every tensor with its dtype, shape and byte range, then the raw data and nothing else.
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["dlrt"])
    assert meta["layers"]["0"]["type"] == "LowRankConv2d" and meta["layers"]["3"]["core"] == [5, 5]
    expected = {f"model/{k}" for k in model.state_dict()}
    expected |= {
        f"optimizer/{i}/{k}" for i, st in opt.state_dict()["state"].items() for k, v in st.items() if torch.is_tensor(v)
    }
    assert set(header) == expected
    assert header["model/3.U"]["shape"] == list(model[3].U.shape)
    assert 8 + n + max(v["data_offsets"][1] for v in header.values()) == len(raw)

    # Loading never unpickles.
    def no_pickle(*args, **kwargs):
        raise AssertionError("load unpickled something")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    other = build(rank=2)
    dlrt.load(path, other, dlrt.DLRTOptimizer(other, integrator="bug", optimizer="adam", tau_mode="relative"))
    assert dlrt.ranks(other) == dlrt.ranks(model)


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
    def tied_model():
        lin = nn.Linear(4, 4)
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4), lin)
        model.add_module("tied", lin)
        dlrt.convert(model, rank=2, target_modules=["0"])
        return model

    model = tied_model()
    path = dlrt.save(tmp_path / "t.safetensors", model)
    other = tied_model()
    assert not torch.equal(other[2].weight, model[2].weight)
    dlrt.load(path, other)
    for key, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], v), key
    assert other[2] is other.tied  # still one module, now with the saved weights
    x = torch.randn(3, 4)
    assert torch.equal(other(x), model(x))


# ------------------------------------------------------------------ a failed load changes nothing
def _rewrite(src, dst, meta_fn=None, tensor_fn=None):
    """Copy checkpoint ``src`` to ``dst``, editing its JSON header and/or its tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["dlrt"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_fn:
        meta_fn(meta)
    if tensor_fn:
        tensor_fn(tensors)
    save_file(tensors, str(dst), metadata={"dlrt": json.dumps(meta)})
    return dst


def _setitem(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


BAD_CHECKPOINTS = {
    "core shape in the header": (
        lambda m: _setitem(m, ["layers", "3", "core"], [4, 4]),
        None,
        r"'3\.[USV]' has shape .* header",
    ),
    "rectangular core at phase 0": (lambda m: _setitem(m, ["layers", "3", "core"], [5, 4]), None, "layer '3'"),
    "min_rank above the full rank": (
        lambda m: _setitem(m, ["layers", "3", "min_rank"], 50),
        None,
        "layer '3'.*min_rank=50",
    ),
    "negative max_rank": (lambda m: _setitem(m, ["layers", "0", "max_rank"], -3), None, "layer '0'.*max_rank=-3"),
    "core above max_rank": (lambda m: _setitem(m, ["layers", "3", "max_rank"], 3), None, "layer '3'.*core"),
    "a factor of the wrong shape": (
        lambda m: _setitem(m, ["layers", "3", "core"], [6, 6]),
        lambda t: t.update({"model/3.U": torch.zeros(32, 6), "model/3.S": torch.zeros(6, 6)}),
        r"'3\.V' has shape",
    ),
    "a dense tensor of the wrong shape": (None, lambda t: t.update({"model/5.bias": torch.zeros(7)}), r"'5\.bias'"),
    "another integrator": (lambda m: _setitem(m, ["optimizer", "dlrt", "integrator"], "parallel"), None, "integrator"),
    "another inner optimizer": (lambda m: _setitem(m, ["optimizer", "dlrt", "optimizer"], "adam"), None, "optimizer"),
    "other coefficient steps": (
        lambda m: _setitem(m, ["optimizer", "dlrt", "coefficient_steps"], 2),
        None,
        "coefficient",
    ),
    "other layers in the optimizer": (
        lambda m: m["optimizer"]["dlrt"]["layers"].pop("0"),
        None,
        "low-rank layers do not match",
    ),
    "another core in the optimizer": (
        lambda m: _setitem(m, ["optimizer", "dlrt", "layers", "3"], [4, 4]),
        None,
        "layer '3' has core shape",
    ),
    "an optimizer state tensor of the wrong shape": (
        None,
        lambda t: t.update({k: torch.zeros(3, 3) for k in [next(k for k in t if k.startswith("optimizer/"))]}),
        "optimizer state 'momentum_buffer'",
    ),
    "a state tensor with an impossible index": (
        None,
        lambda t: t.update({"optimizer/99/momentum_buffer": torch.zeros(3)}),
        "#99",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_leaves_model_and_optimizer_bitwise_unchanged(tmp_path, case):
    meta_fn, tensor_fn, match = BAD_CHECKPOINTS[case]
    kw = dict(integrator="bug", optimizer="sgd", momentum=0.9, lr=0.05, tau=0.3)
    model = build()
    opt = dlrt.DLRTOptimizer(model, **kw)
    for i in range(2):
        opt.step(closure_for(model, opt, i))
    good = dlrt.save(tmp_path / "good.safetensors", model, opt)
    bad = _rewrite(good, tmp_path / "bad.safetensors", meta_fn, tensor_fn)

    other = build(rank=3)
    other_opt = dlrt.DLRTOptimizer(other, **kw)
    other_opt.step(closure_for(other, other_opt, 5))
    before_model = {k: v.clone() for k, v in other.state_dict().items()}
    before_opt = copy.deepcopy(other_opt.state_dict())
    bounds = {n: (m.min_rank, m.max_rank) for n, m in dlrt.conversion.lowrank_layers(other)}
    with pytest.raises(ValueError, match=match):
        dlrt.load(bad, other, other_opt)
    after_model, after_opt = other.state_dict(), other_opt.state_dict()
    assert list(after_model) == list(before_model)
    for k, v in before_model.items():
        assert after_model[k].shape == v.shape and torch.equal(after_model[k], v), k
    _assert_same(after_opt, before_opt)
    assert {n: (m.min_rank, m.max_rank) for n, m in dlrt.conversion.lowrank_layers(other)} == bounds
    x, _ = batch(0)
    assert torch.isfinite(other(x)).all()
    other_opt.step(closure_for(other, other_opt, 6))  # and training goes on
    dlrt.load(good, other, other_opt)  # the good file still loads
    assert dlrt.ranks(other) == dlrt.ranks(model)


def test_applying_that_fails_after_validation_restores_everything(tmp_path, monkeypatch):
    model = build()
    opt = dlrt.DLRTOptimizer(model, optimizer="adam")
    opt.step(closure_for(model, opt, 0))
    path = dlrt.save(tmp_path / "m.safetensors", model, opt)
    other = build(rank=3)
    other_opt = dlrt.DLRTOptimizer(other, optimizer="adam")
    other_opt.step(closure_for(other, other_opt, 1))
    before_model = {k: v.clone() for k, v in other.state_dict().items()}
    before_opt = copy.deepcopy(other_opt.state_dict())

    def broken(self, sd):
        torch.optim.Optimizer.load_state_dict(self, {k: v for k, v in sd.items() if k != "dlrt"})
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dlrt.DLRTOptimizer, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dlrt.load(path, other, other_opt)
    after_model = other.state_dict()
    for k, v in before_model.items():
        assert after_model[k].shape == v.shape and torch.equal(after_model[k], v), k
    _assert_same(other_opt.state_dict(), before_opt)


def _assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------ temporaries of killed writers
def _stale_tmp(directory, name, age, tag="k1ll3d_x"):
    tmp = directory / f".{name}.{tag}.tmp"
    tmp.write_bytes(b"\0" * 1024)
    t = time.time() - age
    os.utime(tmp, (t, t))
    return tmp


@pytest.mark.parametrize("via", ["save", "load"])
def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path, via):
    model = build()
    path = dlrt.save(tmp_path / "m.safetensors", model)
    stale = _stale_tmp(tmp_path, "m.safetensors", age=3600)
    fresh = _stale_tmp(tmp_path, "m.safetensors", age=0, tag="wr1t1ng_")  # a writer may be at work on it
    other_dest = _stale_tmp(tmp_path, "n.safetensors", age=3600)  # another destination's
    lookalike = tmp_path / ".m.safetensors.toolong123.tmp"  # not the exact temp pattern
    lookalike.write_bytes(b"x")
    os.utime(lookalike, (0, 0))
    if via == "save":
        dlrt.save(path, model)
    else:
        dlrt.load(path, build())
    assert not stale.exists()
    assert fresh.exists() and other_dest.exists() and lookalike.exists()


def frozen_base_model(seed: int = 0) -> nn.Module:
    """A frozen dense base (a stand-in for a pretrained encoder) under a low-rank, trainable part."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    return dlrt.convert(model, rank=4, exclude=["0", "4"])


def test_frozen_weights_are_left_out_and_must_match_on_load(tmp_path):
    model = frozen_base_model()
    opt = dlrt.DLRTOptimizer(model, "bug", "adam", lr=1e-2, tau=0.1)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    frozen = ["0.weight", "0.bias"]
    path = dlrt.save(tmp_path / "c.safetensors", model, opt, frozen=frozen)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())
    assert "model/0.weight" not in stored and "model/2.U" in stored and "model/4.weight" in stored
    # a model rebuilt from the same base loads it to the bit
    fresh = frozen_base_model()
    fresh_opt = dlrt.DLRTOptimizer(fresh, "bug", "adam", lr=1e-2, tau=0.1)
    dlrt.load(path, fresh, fresh_opt)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    # another base (one entry of the frozen weight differs): refused, naming it, and nothing changes
    other = frozen_base_model()
    with torch.no_grad():
        other[0].weight[0, 0] += 1.0
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"frozen '0\.weight'.*same pretrained weights"):
        dlrt.load(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="frozen= names keys"):
        dlrt.save(tmp_path / "d.safetensors", model, frozen=["0.nope"])
    assert not (tmp_path / "d.safetensors").exists()
