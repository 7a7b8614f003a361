import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankConv2d, LowRankLinear

from .helpers import DT


def _dense_grads(dense, x, loss_fn):
    x = x.detach().clone().requires_grad_()
    loss_fn(dense(x)).backward()
    return x.grad


def _loss(y):
    return (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


def _check_projected(layer, dense, x):
    layer.grad_request = frozenset({"K", "L"})
    x = x.clone().requires_grad_()
    y = layer(x)
    _loss(y).backward()
    gx_dense = _dense_grads(dense, x, _loss)
    G = dense.weight.grad.reshape(dense.weight.shape[0], -1)
    U, V = layer.U.detach(), layer.V.detach()
    gK, gL, gS = layer.projected_grads()
    tol = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(gK, G @ V, **tol)
    torch.testing.assert_close(gL, G.T @ U, **tol)
    torch.testing.assert_close(gS, U.T @ G @ V, **tol)
    torch.testing.assert_close(x.grad, gx_dense, **tol)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **tol)
    assert layer.U.grad is None and layer.V.grad is None  # the integrator moves U, V; no gradient step


@pytest.mark.parametrize("route", ["thin", "dense"])
def test_linear_projected_gradients_equal_dense_formulas(route):
    layer = LowRankLinear(13, 9, rank=4, dtype=DT)
    layer.contraction = route
    _check_projected(layer, layer.to_dense(), torch.randn(3, 5, 13, dtype=DT))


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=0, dilation=1),
        dict(stride=2, padding=1, dilation=1),
        dict(stride=(2, 1), padding=(2, 0), dilation=2),
        dict(stride=1, padding="same", dilation=2),
        dict(stride=1, padding="valid"),
        dict(stride=2, padding=1, padding_mode="reflect"),
        dict(stride=1, padding=(1, 2), padding_mode="circular", dilation=(1, 2)),
    ],
)
@pytest.mark.parametrize("route", ["thin", "dense"])
def test_conv_projected_gradients_equal_dense_formulas(kw, route):
    layer = LowRankConv2d(3, 7, (3, 2), rank=4, dtype=DT, **kw)
    layer.contraction = route
    dense = layer.to_dense()
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-12, rtol=0)
    _check_projected(layer, dense, x)


@pytest.mark.parametrize("route", ["thin", "dense"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_output_scale_equals_the_scaled_dense_layer(kind, route):
    """``layer(x, scale=s)`` is the dense layer with weight ``s·W`` (and the same bias): output, input
    gradient and projected gradients of ``s·G``, float64."""
    if kind == "linear":
        layer, x = LowRankLinear(13, 9, rank=4, dtype=DT), torch.randn(3, 5, 13, dtype=DT)
    else:
        layer, x = LowRankConv2d(3, 7, 3, rank=4, dtype=DT, padding=1), torch.randn(2, 3, 6, 5, dtype=DT)
    layer.contraction = route
    dense = layer.to_dense()
    with torch.no_grad():
        dense.weight.mul_(2.5)
    layer.grad_request = frozenset({"K", "L"})
    x = x.requires_grad_()
    y = layer(x, scale=2.5)
    torch.testing.assert_close(y, dense(x), atol=1e-12, rtol=0)
    _loss(y).backward()
    gx_dense = _dense_grads(dense, x, _loss)
    G = 2.5 * dense.weight.grad.reshape(dense.weight.shape[0], -1)
    U, V = layer.U.detach(), layer.V.detach()
    tol = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(layer.grad_K, G @ V, **tol)
    torch.testing.assert_close(layer.grad_L, G.T @ U, **tol)
    torch.testing.assert_close(layer.S.grad, U.T @ G @ V, **tol)
    torch.testing.assert_close(x.grad, gx_dense, **tol)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **tol)


@pytest.mark.parametrize("route", ["thin", "dense"])
def test_plain_mode_gives_the_true_factor_gradients(route):
    layer = LowRankLinear(6, 5, rank=3, dtype=DT)
    layer.contraction = route
    x = torch.randn(4, 6, dtype=DT)
    U, S, V = (p.detach().clone().requires_grad_() for p in (layer.U, layer.S, layer.V))
    _loss(x @ V @ S.T @ U.T + layer.bias.detach()).backward()
    _loss(layer(x)).backward()
    for mine, ref in ((layer.U, U), (layer.S, S), (layer.V, V)):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-12, rtol=0)
    assert layer.grad_K is None and layer.grad_L is None


def test_projected_gradients_accumulate_over_backward_calls():
    layer = LowRankLinear(6, 5, rank=2, dtype=DT)
    layer.grad_request = frozenset({"K", "L"})
    x = torch.randn(4, 6, dtype=DT)
    _loss(layer(x)).backward()
    once = layer.grad_K.clone()
    _loss(layer(x)).backward()
    torch.testing.assert_close(layer.grad_K, 2 * once)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_layers_equal_their_dense_twins(bias):
    lin = nn.Linear(6, 4, bias=bias, dtype=DT)
    low = LowRankLinear.from_linear(lin, rank=4)
    x = torch.randn(5, 6, dtype=DT)
    torch.testing.assert_close(low(x), lin(x), atol=1e-12, rtol=0)
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=bias, dtype=DT)
    lowc = LowRankConv2d.from_conv(conv, rank=5)
    xc = torch.randn(2, 2, 6, 6, dtype=DT)
    torch.testing.assert_close(lowc(xc), conv(xc), atol=1e-12, rtol=0)
    torch.testing.assert_close(lowc(xc[0]), conv(xc[0]), atol=1e-12, rtol=0)  # unbatched input


def test_from_linear_is_the_best_rank_r_approximation():
    lin = nn.Linear(20, 12, dtype=DT)
    s = torch.linalg.svdvals(lin.weight.detach())
    low = LowRankLinear.from_linear(lin, rank=5)
    err = torch.linalg.matrix_norm(low.weight - lin.weight.detach(), ord=2)
    torch.testing.assert_close(err, s[5], atol=1e-12, rtol=0)
    eye = torch.eye(5, dtype=DT)
    torch.testing.assert_close(low.U.T @ low.U, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(low.V.T @ low.V, eye, atol=1e-12, rtol=0)


def test_from_linear_with_tau_picks_the_rank_by_the_truncation_rule():
    U = torch.linalg.qr(torch.randn(10, 10, dtype=DT))[0]
    V = torch.linalg.qr(torch.randn(8, 8, dtype=DT))[0]
    sigma = torch.tensor([4.0, 2.0, 1.0, 1e-3, 1e-4, 0, 0, 0], dtype=DT)
    lin = nn.Linear(8, 10, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(U[:, :8] @ torch.diag(sigma) @ V.T)
    assert LowRankLinear.from_linear(lin, tau=0.01).rank == 3
    assert LowRankLinear.from_linear(lin, rank=2, tau=0.01).rank == 2  # tau's rank, capped by rank


def test_default_init_is_a_truncated_default_linear():
    layer = LowRankLinear(600, 500, rank=16)  # randomized SVD path
    assert layer.rank == 16
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(16), atol=1e-5, rtol=0)
    sigma = torch.diagonal(layer.S)
    assert (sigma > 0).all() and (sigma[:-1] >= sigma[1:]).all()


def test_to_dense_and_weight_shapes():
    conv = LowRankConv2d(3, 6, 3, rank=2, stride=2, padding=1)
    assert conv.weight.shape == (6, 3, 3, 3)
    dense = conv.to_dense()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(dense(x), conv(x), atol=1e-5, rtol=1e-5)
    lin = LowRankLinear(4, 3, rank=2)
    assert lin.weight.shape == (3, 4)
    assert lin.num_parameters() == 3 * 2 + 2 * 2 + 4 * 2 + 3
    assert lin.dense_num_parameters() == 3 * 4 + 3


@pytest.mark.parametrize("rank", [0, -1, 5])
def test_bad_rank_is_a_clear_error(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 6, rank=rank)
    with pytest.raises(ValueError, match="rank"):
        LowRankConv2d(1, 4, 2, rank=rank)


def test_rank_type_and_bounds_errors():
    with pytest.raises(TypeError, match="rank"):
        LowRankLinear(4, 6, rank=2.5)
    with pytest.raises(ValueError, match="min_rank"):
        LowRankLinear(4, 6, rank=2, min_rank=3, max_rank=2)
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(4, 4, 3, rank=2, groups=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv2d(1, 1, 1), rank=1)
    with pytest.raises(ValueError, match="rank=, tau="):
        LowRankLinear.from_linear(nn.Linear(3, 3))


@pytest.mark.parametrize("route", ["thin", "dense"])
def test_bf16_autocast_forward_and_backward(route):
    layer = LowRankLinear(16, 8, rank=4)
    conv = LowRankConv2d(2, 4, 3, rank=2, padding=1)
    for mod, x in ((layer, torch.randn(3, 16)), (conv, torch.randn(2, 2, 5, 5))):
        mod.contraction = route
        mod.grad_request = frozenset({"K", "L"})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert mod.S.grad.dtype == torch.float32 and mod.grad_K.dtype == torch.float32
        assert mod.grad_L.dtype == torch.float32 and mod.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("route", ["thin", "dense"])
@pytest.mark.parametrize(
    "make", [lambda: LowRankLinear(7, 6, 2, dtype=DT), lambda: LowRankConv2d(2, 6, 3, 2, dtype=DT)]
)
def test_project_grad_contracts_the_recorded_passes_in_any_bases(make, route):
    # Lᵀ G R for bases other than the layer's, G summed over two backward calls (what bug's S-step reads).
    layer = make()
    layer.contraction = route
    dense = layer.to_dense()
    layer.grad_request = frozenset({"K", "L", "X"})
    xs = [torch.randn(4, 7, dtype=DT) if isinstance(layer, LowRankLinear) else torch.randn(2, 2, 5, 5, dtype=DT)]
    xs.append(torch.randn_like(xs[0]))
    for x in xs:
        _loss(layer(x)).backward()
        _loss(dense(x)).backward()
    G = dense.weight.grad.reshape(layer.out_dim, -1)
    L, R = torch.randn(layer.out_dim, 3, dtype=DT), torch.randn(layer.in_dim, 5, dtype=DT)
    torch.testing.assert_close(layer.project_grad(L, R), L.T @ G @ R, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.project_grad(L, None), L.T @ G, atol=1e-10, rtol=1e-10)  # abc's Ũᵀ G
    layer.clear_pass()
    assert layer.project_grad(L, R) is None


def test_the_cheaper_route_is_chosen_by_shape_and_can_be_forced():
    # LeNet5's conv1 (1→20, 5×5, rank 14): the 20×25 kernel is cheaper than rank-14 thin products;
    # its fc1 (800→500, rank 20) is not.
    conv1 = LowRankConv2d(1, 20, 5, rank=14)
    fc1 = LowRankLinear(800, 500, rank=20)
    assert conv1.uses_dense_kernel(torch.randn(128, 1, 28, 28))
    assert not fc1.uses_dense_kernel(torch.randn(128, 800))
    fc1.contraction = "dense"
    assert fc1.uses_dense_kernel(torch.randn(128, 800))
    with pytest.raises(ValueError, match="contraction must be 'auto', 'thin' or 'dense'"):
        fc1.contraction = "fast"


def test_set_factors_changes_rank_after_a_graph_was_kept():
    layer = LowRankLinear(6, 5, rank=2)
    kept = layer(torch.randn(3, 6)).sum()  # keeps the autograd graph (and the leaves' accumulators) alive
    kept.backward(retain_graph=True)
    layer.set_factors(torch.linalg.qr(torch.randn(5, 4))[0], torch.eye(4), torch.linalg.qr(torch.randn(6, 4))[0])
    assert layer.rank == 4
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.S.grad.shape == (4, 4)
    assert dlrt.ranks(nn.Sequential(layer)) == {"0": 4}


def test_an_overflow_in_G_V_alone_makes_S_grad_non_finite():
    # U has no weight on output 0, so ΔU (and with it Uᵀ G V and Gᵀ U) ignores that output, while
    # G V = Δᵀ (X V) overflows there. S.grad must carry the overflow: GradScaler checks only .grad.
    layer = LowRankLinear(6, 5, 2, bias=False)
    U = torch.zeros(5, 2)
    U[1, 0] = U[2, 1] = 1.0
    layer.set_factors(U, torch.eye(2), dlrt.linalg.orth(torch.randn(6, 2)))
    layer.grad_request = frozenset({"K", "L"})
    x = torch.randn(16, 6)
    dy = torch.zeros(16, 5)
    dy[:, 0] = 3e38
    layer(x).backward(dy)
    assert not torch.isfinite(layer.grad_K).all() and torch.isfinite(layer.grad_L).all()
    assert torch.isnan(layer.S.grad).all()
    # Finite projected gradients leave S.grad as it was.
    layer.zero_grad()
    layer.grad_K = layer.grad_L = None
    dy[:, 0] = 1.0
    layer(x).backward(dy)
    torch.testing.assert_close(layer.S.grad, layer.U.detach().T @ dy.T @ x @ layer.V.detach())
