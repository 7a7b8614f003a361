"""GeoLoRA adapters: the PEFT-shaped API, the adapter math, save/load, merge."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

from dlrt.layers import LowRankAdapter, LowRankLinear
from dlrt.peft import GeoLoRAConfig, GeoLoRAModel, get_geolora_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(-1).flatten(1)
        return self.head(torch.relu(self.body(h)))


def make_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def batch(dtype: torch.dtype = torch.float32, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def train(model: GeoLoRAModel, steps: int = 5, **opt_kwargs) -> list[dict[str, int]]:
    opt = model.make_optimizer(**{"lr": 5e-3, **opt_kwargs})
    x, y = batch(next(model.parameters()).dtype)
    ranks = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ranks.append(model.ranks())
    return ranks


def test_adapters_start_as_the_identity_update_and_freeze_the_base():
    base = make_net()
    ref = copy.deepcopy(base)
    x, _ = batch()
    model = get_geolora_model(base, GeoLoRAConfig(r=4, modules_to_save=["head"]))
    assert sorted(model.adapters()) == ["body.0", "body.2", "conv"]
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora." in n or n.startswith("base_model.head.") for n in trainable)
    assert {"base_model.head.weight", "base_model.head.bias"} <= trainable
    assert not any("base_layer" in n for n in trainable)


def test_training_changes_only_adapters_and_modules_to_save():
    base = make_net()
    frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith("head")}
    model = get_geolora_model(base, GeoLoRAConfig(r=4, modules_to_save=["head"]))
    head = model.base_model.head.weight.detach().clone()
    train(model, steps=3)
    for name, a in model.adapters().items():
        torch.testing.assert_close(a.base_layer.weight, frozen[f"{name}.weight"], rtol=0, atol=0)
        assert a.lora.S.abs().sum() > 0
    assert not torch.equal(model.base_model.head.weight, head)


@pytest.mark.parametrize("route", ["thin", "dense"])
def test_adapter_gradients_are_the_scaled_projected_dense_gradient(route):
    """G V, Gᵀ U, Uᵀ G V, the kept pass's Lᵀ G R and the input gradient of the update equal those of
    s·(dense gradient of W₀), float64, on both contraction routes (the scale rides on the thin side)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(copy.deepcopy(lin), 3, scaling=2.5)
    adapter.lora.contraction = route
    with torch.no_grad():
        adapter.lora.S.copy_(torch.randn(3, 3, dtype=torch.float64))
    adapter.lora.grad_request = frozenset({"K", "L", "X"})
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    adapter(x).pow(2).sum().backward()
    # Dense reference: the same function with W = W₀ + s U S Vᵀ as one free matrix.
    U, S, V = (t.detach() for t in (adapter.lora.U, adapter.lora.S, adapter.lora.V))
    W = (lin.weight.detach() + 2.5 * U @ S @ V.T).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x_ref, W, lin.bias).pow(2).sum().backward()
    G = 2.5 * W.grad
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(adapter.lora.grad_K, G @ V, **tol)
    torch.testing.assert_close(adapter.lora.grad_L, G.T @ U, **tol)
    torch.testing.assert_close(adapter.lora.S.grad, U.T @ G @ V, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    L, R = (
        torch.linalg.qr(torch.randn(9, 2, dtype=torch.float64))[0],
        torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0],
    )
    torch.testing.assert_close(adapter.lora.project_grad(L, R), L.T @ G @ R, **tol)
    torch.testing.assert_close(adapter.lora.project_grad(L, None), L.T @ G, **tol)


def test_one_sgd_step_matches_the_dense_parallel_bug_formula():
    """docs/algorithms.md §3 on an adapter, float64: the new U S Vᵀ equals the augmented core truncated at tau=0."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8)).double()
    model = get_geolora_model(base, GeoLoRAConfig(r=2, tau=0.0, truncation="local", lora_alpha=2.0))
    lora = model.adapters()["0"].lora
    with torch.no_grad():
        lora.S.copy_(torch.tensor([[0.7, 0.1], [0.0, 0.3]], dtype=torch.float64))
    lora.pending_growth = False  # a trained adapter: the regular parallel step
    U0, S0, V0 = (t.detach().clone() for t in (lora.U, lora.S, lora.V))
    x = torch.randn(5, 10, dtype=torch.float64)
    lr = 0.1
    opt = model.make_optimizer(optimizer="sgd", lr=lr)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    W = (base[0].base_layer.weight.detach() + 1.0 * U0 @ S0 @ V0.T).requires_grad_(True)
    nn.functional.linear(x, W, base[0].base_layer.bias).pow(2).sum().backward()
    G = 1.0 * W.grad  # scaling = lora_alpha / r = 1
    P_U = torch.eye(8, dtype=torch.float64) - U0 @ U0.T
    P_V = torch.eye(10, dtype=torch.float64) - V0 @ V0.T
    # W₁ = U₀S₀V₀ᵀ − λ (P_U-free tangent projection of G): U₀U₀ᵀG V₀V₀ᵀ + P_U G V₀V₀ᵀ + U₀U₀ᵀ G P_V.
    tangent = U0 @ U0.T @ G @ V0 @ V0.T + P_U @ G @ V0 @ V0.T + U0 @ U0.T @ G @ P_V
    expected = U0 @ S0 @ V0.T - lr * tangent
    torch.testing.assert_close(lora.matrix().detach(), expected, rtol=1e-10, atol=1e-10)


def test_merge_and_unload_matches_to_1e_5_linear_and_conv():
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.05, modules_to_save=["head"]))
    train(model, steps=4)
    x, _ = batch()
    model.eval()
    expected = model(x).detach()
    merged = model.merge_and_unload()
    assert isinstance(merged, Net) and not any(isinstance(m, LowRankAdapter) for m in merged.modules())
    assert isinstance(merged.conv, nn.Conv2d) and isinstance(merged.body[0], nn.Linear)
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())  # flags restored


def test_unload_restores_the_original_function():
    base = make_net()
    ref = copy.deepcopy(base)
    model = get_geolora_model(base, GeoLoRAConfig(r=4))
    train(model, steps=2)
    restored = model.unload()
    x, _ = batch()
    torch.testing.assert_close(restored(x), ref(x), rtol=0, atol=0)


def test_save_load_round_trip_after_ranks_changed(tmp_path):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.3, coefficient_steps=1, modules_to_save=["head"]))
    history = train(model, steps=6)
    assert any(r != {"body.0": 4, "body.2": 4, "conv": 4} for r in history), "ranks never changed"
    model.eval()
    x, _ = batch()
    expected = model(x).detach()
    model.save_pretrained(tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and {n: c[0] for n, c in ((n, a["core"]) for n, a in saved["dlrt"]["adapters"].items())} == (
        model.ranks()
    )

    loaded = GeoLoRAModel.from_pretrained(make_net(), tmp_path / "ad")
    assert loaded.ranks() == model.ranks()
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    trainable = GeoLoRAModel.from_pretrained(make_net(), tmp_path / "ad", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    train(trainable, steps=1)


def test_whole_model_pickles_and_deep_copies(tmp_path):
    import copy
    import inspect
    import io

    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.3, coefficient_steps=1))
    train(model, steps=3)
    model.eval()
    x, _ = batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickle: the per-base-class wrapper class is rebuilt on loading
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(other) is type(model) and isinstance(other, GeoLoRAModel)
        assert other.ranks() == model.ranks()
        assert list(inspect.signature(other.forward).parameters) == ["x"]
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_loading_into_a_different_base_names_the_module(tmp_path):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=2))
    model.save_pretrained(tmp_path)

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.body[2] = nn.Linear(32, 48)
            self.head = nn.Linear(48, 4)

    with pytest.raises(ValueError, match=r"'body\.2'.*weight \[32, 32\].*weight \[48, 32\]"):
        GeoLoRAModel.from_pretrained(Wider(), tmp_path)

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.trunk = nn.Sequential(nn.Linear(128, 32))

    with pytest.raises(ValueError, match=r"has no module 'body\.0'"):
        GeoLoRAModel.from_pretrained(Renamed(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        GeoLoRAModel.from_pretrained(make_net(), tmp_path / "nowhere")


def _corrupt(directory, what: str) -> None:
    from safetensors.torch import load_file, save_file

    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    tensors = load_file(str(weights))
    meta = json.loads(config.read_text())
    if what == "missing weights":
        weights.unlink()
    elif what == "corrupt weights":
        weights.write_bytes(b"\x10\x00\x00\x00not a safetensors header")
    elif what == "tensor of the wrong shape":
        tensors["body.2.V"] = torch.zeros(31, tensors["body.2.V"].shape[1])
    elif what == "missing tensor":
        del tensors["conv.S"]
    elif what == "saved module of the wrong shape":
        tensors["modules_to_save.head.weight"] = torch.zeros(5, 32)
    elif what == "core of another shape in the config":
        core = meta["dlrt"]["adapters"]["body.0"]["core"]
        meta["dlrt"]["adapters"]["body.0"]["core"] = [core[0] + 1, core[1]]
    elif what == "rank bounds out of range":
        meta["dlrt"]["adapters"]["conv"]["min_rank"] = 50
    elif what == "non-finite tensor":
        tensors["body.0.S"][0, 0] = float("nan")
    elif what == "modules_to_save entry the model lacks":
        meta["modules_to_save"] = ["classifier"]
    if what not in ("missing weights", "corrupt weights"):
        save_file(tensors, str(weights))
    config.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "what",
    [
        "missing weights",
        "corrupt weights",
        "tensor of the wrong shape",
        "missing tensor",
        "saved module of the wrong shape",
        "core of another shape in the config",
        "rank bounds out of range",
        "non-finite tensor",
        "modules_to_save entry the model lacks",
    ],
)
def test_loading_a_broken_adapter_dir_leaves_the_base_model_unchanged(tmp_path, what):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.3, coefficient_steps=1, modules_to_save=["head"]))
    train(model, steps=3)
    model.save_pretrained(tmp_path)
    _corrupt(tmp_path, what)
    base = make_net(seed=1)
    base.body[0].weight.requires_grad_(False)  # flags are restored as they were, not set to a default
    state = {k: v.clone() for k, v in base.state_dict().items()}
    types = {n: type(m) for n, m in base.named_modules()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises((ValueError, FileNotFoundError)):
        GeoLoRAModel.from_pretrained(base, tmp_path)
    assert {n: type(m) for n, m in base.named_modules()} == types
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    after = base.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_global_budget_holds_after_every_truncation():
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=6, tau=0.0, budget=7, coefficient_steps=1))
    history = train(model, steps=6, lr=2e-2)
    assert sum(history[0].values()) == 4 * 4 + 6  # step 1 grows bases, no truncation (head is 4×32)
    for ranks in history[1:]:
        assert sum(ranks.values()) <= 7
        assert min(ranks.values()) >= 1


def test_first_step_grows_bases_from_the_gradient_float64():
    """At S = 0 the bases become orth(G V₀), orth(Gᵀ U₀); the function is unchanged."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8)).double()
    model = get_geolora_model(base, GeoLoRAConfig(r=3, truncation="local"))
    lora = model.adapters()["0"].lora
    U0, V0 = lora.U.detach().clone(), lora.V.detach().clone()
    x = torch.randn(5, 10, dtype=torch.float64)
    before = model(x).detach()
    opt = model.make_optimizer(lr=0.1)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    W = base[0].base_layer.weight.detach().clone().requires_grad_(True)
    nn.functional.linear(x, W, base[0].base_layer.bias).pow(2).sum().backward()
    G = model.adapters()["0"].scaling * W.grad
    U, V = lora.U.detach(), lora.V.detach()
    torch.testing.assert_close(U @ U.T @ (G @ V0), G @ V0, rtol=1e-10, atol=1e-10)  # range(U) = range(G V₀)
    torch.testing.assert_close(V @ V.T @ (G.T @ U0), G.T @ U0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not lora.S.detach().any() and not lora.pending_growth and lora.rank == 3
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()  # the second step is a regular parallel step: the core moves
    assert lora.S.detach().abs().sum() > 0


def test_scaling_is_fixed_when_ranks_change():
    """After the ranks changed, every adapter still adds (lora_alpha / initial r)·U S Vᵀ x: 8 / 4 = 2."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    ref = copy.deepcopy(base)
    model = get_geolora_model(base, GeoLoRAConfig(r=4, lora_alpha=8, tau=0.3, truncation="local", coefficient_steps=1))
    opt = model.make_optimizer(lr=5e-2)
    x, y = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert any(r != 4 for r in model.ranks().values()), "ranks never changed"
    lo = model.adapters()

    def update(name: str, h: torch.Tensor) -> torch.Tensor:
        U, S, V = (t.detach() for t in (lo[name].lora.U, lo[name].lora.S, lo[name].lora.V))
        return 2.0 * h @ V @ S.T @ U.T

    h = torch.tanh(ref[0](x) + update("0", x))
    expected = ref[2](h) + update("2", h)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_weight_decay_shrinks_the_core_and_never_the_bases():
    """AdamW, float64: one step with weight decay differs from the same step without it by exactly −λ·wd·W₀
    (decoupled decay of S on the augmented core, tau = 0); decaying U or V as well would shrink W by (1−λ·wd)³."""
    lr, wd = 0.05, 0.4
    results = []
    for decay in (wd, 0.0):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(10, 8)).double()
        model = get_geolora_model(base, GeoLoRAConfig(r=2, tau=0.0, truncation="local", coefficient_steps=1))
        lora = model.adapters()["0"].lora
        with torch.no_grad():
            lora.S.copy_(torch.tensor([[0.7, 0.1], [0.0, 0.3]], dtype=torch.float64))
        lora.pending_growth = False
        W0 = lora.matrix().detach().clone()
        opt = model.make_optimizer(optimizer="adamw", lr=lr, weight_decay=decay)
        x = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        U, V = lora.U.detach(), lora.V.detach()
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
        results.append(lora.matrix().detach())
    torch.testing.assert_close(results[0] - results[1], -lr * wd * W0, rtol=0, atol=1e-12)


def test_bases_stay_orthonormal_under_adamw_with_weight_decay():
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.05))
    train(model, steps=20, optimizer="adamw", weight_decay=0.5, lr=1e-2)
    for a in model.adapters().values():
        U, V = a.lora.U.detach(), a.lora.V.detach()
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1]), rtol=0, atol=1e-5)


def test_adapter_dropout_acts_on_the_update_input_in_training_only():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(copy.deepcopy(lin), 3, scaling=1.5, dropout=0.5)
    with torch.no_grad():
        adapter.lora.S.copy_(torch.randn(3, 3, dtype=torch.float64))
    U, S, V = (t.detach() for t in (adapter.lora.U, adapter.lora.S, adapter.lora.V))
    x = torch.randn(64, 12, dtype=torch.float64)

    def expected(x_update: torch.Tensor) -> torch.Tensor:
        return lin(x) + 1.5 * x_update @ V @ S.T @ U.T

    adapter.train()
    torch.manual_seed(7)
    y = adapter(x)
    torch.manual_seed(7)
    mask_x = nn.functional.dropout(x, 0.5, training=True)  # the same mask: the same generator state
    assert (mask_x == 0).any() and not torch.equal(mask_x, x)
    torch.testing.assert_close(y, expected(mask_x), rtol=0, atol=1e-12)
    adapter.eval()
    torch.testing.assert_close(adapter(x), expected(x), rtol=0, atol=1e-12)


def test_reset_adapter_restarts_the_update_and_training_continues():
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.2, coefficient_steps=1))
    opt = model.make_optimizer(optimizer="adamw", lr=1e-2)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    adapter = model.adapters()["body.0"]
    assert adapter.lora.S.detach().any()
    adapter.reset_adapter(2)
    lora = adapter.lora
    assert lora.rank == 2 and lora.pending_growth and not lora.S.detach().any()
    torch.testing.assert_close(lora.U.T @ lora.U, torch.eye(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(lora.V.T @ lora.V, torch.eye(2), rtol=0, atol=1e-6)
    h = torch.relu(model.base_model.conv(x)).mean(-1).flatten(1)
    torch.testing.assert_close(adapter(h), adapter.base_layer(h), rtol=0, atol=0)  # the update is zero again
    # The optimizer still holds state of the old rank-4 factors: the next step grows afresh from the gradient.
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert lora.rank == 2 and not lora.pending_growth and not lora.S.detach().any()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert lora.S.detach().any()


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["body.0"], ["body.0"]),
        (["0", "2"], ["body.0", "body.2"]),
        (r"body\.\d", ["body.0", "body.2"]),
        (r"conv|head", ["conv", "head"]),
    ],
)
def test_target_modules_by_list_and_regex(targets, expected):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=2, target_modules=targets))
    assert sorted(model.adapters()) == expected


def test_exclude_and_modules_to_save_are_not_adapted():
    cfg = GeoLoRAConfig(r=2, exclude_modules=["conv"], modules_to_save=["body"])
    model = get_geolora_model(make_net(), cfg)
    assert sorted(model.adapters()) == ["head"]
    assert model.base_model.body[0].weight.requires_grad


def test_clear_errors():
    with pytest.raises(ValueError, match="matches no nn.Linear or nn.Conv2d.*body.0"):
        get_geolora_model(make_net(), GeoLoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        get_geolora_model(make_net(), GeoLoRAConfig(modules_to_save=["classifier"]))
    capped = get_geolora_model(make_net(), GeoLoRAConfig(r=20, target_modules=["head", "body.0"]))
    assert capped.ranks() == {"body.0": 20, "head": 4}  # a 4×32 layer has full rank 4
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=2))
    with pytest.raises(ValueError, match="already carries adapters"):
        get_geolora_model(model.base_model, GeoLoRAConfig(r=2))
    with pytest.raises(ValueError, match="come from the GeoLoRAConfig"):
        model.make_optimizer(tau=0.5)


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="unknown GeoLoRAConfig keys \\['rank'\\]; valid keys: .*'r'"):
        GeoLoRAConfig.from_dict({"rank": 4})
    for bad, match in [
        ({"r": 0}, "r must be an int >= 1"),
        ({"tau": -1}, "tau must be"),
        ({"budget": 5, "truncation": "local"}, "budget= needs truncation='global'"),
        ({"integrator": "fixed"}, "rank-adaptive"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": "("}, "not a valid regex"),
        ({"r": 8, "max_rank": 4}, "exceeds max_rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            GeoLoRAConfig(**bad)
    cfg = GeoLoRAConfig(r=4, budget=10, target_modules=["a", "b"], modules_to_save=["head"])
    cfg.save_pretrained(tmp_path)
    assert GeoLoRAConfig.from_pretrained(tmp_path) == cfg


def test_print_trainable_parameters(capsys):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=2, modules_to_save=["head"]))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in out and f"all params: {total:,d}" in out
    head = sum(p.numel() for p in model.base_model.head.parameters())
    assert trainable == model.num_adapter_parameters() + head


# ------------------------------------------------------------------ transformers
def tiny_bert_model():
    pytest.importorskip("transformers")
    from dlrt.models import tiny_bert

    return tiny_bert(seed=0).train()


def bert_batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def test_tiny_bert_train_merge_save_load(tmp_path):
    cfg = GeoLoRAConfig(
        r=4, tau=0.1, budget=12, coefficient_steps=1, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model = get_geolora_model(tiny_bert_model(), cfg)
    assert len(model.adapters()) == 4
    assert model.config.num_labels == 2  # attributes fall through to the base model
    opt = model.make_optimizer(lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        model(**bert_batch()).loss.backward()
        opt.step()
        assert step == 0 or sum(model.ranks().values()) <= 12  # the first step grows bases, no truncation
    model.eval()
    inputs = {k: v for k, v in bert_batch().items() if k != "labels"}
    expected = model(**inputs).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = GeoLoRAModel.from_pretrained(tiny_bert_model(), tmp_path)
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_forward_signature_is_the_base_models():
    import inspect

    model = get_geolora_model(tiny_bert_model(), GeoLoRAConfig(r=2, target_modules=["query"]))
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert "labels" in inspect.signature(type(model).forward).parameters
    assert isinstance(model, GeoLoRAModel)


def _trainer(model, tmp_path, optimizers, callbacks):
    transformers = pytest.importorskip("transformers")
    data = [{k: v[i] for k, v in bert_batch(16).items()} for i in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers, callbacks=callbacks)


def test_transformers_trainer_runs_the_integrator(tmp_path):
    from dlrt.peft import GeoLoRACallback

    model = get_geolora_model(tiny_bert_model(), GeoLoRAConfig(r=4, tau=0.2, target_modules=["query", "value"]))
    opt = model.make_optimizer(lr=1e-2)
    callback = GeoLoRACallback(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _trainer(model, tmp_path, (opt, None), [callback]).train()
    assert opt.steps == 4
    assert callback.rank_history and callback.rank_history[-1][1] == sum(model.ranks().values())


def test_callback_warns_when_trainer_uses_its_own_optimizer(tmp_path):
    from dlrt.peft import GeoLoRACallback

    model = get_geolora_model(tiny_bert_model(), GeoLoRAConfig(r=4, target_modules=["query"]))
    with pytest.warns(RuntimeWarning, match="integrator will NEVER run"):
        _trainer(model, tmp_path, (None, None), [GeoLoRACallback()]).train()


def test_coefficient_steps_truncate_once_per_cycle_and_finish_cycle():
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=4, tau=0.2, budget=6, coefficient_steps=3))
    opt = model.make_optimizer(lr=1e-2)
    x, y = batch()
    totals = []
    # Cycle 1: the growth step, two S-steps, truncation; cycle 2: augmentation, an S-step, ...
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        totals.append(sum(model.ranks().values()))
    assert totals[0] == totals[1] == 4 * 4 and totals[2] <= 6  # truncated at the end of the cycle
    assert totals[3] > totals[2] and totals[4] == totals[3]  # augmented again, then frozen bases
    assert opt.phase == 2
    opt.finish_cycle()
    assert opt.phase == 0 and sum(model.ranks().values()) <= 6


@pytest.mark.parametrize("integrator", ["parallel", "bug", "abc"])
@pytest.mark.parametrize("optimizer, lr", [("geo-adam", 1e-2), ("geo-heavyball", 5e-4)])
def test_adapters_train_with_the_geometric_optimizers(integrator, optimizer, lr):
    # Fresh adapters (zero core on placeholder bases) grow and train; the loss goes down, the base stays frozen.
    base = make_net()
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "head" not in k}
    config = GeoLoRAConfig(r=4, tau=0.1, lora_alpha=128, integrator=integrator, modules_to_save=["head"])
    model = get_geolora_model(base, config)
    opt = model.make_optimizer(optimizer, lr=lr)
    x, y = batch()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # geo-adam at 1e-2 oscillates on this toy problem: judge the last five steps, not the last one
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]
    assert all(0 < r <= 8 for r in model.ranks().values())
    for name, a in model.adapters().items():
        assert float(a.lora.S.detach().abs().sum()) > 0, name  # every adapter grew and moved
    state = model.base_model.state_dict()
    for k, v in frozen.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if key in state:
            assert torch.equal(state[key], v), k


def test_default_budget_is_lora_r_parameters_and_the_head_learns_faster():
    targets = ["conv", "body.0", "body.2"]
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=6, modules_to_save=["head"], target_modules=targets))
    # conv is 8 × 27 (full rank 8), body.0 32 × 128, body.2 32 × 32: r = 6 fits every one; LoRA r = 6 stores
    # 6 (n + m) per adapter
    lora_r = 6 * (8 + 27) + 6 * (32 + 128) + 6 * (32 + 32)
    assert model.geolora_config.budget_unit == "params" and model.budget == lora_r == 1554
    opt = model.make_optimizer(lr=2e-3)
    assert opt.lowrank_group["budget"] == lora_r and opt.rule.name == "geo-adam"
    lowrank, dense = opt.param_groups
    assert lowrank["lr"] == 2e-3 and dense["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in dense["params"]} == {id(p) for p in model.base_model.head.parameters()}
    x, y = batch()
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.finish_cycle()  # (inside a cycle the bases are augmented; the budget holds at each truncation)
    assert model.num_adapter_parameters() <= lora_r
    # A budget given counts ranks (as it always did), as does budget_unit="rank" without one (r per adapter);
    # local truncation has none, and a small layer counts its full rank.
    given = GeoLoRAConfig(r=6, budget=9)
    assert given.budget_unit == "rank" and get_geolora_model(make_net(), given).budget == 9
    by_rank = GeoLoRAConfig(r=6, budget_unit="rank", target_modules=targets)
    assert get_geolora_model(make_net(), by_rank).budget == 3 * 6
    local = GeoLoRAConfig(r=6, truncation="local")
    assert local.budget_unit == "rank" and get_geolora_model(make_net(), local).budget is None
    small = GeoLoRAConfig(r=6, budget_unit="rank", target_modules=["head", "body.2"])
    assert get_geolora_model(make_net(), small).budget == 4 + 6
    # The ratio scales with the schedule, as the dense group's own lr.
    opt = get_geolora_model(make_net(), GeoLoRAConfig(r=2, modules_to_save=["head"])).make_optimizer(
        lr=1e-3, modules_to_save_lr_ratio=3.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1.5e-3])
    del sched


def test_a_budget_in_parameters_defaults_to_lora_r_and_holds_over_training(tmp_path):
    config = GeoLoRAConfig(r=6, budget_unit="params", target_modules=["conv", "body.0", "body.2", "head"])
    model = get_geolora_model(make_net(), config)
    # LoRA r = 6 stores 6·(n + m) per n×m adapter; head (4×32) has full rank 4, so it counts 4.
    lora = 6 * (8 + 27) + 6 * (32 + 128) + 6 * (32 + 32) + 4 * (4 + 32)
    assert model.budget == lora == 1698
    assert get_geolora_model(make_net(), GeoLoRAConfig(r=6, budget=9)).budget == 9  # ranks, as before
    opt = model.make_optimizer(lr=2e-2)
    assert (opt.lowrank_group["budget"], opt.lowrank_group["budget_unit"]) == (lora, "params")
    assert model.num_adapter_parameters() > lora  # at rank r the cores' r² come on top of LoRA's count
    x, y = batch()

    def held(model, opt):
        counts = []
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            counts.append(model.num_adapter_parameters())
        return counts

    # Step 1 grows the bases from the gradient at rank r (no truncation); every truncation after it
    # keeps U, S, V of all adapters within LoRA's parameters.
    in_params = held(model, opt)
    assert all(h <= lora for h in in_params[1:]), in_params
    assert model.ranks()["conv"] == 8  # the cheapest adapter (8×27) took its full rank
    # Counted in ranks (r per adapter), the same training ends above LoRA's parameters here.
    by_rank = get_geolora_model(make_net(), dataclasses.replace(config, budget_unit="rank"))
    assert max(held(by_rank, by_rank.make_optimizer(lr=2e-2))[1:]) > lora
    # The unit is part of the adapter config, and checked there.
    model.save_pretrained(tmp_path / "ad")
    assert GeoLoRAModel.from_pretrained(make_net(), tmp_path / "ad").geolora_config.budget_unit == "params"
    with pytest.raises(ValueError, match="budget_unit must be one of"):
        GeoLoRAConfig(budget_unit="parameters")
    with pytest.raises(ValueError, match="budget_unit='params' prices the ranks against a budget"):
        GeoLoRAConfig(truncation="local", budget_unit="params")


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan")])
def test_bad_modules_to_save_lr_ratio_is_refused_before_anything_changes(ratio):
    model = get_geolora_model(make_net(), GeoLoRAConfig(r=2, modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save_lr_ratio"):
        model.make_optimizer(lr=1e-3, modules_to_save_lr_ratio=ratio)
    with pytest.raises(ValueError, match="modules_to_save_lr_ratio="):
        model.make_optimizer(lr=1e-3, dense_lr=1e-2)


def test_an_update_layer_without_scale_is_scaled_on_its_output():
    """A low-rank type registered without forward(x, scale=) still gets the adapter's scaling (on its output)."""

    class NoScale(LowRankLinear):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(copy.deepcopy(lin), 3, scaling=2.5)
    with torch.no_grad():
        adapter.lora.S.copy_(torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = lin(x) + 2.5 * x @ adapter.lora.matrix().detach().T
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
    adapter.lora.__class__ = NoScale
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
