"""Export (issue 30, first slice): plain torch modules, torch.export programs that load without dlrt, safetensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import dlrt
from dlrt import linalg
from dlrt.exporting import AddBranches
from dlrt.peft import GeoLoRAConfig, get_geolora_model

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _random_ranks(model: nn.Module) -> nn.Module:
    """Every layer at a random rank below its full one, cores random (not diagonal) for a generic U S Vᵀ."""
    for _, layer in dlrt.lowrank_layers(model):
        n, m = layer.shape
        r = int(torch.randint(1, min(n, m), ()))
        kw = {"dtype": layer.U.dtype}
        U = linalg.orth(torch.randn(n, r, **kw))
        V = linalg.orth(torch.randn(m, r, **kw))
        layer.set_factors(U, torch.randn(r, r, **kw), V)
    return model


def mlp(dtype=torch.float32) -> nn.Module:
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30, bias=False), nn.Tanh(), nn.Linear(30, 5))
    return _random_ranks(dlrt.convert(net.to(dtype), rank=4))


class LeNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 4, padding="same", dilation=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def lenet(dtype=torch.float32) -> nn.Module:
    return _random_ranks(dlrt.convert(LeNetLike().to(dtype), rank=3))


def geolora(dtype=torch.float32) -> nn.Module:
    """A GeoLoRA model on a conv + linear net, every update non-zero (as after training)."""
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 7)).to(dtype)
    model = get_geolora_model(base, GeoLoRAConfig(r=3, lora_alpha=6.0))
    for a in model.adapters().values():
        lora = a.lora
        lora.set_factors(lora.U.detach(), torch.randn(3, 3, dtype=dtype), lora.V.detach())
    return model


def _no_dlrt_modules(plain: nn.Module) -> None:
    for name, module in plain.named_modules():
        assert not type(module).__module__.startswith("dlrt") or isinstance(module, AddBranches), (name, module)


def _close(a, b, dtype):
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["flops", "factored", "dense"])
def test_to_plain_mlp_and_conv_net(dtype, rule):
    for model, x in (
        (mlp(dtype), torch.randn(9, 20, dtype=dtype)),
        (lenet(dtype), torch.randn(4, 1, 14, 14, dtype=dtype)),
    ):
        model.eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        plain = dlrt.to_plain(model, rule=rule)
        _no_dlrt_modules(plain)
        assert not any(isinstance(m, dlrt.FactorizedLayer) for m in plain.modules())
        with torch.no_grad():
            _close(plain(x), model(x), dtype)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is untouched
    forms = {type(m) for m in plain.modules()}
    assert (nn.Conv2d in forms) and (nn.Linear in forms)


def test_conv_factors_are_the_layer_kernels():
    model = lenet()
    layer = model.features[0]
    plain = dlrt.to_plain(model, rule="factored")
    first, second = plain.features[0]
    r = layer.S.shape[1]
    assert first.weight.shape == (r, 1, 5, 5) and second.weight.shape == (6, r, 1, 1)
    assert (first.padding, first.padding_mode, first.stride) == ((2, 2), "reflect", (1, 1))
    dense = second.weight.reshape(6, r) @ first.weight.reshape(r, -1)
    torch.testing.assert_close(dense.reshape(layer.weight.shape), layer.weight)
    torch.testing.assert_close(second.bias, layer.bias.detach())


def test_flops_rule_boundary():
    # Linear 20 → 30: factored costs r·50, dense 600; equal at r = 12 → dense.
    def linear_at(r):
        layer = dlrt.LowRankLinear(20, 30, rank=r)
        return dlrt.to_plain(nn.Sequential(layer))[0]

    assert isinstance(linear_at(11), nn.Sequential) and linear_at(11)[0].weight.shape == (11, 20)
    assert type(linear_at(12)) is nn.Linear and linear_at(12).weight.shape == (30, 20)
    assert type(linear_at(20)) is nn.Linear
    # Conv 3 → 8, 5×5: n = 8, m = 75, dense 600; r = 7 costs 581 (factored), r = 8 costs 664 (dense).
    conv7 = dlrt.to_plain(dlrt.LowRankConv2d(3, 8, 5, rank=7))
    conv8 = dlrt.to_plain(dlrt.LowRankConv2d(3, 8, 5, rank=8))
    assert isinstance(conv7, nn.Sequential) and conv7[0].weight.shape == (7, 3, 5, 5)
    assert type(conv8) is nn.Conv2d and conv8.weight.shape == (8, 3, 5, 5)
    # forced forms
    assert isinstance(dlrt.to_plain(dlrt.LowRankLinear(20, 30, rank=20), rule="factored"), nn.Sequential)
    assert type(dlrt.to_plain(dlrt.LowRankLinear(20, 30, rank=2), rule="dense")) is nn.Linear
    with pytest.raises(ValueError, match="rule must be one of"):
        dlrt.to_plain(dlrt.LowRankLinear(20, 30, rank=2), rule="cheapest")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("merged", [True, False])
def test_to_plain_geolora(dtype, merged):
    model = geolora(dtype).eval()
    x = torch.randn(5, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        want = model(x)
    plain = dlrt.to_plain(model, merged=merged)
    _no_dlrt_modules(plain)
    kinds = {type(m) for m in plain.modules()}
    assert (AddBranches in kinds) is (not merged)
    with torch.no_grad():
        _close(plain(x), want, dtype)
        _close(model(x), want, dtype)  # the live model is untouched (merging worked on the copy)
    # The updates are not zero: without them the output differs.
    base_only = get_geolora_model(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 7)).to(dtype),
        GeoLoRAConfig(r=3),
    )
    base_only.load_state_dict(model.state_dict())
    for a in base_only.adapters().values():
        a.lora.set_factors(a.lora.U.detach(), torch.zeros(3, 3, dtype=dtype), a.lora.V.detach())
    with torch.no_grad():
        assert (base_only(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tucker_factored_is_three_convolutions(dtype):
    net = nn.Sequential(
        nn.Conv2d(6, 10, 3, padding=2, dilation=2, padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(10, 12, 3, stride=2, bias=False),
    ).to(dtype)
    model = dlrt.convert(net, rank=3, conv="tucker").eval()
    for layer in model.modules():
        if isinstance(layer, dlrt.TuckerConv2d):  # a generic core, not the HOSVD's ordered one
            layer.set_factors([B.detach() for B in layer.bases], torch.randn_like(layer.C))
    plain = dlrt.to_plain(model, rule="factored")
    _no_dlrt_modules(plain)
    reduce, core, expand = plain[0]
    r0, r1 = model[0].C.shape[:2]
    assert reduce.weight.shape == (r1, 6, 1, 1) and expand.weight.shape == (10, r0, 1, 1)
    assert core.weight.shape == (r0, r1, 3, 3)
    assert (core.padding, core.dilation, core.padding_mode) == ((2, 2), (2, 2), "circular")
    assert plain[2][1].stride == (2, 2) and plain[2][2].bias is None
    x = torch.randn(3, 6, 9, 9, dtype=dtype)
    with torch.no_grad():
        _close(plain(x), model(x), dtype)
        _close(dlrt.to_plain(model, rule="dense")(x), model(x), dtype)


def test_tucker_flops_rule():
    # 8 → 8 channels, 3×3: dense 576 per pixel; ranks (r₀, r₁) cost 8 r₁ + 9 r₀ r₁ + 8 r₀.
    def tucker_at(r0, r1):
        layer = dlrt.TuckerConv2d(8, 8, 3, ranks=(r0, r1, 3, 3))
        return dlrt.to_plain(layer)

    assert isinstance(tucker_at(6, 6), nn.Sequential)  # 48 + 324 + 48 = 420 < 576
    assert type(tucker_at(8, 7)) is nn.Conv2d  # 56 + 504 + 64 = 624 ≥ 576


class MyLowRank(dlrt.FactorizedLayer):
    """A dlrt layer type the exporter does not know (the identity)."""

    def forward(self, x):
        return x


def test_unknown_dlrt_layer_is_a_clear_error():
    holder = nn.Sequential(nn.Linear(2, 2), MyLowRank())
    with pytest.raises(ValueError, match="'1' is a MyLowRank, which to_plain does not know how to export"):
        dlrt.to_plain(holder)


_LOADER = r"""
import sys
sys.modules["dlrt"] = None  # import dlrt raises from here on
import torch
try:
    import dlrt
except ImportError:
    pass
else:
    raise SystemExit("dlrt is importable")
case = torch.load(sys.argv[1], weights_only=True)
for i, path in enumerate(sys.argv[2:]):
    aoti = path.endswith(".aoti.pt2")
    program = torch._inductor.aoti_load_package(path) if aoti else torch.export.load(path).module()
    for b in (1, 7):
        x, want = case[f"{i}/x{b}"], case[f"{i}/y{b}"]
        got = program(x)
        assert got.shape == want.shape, (path, b, got.shape, want.shape)
        err = (got - want).abs().max().item()
        assert err <= 1e-5 * (1 + want.abs().max().item()), (path, b, err)
        assert not any(m.startswith("dlrt") for m in sys.modules if sys.modules[m] is not None)
print("ok", len(sys.argv) - 2)
"""


def run_without_dlrt(loader: str, case: Path, paths: list[str], count: int) -> None:
    """Run ``loader`` (a script that cannot import dlrt) on the saved ``case`` and files; it checks ``count`` files."""
    run = subprocess.run(
        [sys.executable, "-c", loader, str(case), *paths], capture_output=True, text=True, timeout=300, cwd=case.parent
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith(f"ok {count}")


def test_pt2_loads_and_runs_without_dlrt(tmp_path):
    cases = [
        (lenet(), lambda b: torch.randn(b, 1, 14, 14), {}),
        (mlp(), lambda b: torch.randn(b, 20), {"rule": "factored"}),
        (geolora(), lambda b: torch.randn(b, 3, 6, 6), {"merged": False}),
    ]
    saved, paths = {}, []
    for i, (model, make, kw) in enumerate(cases):
        model.eval()
        path = dlrt.export(model, (make(3),), tmp_path / "out" / f"m{i}.pt2", **kw)
        assert path.is_file() and not list(path.parent.glob(".*.tmp"))
        paths.append(str(path))
        for b in (1, 7):
            x = make(b)
            with torch.no_grad():
                saved[f"{i}/x{b}"], saved[f"{i}/y{b}"] = x, model(x)
    torch.save(saved, tmp_path / "case.pt")
    run_without_dlrt(_LOADER, tmp_path / "case.pt", paths, 3)


@pytest.mark.slow
def test_aoti_package_is_checked_then_loads_and_runs_without_dlrt(tmp_path, monkeypatch):
    """format="aoti": the compiled package is checked against the model before anything is written, and runs in a
    fresh process without dlrt at batch sizes other than the example's."""
    import dlrt.exporting as exporting

    model = mlp().eval()
    with monkeypatch.context() as m:
        m.setattr(exporting, "ONNX_TOLERANCE", -1.0)  # no output can match
        with pytest.raises(ValueError, match="the compiled package's output 0 differs.*nothing was written"):
            dlrt.export(model, (torch.randn(3, 20),), tmp_path / "bad.aoti.pt2", format="aoti", rule="factored")
    assert list(tmp_path.iterdir()) == []
    path = dlrt.export(model, (torch.randn(3, 20),), tmp_path / "m.aoti.pt2", format="aoti", rule="factored")
    saved = {}
    for b in (1, 7):
        x = torch.randn(b, 20)
        with torch.no_grad():
            saved[f"0/x{b}"], saved[f"0/y{b}"] = x, model(x)
    torch.save(saved, tmp_path / "case.pt")
    run_without_dlrt(_LOADER, tmp_path / "case.pt", [str(path)], 1)


def test_safetensors_metadata_and_weights(tmp_path):
    model = lenet().eval()
    path = dlrt.export(model, (torch.randn(2, 1, 14, 14),), tmp_path / "m.safetensors", format="safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["dlrt_export"])
    assert meta["format"] == "dlrt-export" and meta["rule"] == "flops"
    layers = meta["layers"]
    assert set(layers) == {name for name, _ in dlrt.lowrank_layers(model)}
    plain = dlrt.to_plain(model)
    for name, layer in dlrt.lowrank_layers(model):
        info = layers[name]
        n, m = layer.shape
        r = layer.S.shape[1]
        assert info["shape"] == [n, m] and info["rank"] == r
        assert info["kind"] == ("linear" if isinstance(layer, dlrt.LowRankLinear) else "conv")
        assert info["form"] == ("factored" if r * (n + m) < n * m else "dense")
        assert isinstance(plain.get_submodule(name), nn.Sequential) is (info["form"] == "factored")
    # The stored tensors alone reproduce the outputs in to_plain's structure.
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(3, 1, 14, 14)
    with torch.no_grad():
        _close(plain(x), model(x), torch.float32)


def test_safetensors_geolora_unmerged_metadata(tmp_path):
    model = geolora().eval()
    path = dlrt.export(
        model, (torch.randn(2, 3, 6, 6),), tmp_path / "g.safetensors", format="safetensors", merged=False
    )
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["dlrt_export"])["layers"]
    assert set(layers) == set(model.adapters())
    assert {v["kind"] for v in layers.values()} == {"adapter-conv", "adapter-linear"}
    assert all(v["rank"] == 3 for v in layers.values())
    plain = dlrt.to_plain(model, merged=False)
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _close(plain(x), model(x), torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "tflite"}, ValueError, "format must be one of"),
        ({"rule": "fast"}, ValueError, "rule must be one of"),
        ({"inputs": [torch.randn(2, 20)]}, TypeError, "non-empty tuple of tensors"),
        ({"inputs": (torch.randn(2, 20), 3)}, TypeError, r"example_inputs\[1\] is a int"),
        ({"inputs": (torch.randn(1, 20),)}, ValueError, "batch of at least 2"),
        ({"unknown": True}, ValueError, "MyLowRank, which to_plain does not know"),
        ({"rule": "measured", "unknown": True}, ValueError, "MyLowRank, which to_plain does not know"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, error, match):
    model = mlp()
    if kwargs.pop("unknown", False):
        model.add_module("extra", MyLowRank())
    inputs = kwargs.pop("inputs", (torch.randn(2, 20),))
    for fmt in ("pt2", "onnx", "safetensors"):
        kw = {"format": fmt, **kwargs}
        with pytest.raises(error, match=match):
            dlrt.export(model, inputs, tmp_path / "out" / "m.bin", **kw)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_fixed_batch_export(tmp_path):
    model = mlp().eval()
    path = dlrt.export(model, (torch.randn(1, 20),), tmp_path / "m.pt2", dynamic_batch=False)
    program = torch.export.load(str(path)).module()
    x = torch.randn(1, 20)
    with torch.no_grad():
        _close(program(x), model(x), torch.float32)


def test_export_finishes_the_cycle_of_the_optimizer(tmp_path):
    model = nn.Sequential(dlrt.LowRankLinear(8, 6, rank=2), nn.Tanh(), nn.Linear(6, 3))
    opt = dlrt.DLRTOptimizer(model, "bug", "sgd", lr=0.1, tau=0.1, coefficient_steps=3)
    x, y = torch.randn(16, 8), torch.randn(16, 3)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.phase != 0
    augmented = model[0].S.shape
    path = dlrt.export(model, (x,), tmp_path / "m.safetensors", format="safetensors", optimizer=opt)
    assert opt.phase == 0
    r = model[0].S.shape[1]
    assert r <= augmented[1]
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["dlrt_export"])["layers"]["0"]["rank"] == r


def test_an_unsupported_layer_fails_before_the_cycle_is_finished(tmp_path):
    """Validation comes first: the live model and its optimizer stay mid-cycle when the export cannot proceed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    model = dlrt.convert(net, rank=2, exclude=())
    opt = dlrt.DLRTOptimizer(model, "bug", "sgd", lr=0.1, tau=0.1, coefficient_steps=3)
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 4, (4,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    layers = [layer for _, layer in dlrt.lowrank_layers(model)]
    phase, cores = opt.phase, [layer.core.shape for layer in layers]
    model.add_module("extra", MyLowRank())  # the identity, added mid-cycle
    assert phase != 0
    with pytest.raises(ValueError, match="MyLowRank"):
        dlrt.export(model, (x,), tmp_path / "m.pt2", optimizer=opt)
    assert opt.phase == phase
    assert [layer.core.shape for layer in layers] == cores
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- ONNX

_ORT_LOADER = r"""
import sys
sys.modules["dlrt"] = None  # import dlrt raises from here on
import numpy as np
import onnxruntime
case = np.load(sys.argv[1])
for i, path in enumerate(sys.argv[2:]):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for b in (1, 7):
        x, want = case[f"x{i}_{b}"], case[f"y{i}_{b}"]
        (got,) = session.run(None, {name: x})
        assert got.shape == want.shape, (path, b, got.shape, want.shape)
        err = float(np.abs(got - want).max())
        assert err <= 1e-5 * (1 + float(np.abs(want).max())), (path, b, err)
print("ok", len(sys.argv) - 2)
"""


def _tucker_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten())
    return dlrt.convert(net, rank=4, conv="tucker", exclude=())


def test_onnx_runs_in_onnxruntime_without_dlrt(tmp_path):
    pytest.importorskip("onnxruntime")
    cases = [
        (lenet(), lambda b: torch.randn(b, 1, 14, 14), {"rule": "factored"}),
        (mlp(), lambda b: torch.randn(b, 20), {}),
        (geolora(), lambda b: torch.randn(b, 3, 6, 6), {"merged": False, "rule": "factored"}),
        (_tucker_net(), lambda b: torch.randn(b, 3, 6, 6), {"rule": "factored"}),
    ]
    arrays, paths = {}, []
    for i, (model, make, kw) in enumerate(cases):
        model.eval()
        path = dlrt.export(model, (make(3),), tmp_path / f"m{i}.onnx", format="onnx", **kw)
        paths.append(str(path))
        for b in (1, 7):
            x = make(b)
            with torch.no_grad():
                arrays[f"x{i}_{b}"], arrays[f"y{i}_{b}"] = x.numpy(), model(x).numpy()
    import numpy as np

    np.savez(tmp_path / "case.npz", **arrays)
    run_without_dlrt(_ORT_LOADER, tmp_path / "case.npz", paths, len(cases))


def test_onnx_mismatch_writes_nothing(tmp_path, monkeypatch):
    """The onnxruntime check runs before the file is written: a failed check leaves nothing behind."""
    pytest.importorskip("onnxruntime")
    import dlrt.exporting as exporting

    monkeypatch.setattr(exporting, "ONNX_TOLERANCE", -1.0)  # no output can match
    with pytest.raises(ValueError, match="the ONNX program's output 0 differs.*nothing was written"):
        dlrt.export(mlp().eval(), (torch.randn(3, 20),), tmp_path / "m.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"needs onnxruntime.*pip install 'dlrt\[export\]'"):
        dlrt.export(mlp(), (torch.randn(3, 20),), tmp_path / "m.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- rule="measured"


def test_measured_rule_keeps_the_faster_form_timed_on_each_layers_input(monkeypatch):
    import dlrt.exporting as exporting

    model = mlp().eval()  # layers 20→30 (ReLU) 30→30 (Tanh) 30→5
    x = torch.randn(6, 20)
    seen = []

    def fake_time(dense, factored, layer_input):
        seen.append(layer_input.clone())
        # the first layer is "faster" dense, the others factored
        return {"dense": 1.0, "factored": 2.0} if len(seen) == 1 else {"dense": 2.0, "factored": 1.0}

    monkeypatch.setattr(exporting, "_time_forms", fake_time)
    plain, layers = exporting.plain_and_layers(model, rule="measured", example_inputs=(x,))
    assert [layers[k]["form"] for k in ("0", "2", "4")] == ["dense", "factored", "factored"]
    assert layers["0"]["seconds"] == {"dense": 1.0, "factored": 2.0}
    assert type(plain[0]) is nn.Linear and isinstance(plain[2], nn.Sequential)
    with torch.no_grad():  # the inputs timed are the layers' inputs on the example
        torch.testing.assert_close(seen[0], x)
        torch.testing.assert_close(seen[1], torch.relu(model[0](x)))
        torch.testing.assert_close(seen[2], torch.tanh(model[2](torch.relu(model[0](x)))))
        _close(plain(x), model(x), torch.float32)


def test_measured_rule_times_for_real_and_counts_an_unreached_layer():
    net = nn.ModuleDict({"body": mlp(), "spare": dlrt.LowRankLinear(40, 40, rank=2)})

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = net

        def forward(self, x):
            return self.parts["body"](x)

    body = Body().eval()
    x = torch.randn(4, 20)
    plain, layers = dlrt.exporting.plain_and_layers(body, rule="measured", example_inputs=(x,))
    timed = layers["parts.body.0"]["seconds"]
    assert set(timed) == {"dense", "factored"} and all(t > 0 for t in timed.values())
    assert layers["parts.spare"]["seconds"] is None and layers["parts.spare"]["form"] == "factored"  # by FLOPs
    with torch.no_grad():
        _close(plain(x), body(x), torch.float32)
    with pytest.raises(ValueError, match='rule="measured" times each layer on its input: pass example_inputs'):
        dlrt.to_plain(body, rule="measured")
