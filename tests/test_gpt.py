"""The decoder-only transformer (dlrt.models.gpt): shapes, causality, the tied head, conversion and a step."""

import copy

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankLinear
from dlrt.models import GPT, GPT_SIZES, get_model, list_models, model_kind

from .helpers import DT, ref_augment

PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj")


def small(**kw):
    """A GPT small enough for float64 references."""
    cfg = {"vocab_size": 13, "context": 6, "d_model": 8, "n_layers": 2, "n_heads": 2, "mlp_ratio": 2}
    return GPT(**{**cfg, **kw})


def test_registered_sizes_and_parameter_count():
    assert list_models("language") == ["gpt-large", "gpt-medium", "gpt-small", "gpt-tiny"]
    assert all(model_kind(f"gpt-{s}") == "language" for s in GPT_SIZES) and model_kind("mlp") == "classifier"
    model = get_model("gpt-tiny")
    # per block: 4·(256² + 256) + (256·1024 + 1024) + (1024·256 + 256) + 2 LayerNorms of 2·256;
    # token and position embeddings 256·256 + 128·256; final norm 2·256; the tied head adds nothing.
    block = 4 * (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256) + 4 * 256
    assert sum(p.numel() for p in model.parameters()) == 4 * block + 256 * 256 + 128 * 256 + 512 == 3_257_856
    assert model.input_shape == (128,) and model.context == 128
    assert get_model("gpt-tiny", context=32).input_shape == (32,)


def test_forward_shape_and_tied_head():
    model = small()
    x = torch.randint(0, 13, (3, 5))
    assert model(x).shape == (3, 5, 13)
    assert model.head.weight is model.tok.weight
    # the head's gradient reaches the embedding: one parameter, both uses
    model(x).sum().backward()
    assert model.tok.weight.grad is not None and model.head.weight.grad is model.tok.weight.grad


def test_causal_a_future_token_leaves_earlier_logits_unchanged():
    model = small().to(DT).eval()
    x = torch.randint(0, 13, (2, 6))
    y = x.clone()
    y[:, 4] = (y[:, 4] + 1) % 13
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-12)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-6  # and the token itself does matter


def test_bad_inputs_and_settings_name_the_problem():
    model = small()
    with pytest.raises(ValueError, match=r"integer token ids, got a torch.float32 tensor of shape \(2, 3\)"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="7 tokens per sequence, more than its context of 6"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model=10 is not a multiple of n_heads=4"):
        GPT(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="GPT has no setting width; valid: vocab_size"):
        GPT(width=3)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        GPT(n_layers=0)


def test_convert_makes_the_projections_low_rank_and_leaves_embeddings_norms_and_tied_head_dense():
    model = get_model("gpt-tiny", n_layers=2)
    dlrt.convert(model, rank=8)  # no exclude: the tied head stays dense by itself
    expected = {f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(dlrt.ranks(model)) == expected
    assert all(r == 8 for r in dlrt.ranks(model).values())
    assert isinstance(model.head, nn.Linear) and model.head.weight is model.tok.weight
    assert isinstance(model.tok, nn.Embedding) and isinstance(model.pos, nn.Embedding)
    norms = [m for n, m in model.named_modules() if n.endswith(("ln1", "ln2", "ln_f"))]
    assert len(norms) == 5 and all(isinstance(m, nn.LayerNorm) for m in norms)
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    with pytest.raises(ValueError, match="layer 'head' is tied to 'tok' \\(they share a parameter\\)"):
        dlrt.convert(get_model("gpt-tiny", n_layers=1), rank=8, target_modules=["head"])


def test_full_rank_conversion_computes_the_same_function():
    model = small().to(DT)
    x = torch.randint(0, 13, (2, 6))
    before = model(x)
    dlrt.convert(model, rank=1.0)
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-12)


def test_parallel_step_on_a_low_rank_gpt_matches_the_float64_dense_reference():
    # One backward through the whole transformer gives every projection its dense gradient G;
    # the parallel integrator (τ = 0: nothing truncated) must land on U₀,Ŝ,V₀ augmented by G V₀ and Gᵀ U₀,
    # and every dense parameter (embeddings, tied head, norms, biases) on p − lr·∇p.
    lr, r = 0.3, 2
    torch.manual_seed(1)
    model = small().to(DT)
    dlrt.convert(model, rank=r, init="svd")
    x, y = torch.randint(0, 13, (4, 6)), torch.randint(0, 13, (4, 6))

    def loss_of(m):
        return nn.functional.cross_entropy(m(x).reshape(-1, 13), y.reshape(-1))

    twin = dlrt.to_dense(copy.deepcopy(model))
    loss_of(twin).backward()
    layers = dict(dlrt.lowrank_layers(model))
    before = {n: (m.U.detach().clone(), m.S.detach().clone(), m.V.detach().clone()) for n, m in layers.items()}
    grads = {n: twin.get_submodule(n).weight.grad for n in layers}
    dense_before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    dense_grads = {n: p.grad for n, p in twin.named_parameters()}

    opt = dlrt.DLRTOptimizer(model, integrator="parallel", optimizer="sgd", lr=lr, tau=0.0, tau_mode="relative")

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    opt.step(closure)
    for name, layer in layers.items():
        U0, S0, V0 = before[name]
        G0 = grads[name]
        U_new = ref_augment(U0, G0 @ V0)[:, r:]
        V_new = ref_augment(V0, G0.T @ U0)[:, r:]
        S_hat = torch.zeros(r + U_new.shape[1], r + V_new.shape[1], dtype=DT)
        S_hat[:r, :r] = S0 - lr * U0.T @ G0 @ V0
        S_hat[:r, r:] = -lr * U0.T @ G0 @ V_new
        S_hat[r:, :r] = -lr * U_new.T @ G0 @ V0
        W = torch.cat([U0, U_new], 1) @ S_hat @ torch.cat([V0, V_new], 1).T
        torch.testing.assert_close(layer.matrix().detach(), W, atol=1e-10, rtol=1e-10, msg=name)
        assert layer.rank == 2 * r
    params = dict(model.named_parameters())
    checked = 0
    for name, p0 in dense_before.items():
        owner = name.rsplit(".", 1)[0]
        if owner in layers and name.endswith("weight"):
            continue
        torch.testing.assert_close(params[name].detach(), p0 - lr * dense_grads[name], atol=1e-12, rtol=0, msg=name)
        checked += 1
    # tok (= head), pos, 2·(ln1, ln2) weight+bias, ln_f weight+bias, and the 12 projections' biases
    assert checked == 2 + 2 * 4 + 2 + 12
    assert model.head.weight is model.tok.weight


@pytest.mark.parametrize("integrator", ["bug", "abc", "fixed"])
def test_every_integrator_trains_a_low_rank_gpt(integrator):
    torch.manual_seed(0)
    model = get_model("gpt-tiny", n_layers=1, d_model=32, n_heads=2, context=16)
    dlrt.convert(model, rank=4)
    opt = dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="adam", lr=1e-2)
    x = torch.randint(0, 256, (4, 17))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(4)]
    assert losses[-1] < losses[0] - 0.3, losses
    for name, layer in dlrt.lowrank_layers(model):
        assert isinstance(layer, LowRankLinear)
        eye = torch.eye(layer.rank)
        torch.testing.assert_close(layer.U.detach().T @ layer.U.detach(), eye, atol=1e-5, rtol=0, msg=name)


def test_generate_extends_deterministically_and_greedy_is_the_argmax():
    model = small().eval()
    prompt = torch.randint(0, 13, (2, 3))
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 11) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    greedy = model.generate(prompt, 1, temperature=0)
    assert torch.equal(greedy[:, 3], model(prompt)[:, -1].argmax(-1))
    top1 = model.generate(prompt, 1, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)
    assert model.generate(prompt, 10).shape == (2, 13)  # longer than the context: reads the last 6
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(prompt, 1, top_k=0)
