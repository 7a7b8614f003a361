"""TuckerConv2d (a conv kernel in Tucker format) and the N-mode helpers of dlrt.linalg, against dense references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import TuckerConv2d, linalg
from dlrt.layers.tucker import mode_coordinates

from .helpers import DT, ref_orth, ref_rank

TOL = {"atol": 1e-10, "rtol": 1e-10}

# nn.Conv2d's own note on an even kernel with padding="same" (the reference twin of one geometry).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


def _close(a, b, msg=None):
    # torch.allclose rather than torch.testing.assert_close, whose first call costs a second of imports.
    assert a.shape == b.shape and a.dtype == b.dtype, (msg, a.shape, b.shape, a.dtype, b.dtype)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, **TOL), f"{msg or ''}: max abs error {err:.3g}"


def _rand_orth(n, r):
    return ref_orth(torch.randn(n, r, dtype=DT))


def _conv(in_ch=3, out_ch=7, k=3, **kw):
    return nn.Conv2d(in_ch, out_ch, k, dtype=DT, **kw)


def _ref_mode_product(T, M, mode):
    # An einsum over explicit index letters, independent of tensordot/movedim.
    letters = "abcdefgh"[: T.dim()]
    out = letters.replace(letters[mode], "z")
    return torch.einsum(f"z{letters[mode]},{letters}->{out}", M, T)


def _project(T, mats):
    """T ×_i mats[i] by the einsum reference (None leaves a mode)."""
    for i, M in enumerate(mats):
        if M is not None:
            T = _ref_mode_product(T, M, i)
    return T


def _assert_orthonormal(U):
    _close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype))


# ---------------------------------------------------------------------------------------------- 1. linalg


@pytest.mark.parametrize("mode", range(4))
def test_unfold_is_the_mode_fibres_and_fold_inverts_it(mode):
    T = torch.randn(2, 3, 4, 5, dtype=DT)
    M = linalg.unfold(T, mode)
    assert M.shape == (T.shape[mode], T.numel() // T.shape[mode])
    # Row k of the unfolding holds the slice T[..., k, ...] (other modes in order, row-major).
    for k in range(T.shape[mode]):
        assert torch.equal(M[k], T.select(mode, k).reshape(-1))
    assert torch.equal(linalg.fold(M, mode, T.shape), T)
    W = torch.randn_like(M)
    assert torch.equal(linalg.unfold(linalg.fold(W, mode, T.shape), mode), W)


@pytest.mark.parametrize("mode", range(4))
def test_mode_product_matches_einsum(mode):
    T = torch.randn(2, 3, 4, 5, dtype=DT)
    M = torch.randn(6, T.shape[mode], dtype=DT)
    out = linalg.mode_product(T, M, mode)
    assert out.shape[mode] == 6
    _close(out, _ref_mode_product(T, M, mode))
    # Its unfolding is M times the unfolding of T.
    _close(linalg.unfold(out, mode), M @ linalg.unfold(T, mode))


def test_multi_mode_product_matches_einsum_and_skips_none():
    T = torch.randn(2, 3, 4, 5, dtype=DT)
    mats = [torch.randn(3, 2, dtype=DT), None, torch.randn(6, 4, dtype=DT), torch.randn(2, 5, dtype=DT)]
    _close(linalg.multi_mode_product(T, mats), _project(T, mats))


def test_hosvd_at_full_ranks_reproduces_the_tensor_with_orthonormal_bases():
    T = torch.randn(5, 4, 3, 6, dtype=DT)
    C, bases = linalg.hosvd(T)
    assert tuple(C.shape) == (5, 4, 3, 6)
    for U in bases:
        _assert_orthonormal(U)
    assert (linalg.multi_mode_product(C, bases) - T).abs().max() < 1e-10


def test_hosvd_truncated_bases_are_the_leading_singular_vectors():
    T = torch.randn(5, 4, 3, 6, dtype=DT)
    C, bases = linalg.hosvd(T, (2, 3, 1, 4))
    assert tuple(C.shape) == (2, 3, 1, 4)
    for i, U in enumerate(bases):
        _assert_orthonormal(U)
        P = torch.linalg.svd(linalg.unfold(T, i), full_matrices=False)[0][:, : U.shape[1]]
        _close(U @ U.T, P @ P.T, msg=f"mode {i}")  # same subspace
    _close(C, _project(T, [U.T for U in bases]))


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.4])
def test_hosvd_with_tau_takes_the_truncation_rank_of_every_unfolding(tau):
    # Spectra decaying at a different rate in every mode, so that the rule gives different ranks per mode.
    shape = (6, 5, 4, 7)
    decays = [torch.tensor([q**k for k in range(n)], dtype=DT) for n, q in zip(shape, (0.3, 0.6, 0.9, 0.45))]
    T = _project(torch.randn(*shape, dtype=DT), [_rand_orth(n, n) * d for n, d in zip(shape, decays)])
    C, bases = linalg.hosvd(T, tau=tau)
    expected = tuple(ref_rank(torch.linalg.svdvals(linalg.unfold(T, i)), tau) for i in range(4))
    assert len(set(expected)) > 1 and expected != shape  # the tensor is not trivial for the rule
    assert tuple(C.shape) == expected
    assert tuple(U.shape[1] for U in bases) == expected
    capped = linalg.hosvd(T, tau=tau, max_ranks=(2, None, 1, 3), min_ranks=(1, 3, 1, 1))[0]
    expected_capped = tuple(
        ref_rank(torch.linalg.svdvals(linalg.unfold(T, i)), tau, r_min=lo, r_max=hi)
        for i, (lo, hi) in enumerate(zip((1, 3, 1, 1), (2, None, 1, 3)))
    )
    assert tuple(capped.shape) == expected_capped


def test_hosvd_recovers_a_planted_multilinear_rank():
    core = torch.randn(3, 2, 2, 1, dtype=DT)
    shape = (6, 5, 4, 3)
    T = linalg.multi_mode_product(core, [_rand_orth(n, r) for n, r in zip(shape, core.shape)])
    C, bases = linalg.hosvd(T, tau=1e-8)
    assert tuple(C.shape) == (3, 2, 2, 1)
    assert tuple(U.shape for U in bases) == ((6, 3), (5, 2), (4, 2), (3, 1))
    assert (linalg.multi_mode_product(C, bases) - T).abs().max() < 1e-10


def test_tucker_galerkin_is_the_core_in_the_new_bases():
    shape, old_r, new_r = (6, 5, 4, 3), (3, 2, 2, 1), (4, 3, 2, 2)
    C0 = torch.randn(*old_r, dtype=DT)
    old = [_rand_orth(n, r) for n, r in zip(shape, old_r)]
    new = [_rand_orth(n, r) for n, r in zip(shape, new_r)]
    T = _project(C0, old)
    _close(linalg.tucker_galerkin(new, old, C0), _project(T, [N.T for N in new]))


# ------------------------------------------------------------------------------------ 2. from_conv, forward

GEOMETRIES = {
    "stride2_pad1": dict(k=3, stride=2, padding=1),
    "same_reflect": dict(k=3, padding="same", padding_mode="reflect"),
    "same_even_kernel": dict(k=4, padding="same"),
    "dilation2_circular": dict(k=3, dilation=2, padding=(1, 2), padding_mode="circular"),
    "valid": dict(k=3, padding="valid"),
    "replicate": dict(k=3, padding=2, padding_mode="replicate"),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_from_conv_at_full_ranks_reproduces_the_conv(geometry):
    conv = _conv(3, 7, **GEOMETRIES[geometry])
    layer = TuckerConv2d.from_conv(conv, ranks=(7, 3, *conv.kernel_size))
    assert layer.ranks == layer.full_ranks == (7, 3, conv.kernel_size[0], conv.kernel_size[1])
    assert (layer.weight - conv.weight).abs().max() < 1e-10
    _close(layer.bias, conv.bias)
    for U in layer.bases:
        _assert_orthonormal(U.detach())
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    with torch.no_grad():
        twin = _conv(3, 7, **GEOMETRIES[geometry])
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(conv.bias)
        y = layer(x)
        _close(y, twin(x))
        _close(y, conv(x), msg="the factorization is exact at full rank")
        _close(layer.to_dense()(x), y)


def test_from_conv_unbatched_input():
    conv = _conv(3, 5, 3, padding=1, padding_mode="reflect")
    layer = TuckerConv2d.from_conv(conv, ranks=(5, 3, 3, 3))
    x = torch.randn(3, 6, 7, dtype=DT)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (5, 6, 7)
        _close(y, conv(x))
        _close(y, layer(x[None])[0])


@pytest.mark.parametrize("geometry", ["stride2_pad1", "same_reflect", "dilation2_circular"])
def test_truncated_ranks_compute_the_conv_of_the_reconstructed_kernel(geometry):
    kw = dict(GEOMETRIES[geometry])
    conv = _conv(4, 6, **kw)
    layer = TuckerConv2d.from_conv(conv, ranks=(3, 2, 2, 2))
    assert layer.ranks == (3, 2, 2, 2)
    assert (layer.weight - conv.weight).abs().max() > 1e-3  # really truncated
    # The kernel is the truncated HOSVD of the conv's.
    C, bases = linalg.hosvd(conv.weight.detach(), (3, 2, 2, 2))
    _close(layer.weight, linalg.multi_mode_product(C, bases))
    _close(layer.kernel().detach(), layer.weight)
    x = torch.randn(2, 4, 9, 8, dtype=DT)
    with torch.no_grad():
        y = layer(x)
        dense = layer.to_dense()
        assert isinstance(dense, nn.Conv2d) and dense.padding_mode == conv.padding_mode
        _close(dense.weight, layer.weight)
        _close(dense(x), y)
        if kw.get("padding_mode", "zeros") == "zeros":
            _close(y, F.conv2d(x, layer.weight, layer.bias, conv.stride, conv.padding, conv.dilation))


def test_truncated_ranks_without_bias():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False, dtype=DT)
    layer = TuckerConv2d.from_conv(conv, ranks=(3, 2, 2, 2))
    assert layer.bias is None
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    with torch.no_grad():
        _close(layer(x), F.conv2d(x, layer.weight, None, 1, 1))


def test_from_conv_with_tau_takes_the_truncation_rank_per_mode():
    # A kernel with planted multilinear rank (3, 2, 2, 1): tau=1e-8 finds it.
    core = torch.randn(3, 2, 2, 1, dtype=DT)
    conv = _conv(4, 6, 3)
    with torch.no_grad():
        conv.weight.copy_(linalg.multi_mode_product(core, [_rand_orth(n, r) for n, r in zip((6, 4, 3, 3), core.shape)]))
    layer = TuckerConv2d.from_conv(conv, tau=1e-8)
    assert layer.ranks == (3, 2, 2, 1)
    assert (layer.weight - conv.weight).abs().max() < 1e-10
    # Non-adaptive modes keep full rank.
    fixed = TuckerConv2d.from_conv(conv, tau=1e-8, tucker_modes=(0, 1))
    assert fixed.ranks == (3, 2, 3, 3)


# ------------------------------------------------------------------------------------ 3. plain autograd


def _upstream(y):
    return torch.randn_like(y)


def _backward(y, g):
    """Backward with upstream gradient ``g`` (as ``y.backward(g)``, whose first call imports sympy: a second)."""
    (y * g).sum().backward()


@pytest.mark.parametrize("geometry", ["stride2_pad1", "same_reflect", "dilation2_circular"])
@pytest.mark.parametrize("route", ["thin", "dense"])
def test_plain_autograd_gradients_match_the_dense_composition(geometry, route):
    kw = GEOMETRIES[geometry]
    conv = _conv(4, 6, **kw)
    layer = TuckerConv2d.from_conv(conv, ranks=(3, 2, 2, 2))
    layer.contraction = route
    assert layer.grad_request is None and layer.uses_dense_kernel() == (route == "dense")
    x = torch.randn(2, 4, 9, 8, dtype=DT, requires_grad=True)
    y = layer(x)
    g = _upstream(y)
    _backward(y, g)
    # Reference: autograd through the dense kernel built from copies of the factors.
    C = layer.C.detach().clone().requires_grad_()
    Us = [U.detach().clone().requires_grad_() for U in layer.bases]
    b = layer.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    W = linalg.multi_mode_product(C, Us)
    yr = torch.func.functional_call(layer.to_dense(), {"weight": W, "bias": b}, (xr,))
    _close(y, yr.detach())
    _backward(yr, g)
    _close(layer.C.grad, C.grad, msg="C")
    for i, (U, Ur) in enumerate(zip(layer.bases, Us)):
        assert U.grad is not None
        _close(U.grad, Ur.grad, msg=f"U{i}")
    _close(layer.bias.grad, b.grad, msg="bias")
    _close(x.grad, xr.grad, msg="x")


def test_plain_autograd_with_f_conv2d_reference_and_unbatched_input():
    layer = TuckerConv2d(3, 5, 3, (4, 2, 3, 2), stride=1, padding=1, dtype=DT)
    x = torch.randn(3, 6, 7, dtype=DT)
    y = layer(x)
    g = _upstream(y)
    _backward(y, g)
    C = layer.C.detach().clone().requires_grad_()
    Us = [U.detach().clone().requires_grad_() for U in layer.bases]
    _backward(F.conv2d(x, linalg.multi_mode_product(C, Us), layer.bias.detach(), 1, 1), g)
    _close(layer.C.grad, C.grad)
    for U, Ur in zip(layer.bases, Us):
        _close(U.grad, Ur.grad)


# ------------------------------------------------------------------------------ 4. integrator gradients


def _dense_kernel_grad(layer, x, g):
    """G: the gradient of <conv(x, W), g> in the dense kernel W = layer.weight (a leaf)."""
    dense = layer.to_dense()
    dense.weight.requires_grad_(True)
    dense.zero_grad()
    xr = x.detach().clone().requires_grad_()
    _backward(dense(xr), g)
    return dense.weight.grad.detach().clone(), xr.grad


def _expected_mode_grad(G, bases, C, i):
    mats = [None if j == i else U.detach().T for j, U in enumerate(bases)]
    return linalg.unfold(_project(G, mats), i) @ mode_coordinates(C, i)


def _tucker_layer(geometry="same_reflect", ranks=(3, 2, 2, 2), **kw):
    return TuckerConv2d.from_conv(_conv(4, 6, **GEOMETRIES[geometry]), ranks=ranks, **kw)


@pytest.mark.parametrize("geometry", ["stride2_pad1", "same_reflect", "dilation2_circular", "same_even_kernel"])
@pytest.mark.parametrize("route", ["thin", "dense"])
def test_integrator_gradients_are_the_projected_kernel_gradient(geometry, route):
    layer = _tucker_layer(geometry)
    layer.contraction = route
    layer.grad_request = frozenset({"K", "L", "X"})
    x = torch.randn(2, 4, 9, 8, dtype=DT, requires_grad=True)
    y = layer(x)
    g = _upstream(y)
    _backward(y, g)
    G, gx = _dense_kernel_grad(layer, x, g)
    bases = [U.detach() for U in layer.bases]
    C = layer.C.detach()
    _close(layer.C.grad, _project(G, [U.T for U in bases]), msg="C.grad")
    for i in range(4):
        assert layer.grad_modes[i] is not None
        assert layer.grad_modes[i].shape == (layer.mode_sizes[i], mode_coordinates(C, i).shape[1])
        _close(layer.grad_modes[i], _expected_mode_grad(G, bases, C, i), msg=f"grad_modes[{i}]")
    for U in layer.bases:
        assert U.grad is None
    _close(x.grad, gx, msg="x.grad")
    _close(layer.bias.grad, g.sum((0, 2, 3)), msg="bias.grad")
    # The gradient in other bases, of other ranks, from the recorded pass.
    other = [_rand_orth(n, r) for n, r in zip(layer.mode_sizes, (5, 3, 1, 2))]
    _close(layer.project_grad(other), _project(G, [B.T for B in other]), msg="project_grad")
    assert len(layer.pass_inputs) == 1
    _close(layer.project_grad(other, records=layer.pass_inputs), layer.project_grad(other))
    assert layer.project_grad(other, records=[]) is None


def test_mode_coordinates_is_the_orthonormal_factor_of_the_transposed_unfolding():
    C = torch.randn(3, 2, 2, 2, dtype=DT)
    for i in range(4):
        M = linalg.unfold(C, i).T
        Q = mode_coordinates(C, i)
        assert Q.shape == (M.shape[0], min(M.shape))
        _assert_orthonormal(Q)
        _close(Q @ (Q.T @ M), M)  # spans range(Mat_i(C)ᵀ)
        R = Q.T @ M
        _close(torch.triu(R), R)
        assert (torch.diagonal(R) >= 0).all()


def test_integrator_gradients_accumulate_over_two_passes():
    layer = _tucker_layer("dilation2_circular")
    layer.grad_request = frozenset({"K", "L", "X"})
    bases = [U.detach() for U in layer.bases]
    C = layer.C.detach()
    Gs = []
    for _ in range(2):
        x = torch.randn(2, 4, 9, 8, dtype=DT)
        y = layer(x)
        g = _upstream(y)
        _backward(y, g)
        Gs.append(_dense_kernel_grad(layer, x, g)[0])
    G = Gs[0] + Gs[1]
    assert len(layer.pass_inputs) == 2
    _close(layer.C.grad, _project(G, [U.T for U in bases]))
    for i in range(4):
        _close(layer.grad_modes[i], _expected_mode_grad(G, bases, C, i), msg=f"grad_modes[{i}]")
    other = [_rand_orth(n, r) for n, r in zip(layer.mode_sizes, (4, 4, 2, 3))]
    _close(layer.project_grad(other), _project(G, [B.T for B in other]))
    _close(layer.project_grad(other, records=layer.pass_inputs[1:]), _project(Gs[1], [B.T for B in other]))
    layer.clear_pass()
    assert layer.grad_modes == [None] * 4 and layer.project_grad(other) is None


def test_only_the_adaptive_modes_get_mode_gradients():
    layer = _tucker_layer("stride2_pad1", tucker_modes=(0, 1))
    assert layer.tucker_modes == (0, 1)
    layer.grad_request = frozenset({"K", "L", "X"})
    x = torch.randn(2, 4, 9, 8, dtype=DT)
    y = layer(x)
    g = _upstream(y)
    _backward(y, g)
    G = _dense_kernel_grad(layer, x, g)[0]
    bases = [U.detach() for U in layer.bases]
    for i in (0, 1):
        _close(layer.grad_modes[i], _expected_mode_grad(G, bases, layer.C.detach(), i))
    assert layer.grad_modes[2] is None and layer.grad_modes[3] is None


def test_x_only_request_records_the_pass_without_mode_gradients():
    layer = _tucker_layer("valid")
    layer.grad_request = frozenset({"X"})
    x = torch.randn(2, 4, 7, 7, dtype=DT)
    y = layer(x)
    g = _upstream(y)
    _backward(y, g)
    G = _dense_kernel_grad(layer, x, g)[0]
    assert layer.grad_modes == [None] * 4
    _close(layer.C.grad, _project(G, [U.detach().T for U in layer.bases]))
    other = [_rand_orth(n, r) for n, r in zip(layer.mode_sizes, (2, 3, 3, 1))]
    _close(layer.project_grad(other), _project(G, [B.T for B in other]))


# ------------------------------------------------------------------------------------------- 5. errors


def test_a_rank_above_the_mode_size_names_the_mode():
    conv = _conv(3, 7, 3)
    with pytest.raises(ValueError, match=r"rank 9 of mode 0 \(out, size 7\)"):
        TuckerConv2d.from_conv(conv, ranks=(9, 2, 2, 2))
    with pytest.raises(ValueError, match=r"rank 4 of mode 2 \(kh, size 3\)"):
        TuckerConv2d(3, 7, 3, (2, 2, 4, 2), dtype=DT)
    with pytest.raises(ValueError, match=r"mode 1 \(in"):
        TuckerConv2d(3, 7, 3, (2, 0, 2, 2), dtype=DT)


def test_a_rank_above_the_product_of_the_others_is_not_a_tucker_rank():
    conv = _conv(3, 7, 3)
    with pytest.raises(ValueError, match=r"not a Tucker rank: mode 0 \(out\) has rank 4"):
        TuckerConv2d.from_conv(conv, ranks=(4, 1, 1, 1))
    with pytest.raises(ValueError, match=r"not a Tucker rank: mode 3 \(kw\)"):
        TuckerConv2d(3, 7, 3, (1, 1, 1, 2), dtype=DT)


def test_grouped_convolution_is_refused():
    conv = nn.Conv2d(4, 6, 3, groups=2, dtype=DT)
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_conv(conv, ranks=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="groups=1 only"):
        TuckerConv2d(4, 6, 3, 2, groups=2)


@pytest.mark.parametrize("modes", [(0, 4), (1, 1), "01", (-1,), (0.0, 1), 3])
def test_bad_tucker_modes_are_refused(modes):
    with pytest.raises(ValueError, match="tucker_modes must"):
        TuckerConv2d.from_conv(_conv(3, 7, 3), ranks=(2, 2, 2, 2), tucker_modes=modes)


def test_from_conv_needs_ranks_or_tau_and_a_conv2d():
    with pytest.raises(ValueError, match="needs ranks=, tau= or both"):
        TuckerConv2d.from_conv(_conv(3, 7, 3))
    with pytest.raises(TypeError, match="expects nn.Conv2d, got Linear"):
        TuckerConv2d.from_conv(nn.Linear(3, 4), ranks=2)


@pytest.mark.parametrize("ranks", [(2, 2, 2), "2222", 0, 1.5, 0.0, True])
def test_malformed_ranks_are_refused(ranks):
    with pytest.raises(ValueError, match="rank"):
        TuckerConv2d(3, 7, 3, ranks, dtype=DT)


# ------------------------------------------------------------------------------------ 6. sizes and ranks


def test_parameter_counts():
    layer = TuckerConv2d(4, 6, (3, 2), (3, 2, 2, 2), dtype=DT)
    expected = 6 * 3 + 4 * 2 + 3 * 2 + 2 * 2 + 3 * 2 * 2 * 2 + 6
    assert layer.num_parameters() == expected
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())
    assert layer.dense_num_parameters() == 6 * 4 * 3 * 2 + 6
    assert layer.dense_num_parameters() == sum(p.numel() for p in layer.to_dense().parameters())
    no_bias = TuckerConv2d(4, 6, 3, (3, 2, 2, 2), bias=False, dtype=DT)
    assert no_bias.num_parameters() == 6 * 3 + 4 * 2 + 3 * 2 + 3 * 2 + 3 * 2 * 2 * 2
    assert no_bias.dense_num_parameters() == 6 * 4 * 3 * 3


def test_an_int_rank_is_clamped_per_mode():
    conv = nn.Conv2d(3, 16, 5, dtype=DT)
    layer = TuckerConv2d.from_conv(conv, ranks=8)
    assert layer.ranks == (8, 3, 5, 5)
    assert tuple(layer.C.shape) == (8, 3, 5, 5)
    assert tuple(U.shape for U in layer.bases) == ((16, 8), (3, 3), (5, 5), (5, 5))
    assert TuckerConv2d(3, 16, 5, 100, dtype=DT).ranks == (16, 3, 5, 5)
    # Capped by the full rank min(n_i, Π_{j≠i} n_j), not only by the size: 6 outputs of a 2×1×1 input span 2.
    assert TuckerConv2d(2, 6, 1, 2, dtype=DT).ranks == (2, 2, 1, 1)


def test_a_fractional_rank_is_a_share_of_each_mode():
    layer = TuckerConv2d(4, 10, 3, 0.5, dtype=DT)
    assert layer.ranks == (5, 2, 2, 2)
    assert TuckerConv2d(4, 10, 3, 1.0, dtype=DT).ranks == layer.full_ranks == (10, 4, 3, 3)
    assert TuckerConv2d.from_conv(nn.Conv2d(4, 10, 3, dtype=DT), ranks=0.5).ranks == (5, 2, 2, 2)
    # Rounding 0.6 of (9, 3, 3, 1) gives (5, 2, 2, 1), not a Tucker rank (5 > 2·2·1): mode 0 is lowered to 4.
    assert TuckerConv2d(3, 9, (3, 1), 0.6, dtype=DT).ranks == (4, 2, 2, 1)


def test_a_fresh_layer_has_orthonormal_bases_and_the_geometry():
    layer = TuckerConv2d(4, 6, 3, (3, 2, 2, 2), stride=2, padding=1, dtype=DT)
    for U in layer.bases:
        _assert_orthonormal(U.detach())
    assert layer.shape == (6, 36) and layer.rank == 3
    x = torch.randn(1, 4, 8, 8, dtype=DT)
    with torch.no_grad():
        _close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2, 1))
    assert isinstance(dlrt.TuckerConv2d(4, 6, 3, 2), dlrt.FactorizedLayer)


# ----------------------------------------------------------------------------------------------- 7. bf16


def test_bf16_autocast_forward_is_within_bf16_tolerance_of_float32():
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = TuckerConv2d.from_conv(conv, ranks=(6, 4, 3, 3))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 2e-2
    assert err > 0  # it really ran in bf16


def test_auto_contraction_takes_the_cheaper_route():
    # LeNet5's first convolution (1→20, 5×5) in a pass that records mode gradients: the full kernel is cheaper.
    small = TuckerConv2d(1, 20, 5, ranks=(10, 1, 5, 5))
    small.grad_request = frozenset({"K", "L", "X"})
    assert small.uses_dense_kernel()
    # A wide convolution at small channel ranks: the thin products are.
    wide = TuckerConv2d(64, 128, 3, ranks=(8, 8, 3, 3))
    assert not wide.uses_dense_kernel()
    # A pass that records the mode gradients costs the thin route more (its extra core convolutions).
    mid = TuckerConv2d(20, 50, 5, ranks=(20, 20, 5, 5))
    assert not mid.uses_dense_kernel()
    mid.grad_request = frozenset({"K", "L", "X"})
    assert mid.uses_dense_kernel()
    with pytest.raises(ValueError, match="contraction must be 'auto', 'thin' or 'dense'"):
        mid.contraction = "fast"
