"""``TuckerConv2d``: a convolution kernel in Tucker format, one rank per mode (TDLRT).

The kernel ``W`` of shape ``(out, in, kh, kw)`` is held as a core ``C``
(``r₀×r₁×r₂×r₃``) and orthonormal mode bases ``U₀`` (out×r₀), ``U₁`` (in×r₁),
``U₂`` (kh×r₂), ``U₃`` (kw×r₃): ``W = C ×₀ U₀ ×₁ U₁ ×₂ U₂ ×₃ U₃``
(docs/tucker.md). The forward never forms ``W``: a ``1×1`` product with ``U₁ᵀ``
(in → r₁ channels), a ``kh×kw`` convolution with the small kernel
``D = C ×₂ U₂ ×₃ U₃`` (r₁ → r₀ channels) and a ``1×1`` product with ``U₀``
(r₀ → out).

Its backward, driven by an integrator, returns the projected gradients the
Tucker integrators need from thin products of the same activations, never the
kernel gradient ``G``:

* the core gradient ``G ×₀ U₀ᵀ ×₁ U₁ᵀ ×₂ U₂ᵀ ×₃ U₃ᵀ`` in ``C.grad``;
* per adaptive mode ``i`` the K-gradient ``Mat_i(G ×_{j≠i} U_jᵀ) Q_i`` (``n_i×r_i``)
  in ``grad_modes[i]``, where ``Mat_i(C)ᵀ = Q_i R_i`` (the gradient of
  ``K_i = U_i R_iᵀ``, the mode's analogue of a matrix layer's ``K = U S``);
* with ``"X"`` (or K) in the request, its input and output gradient, for
  ``G ×ᵢ B_iᵀ`` in other bases later (:meth:`project_grad`).

For a small kernel (few channels, such as LeNet5's) the full kernel and its
gradient cost less than the thin products: there the layer forms both, as a
matrix layer does (:meth:`TuckerConv2d.uses_dense_kernel`), and projects ``G``.

A matrix layer ``W = U S Vᵀ`` is the 2-mode case: ``C = S``, ``U₀ = U``, ``U₁ = V``,
and ``Mat_0(S)ᵀ = Sᵀ = Q R`` gives ``G V Q``, which spans ``range(G V)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import linalg
from .base import FactorizedLayer, _carry_nonfinite, default_dense_init
from .conv import ConvGeometry, LowRankConv2d, geometry_of, placement_of

MODES = 4
MODE_NAMES = ("out", "in", "kh", "kw")

_channels = LowRankConv2d._channels
_contract = LowRankConv2d._contract


def _fraction_or_int(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, float)) and not isinstance(value, bool)


class _TuckerFunction(torch.autograd.Function):
    """``y = U₀ · conv(U₁ᵀ x, C ×₂ U₂ ×₃ U₃) + b`` with the projected gradients in backward."""

    @staticmethod
    def forward(ctx, x, C, U0, U1, U2, U3, bias, layer):  # type: ignore[override]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            x, C, U0, U1, U2, U3 = (t.to(dt) for t in (x, C, U0, U1, U2, U3))
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            ctx.dense = layer.uses_dense_kernel()
            if ctx.dense:  # the full kernel (tiny) and one convolution; a1, a2 unused
                D = linalg.multi_mode_product(C, [U0, U1, U2, U3])
                a1 = a2 = D
                y = layer._conv(x, D) if bias is None else layer._conv(x, D).add_(bias[:, None, None])
            else:
                D = linalg.multi_mode_product(C, [None, None, U2, U3])  # r₀×r₁×kh×kw
                a1 = _channels(U1.mT, x)  # U₁ᵀ x
                a2 = layer._conv(a1, D)
                y = LowRankConv2d._project_out(a2, U0, bias)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, C, U0, U1, U2, U3, a1, a2, D)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, C, U0, U1, U2, U3, a1, a2, D = ctx.saved_tensors
        layer = ctx.layer
        request = layer.grad_request
        need_x, need_C, n0, n1, n2, n3, need_b, _ = ctx.needs_input_grad
        plain = request is None
        dy = dy.to(x.dtype)
        if ctx.dense:
            return _dense_backward(ctx, layer, x, dy, C, (U0, U1, U2, U3), D)
        b1 = _channels(U0.mT, dy)  # Δ U₀
        gD = layer._conv_weight(a1, D.shape, b1)  # G ×₀ U₀ᵀ ×₁ U₁ᵀ (r₀×r₁×kh×kw)
        gC = linalg.multi_mode_product(gD, [None, None, U2.mT, U3.mT])
        c1 = layer._conv_input(a1.shape, D, b1) if (need_x or (plain and n1)) else None
        gx = _channels(U1, c1) if need_x else None
        gb = dy.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        gU: list[Tensor | None] = [None] * MODES
        if plain:  # true gradients of the factors (plain autograd, e.g. a fixed-rank baseline)
            if n0:
                gU[0] = _contract(dy, a2)
            if n1:
                gU[1] = _contract(x, c1)
            if n2:
                gU[2] = linalg.unfold(gD, 2) @ linalg.unfold(linalg.mode_product(C, U3, 3), 2).mT
            if n3:
                gU[3] = linalg.unfold(gD, 3) @ linalg.unfold(linalg.mode_product(C, U2, 2), 3).mT
        else:
            if "K" in request or "L" in request:
                grads = layer._mode_grads(x, dy, a1, b1, gD, C, U2, U3)
                layer._accumulate(grads)
                gC = _carry_nonfinite(gC, *grads)
            if "X" in request or "K" in request or "L" in request:
                layer.__dict__.setdefault("pass_inputs", []).append((x, dy))
        return gx, (gC if need_C else None), *gU, gb, None


def _dense_backward(ctx: Any, layer: TuckerConv2d, x: Tensor, dy: Tensor, C: Tensor, bases: tuple, W: Tensor) -> tuple:
    """The backward of the dense route: the kernel gradient ``G`` once, then its projections."""
    request = layer.grad_request
    need_x, need_C, *need_U, need_b, _ = ctx.needs_input_grad
    G = layer._conv_weight(x, W.shape, dy)  # out×in×kh×kw
    gx = layer._conv_input(x.shape, W, dy) if need_x else None
    gb = dy.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
    gC = linalg.multi_mode_product(G, [U.mT for U in bases])
    gU: list[Tensor | None] = [None] * MODES
    if request is None:
        for i, need in enumerate(need_U):
            if need:  # ∂L/∂U_i = Mat_i(G ×_{j≠i} U_jᵀ) Mat_i(C)ᵀ
                gU[i] = linalg.unfold(_project_except(G, bases, i), i) @ linalg.unfold(C, i).mT
    else:
        if "K" in request or "L" in request:
            grads: list[Tensor | None] = [None] * MODES
            for i in layer.tucker_modes:
                grads[i] = linalg.unfold(_project_except(G, bases, i), i) @ mode_coordinates(C, i)
            layer._accumulate(grads)
            gC = _carry_nonfinite(gC, *grads)
        if "X" in request or "K" in request or "L" in request:
            layer.__dict__.setdefault("pass_inputs", []).append(G)
    return gx, (gC if need_C else None), *gU, gb, None


def _project_except(G: Tensor, bases: Sequence[Tensor], mode: int) -> Tensor:
    """``G ×_{j≠mode} U_jᵀ``."""
    return linalg.multi_mode_product(G, [None if j == mode else U.mT for j, U in enumerate(bases)])


class TuckerConv2d(ConvGeometry, FactorizedLayer):
    """A 2-D convolution whose kernel is held in Tucker format ``C ×₀ U₀ ×₁ U₁ ×₂ U₂ ×₃ U₃``.

    Supports stride, padding (ints, ``"same"``, ``"valid"`` and every
    ``padding_mode``) and dilation; ``groups`` must be 1.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as for ``nn.Conv2d``.
        ranks: the rank of every mode ``(out, in, kh, kw)``: a tuple of four
            ints (each ``1 <= r_i <= n_i``, and none above the product of the
            others), or one int (or a fraction in ``(0, 1]`` of each mode's
            full rank, rounded) applied to every mode, capped by the mode's
            full rank ``min(n_i, Π_{j≠i} n_j)`` and lowered where it would exceed
            the product of the other modes' ranks.
        max_rank, min_rank: bounds the integrators keep every adapted mode's
            rank in (capped by the mode's size).
        tucker_modes: the modes whose rank adapts (default all four); the
            others keep their bases and rank, e.g. ``(0, 1)`` to adapt only
            the channel modes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: int | float | Sequence[int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        groups: int = 1,
        max_rank: int | None = None,
        min_rank: int = 1,
        tucker_modes: Sequence[int] = (0, 1, 2, 3),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, groups)
        self.mode_sizes = (self.out_channels, self.in_channels, *self.kernel_size)
        self.out_dim = self.out_channels
        self.in_dim = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.tucker_modes = check_tucker_modes(tucker_modes)
        start = self.resolve_ranks(ranks)
        for what, value in (("min_rank", min_rank), ("max_rank", max_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{what} must be an int >= 1, got {value!r}")
        if max_rank is not None and min_rank > max_rank:
            raise ValueError(f"min_rank={min_rank} is larger than max_rank={max_rank}")
        self.min_rank = int(min_rank)
        self.max_rank = max(self.full_ranks) if max_rank is None else int(max_rank)
        kw = {"device": device, "dtype": dtype}
        self.C = nn.Parameter(torch.empty(*start, **kw))
        self.U0 = nn.Parameter(torch.empty(self.mode_sizes[0], start[0], **kw))
        self.U1 = nn.Parameter(torch.empty(self.mode_sizes[1], start[1], **kw))
        self.U2 = nn.Parameter(torch.empty(self.mode_sizes[2], start[2], **kw))
        self.U3 = nn.Parameter(torch.empty(self.mode_sizes[3], start[3], **kw))
        self.grad_request: frozenset[str] | None = None
        self.pending_growth = False  # never set: Tucker layers are not adapters (integrators/base.py)
        self.just_grown = False
        self.grad_modes: list[Tensor | None] = [None] * MODES
        self.pass_inputs: list[tuple[Tensor, Tensor] | Tensor] = []
        self._contraction = "auto"
        if bias:
            bound = 1.0 / self.in_dim**0.5
            self.bias = nn.Parameter(torch.empty(out_channels, **kw).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        W = default_dense_init(self.out_dim, self.in_dim, device, dtype).reshape(self.mode_sizes)
        self.init_from_kernel(W, start)

    # ------------------------------------------------------------------ ranks
    @property
    def full_ranks(self) -> tuple[int, ...]:
        """The largest useful rank of every mode: ``min(n_i, Π_{j≠i} n_j)`` (the rank of ``Mat_i(W)``)."""
        total = math.prod(self.mode_sizes)
        return tuple(min(n, total // n) for n in self.mode_sizes)

    def mode_bounds(self, mode: int) -> tuple[int, int]:
        """``(min, max)`` rank of ``mode`` under the layer's ``min_rank``/``max_rank``, capped by its full rank."""
        full = self.full_ranks[mode]
        return min(self.min_rank, full), min(self.max_rank, full)

    def resolve_ranks(self, ranks: int | float | Sequence[int]) -> tuple[int, ...]:
        """Validate ``ranks`` (see the class docstring) and return one rank per mode."""
        full = self.full_ranks
        if _fraction_or_int(ranks):
            if isinstance(ranks, float):
                if not 0.0 < ranks <= 1.0:
                    raise ValueError(f"a fractional rank must lie in (0, 1], got {ranks}")
                out = [max(1, round(ranks * n)) for n in full]
            else:
                if ranks < 1:
                    raise ValueError(f"ranks must be >= 1, got {ranks}")
                out = [min(int(ranks), n) for n in full]
            # A mode's rank cannot exceed the product of the others' (Mat_i(C) has that many columns).
            for _ in range(MODES):
                out = [min(r, math.prod(out) // r) for r in out]
            return tuple(out)
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != MODES:
            raise ValueError(f"ranks must be an int, a fraction or four ints (out, in, kh, kw), got {ranks!r}")
        out = []
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= self.mode_sizes[i]:
                raise ValueError(
                    f"rank {r!r} of mode {i} ({MODE_NAMES[i]}, size {self.mode_sizes[i]}) must be an int in "
                    f"[1, {self.mode_sizes[i]}]; ranks={tuple(ranks)} for kernel {self.mode_sizes}"
                )
            out.append(int(r))
        for i, r in enumerate(out):
            others = math.prod(out) // r
            if r > others:
                raise ValueError(
                    f"ranks={tuple(out)} are not a Tucker rank: mode {i} ({MODE_NAMES[i]}) has rank {r}, above the "
                    f"product of the other modes' ranks ({others}); lower it to {others} or raise the others"
                )
        return tuple(out)

    # ---------------------------------------------------------------- factors
    @property
    def core(self) -> nn.Parameter:
        return self.C

    @property
    def bases(self) -> tuple[nn.Parameter, ...]:
        return (self.U0, self.U1, self.U2, self.U3)

    def factor_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.U0, self.U1, self.U2, self.U3, self.C)

    @property
    def rank(self) -> int:
        """The largest mode rank (for code that expects one number; :attr:`ranks` has all four)."""
        return max(self.C.shape)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in·kh·kw)``: the kernel as a matrix, as for :class:`~dlrt.LowRankConv2d`."""
        return (self.out_dim, self.in_dim)

    @torch.no_grad()
    def set_factors(self, bases: Sequence[Tensor], core: Tensor) -> None:
        """Replace bases and core (ranks may change); clears all recorded gradients."""
        if len(bases) != MODES:
            raise ValueError(f"a Tucker convolution has {MODES} bases, got {len(bases)}")
        for i, (B, n) in enumerate(zip(bases, self.mode_sizes)):
            if B.dim() != 2 or B.shape[0] != n:
                raise ValueError(f"basis {i} of shape {tuple(B.shape)} does not fit mode {i} of size {n}")
        if tuple(core.shape) != tuple(B.shape[1] for B in bases):
            raise ValueError(f"core {tuple(core.shape)} does not match the bases' ranks {[B.shape[1] for B in bases]}")
        self._replace_factors((*bases, core))

    def clear_pass(self) -> None:
        self.grad_modes = [None] * MODES
        self.pass_inputs = []

    @torch.no_grad()
    def init_from_kernel(
        self, W: Tensor, ranks: int | float | Sequence[int] | None = None, tau: float | None = None
    ) -> None:
        """Bases and core from a truncated HOSVD of the kernel ``W`` (``out×in×kh×kw``).

        With ``tau`` every adaptive mode's rank follows the truncation rule
        (relative), capped by ``ranks`` (if given) and the layer's bounds; the
        other modes take ``ranks`` (default: the current ranks).
        """
        W = W.detach().to(self.C.dtype)
        if tuple(W.shape) != self.mode_sizes:
            raise ValueError(f"kernel of shape {tuple(W.shape)} does not fit the layer's {self.mode_sizes}")
        cap = self.ranks if ranks is None else self.resolve_ranks(ranks)
        if tau is None:
            core, bases = linalg.hosvd(W, cap)
        else:
            lo, hi = zip(*(self.mode_bounds(i) for i in range(MODES)))
            caps = [min(c, h) if i in self.tucker_modes else c for i, (c, h) in enumerate(zip(cap, hi))]
            floors = [lo[i] if i in self.tucker_modes else caps[i] for i in range(MODES)]
            if ranks is None:  # no explicit cap: adaptive modes may take up to their bound
                caps = [hi[i] if i in self.tucker_modes else caps[i] for i in range(MODES)]
            core, bases = linalg.hosvd(W.to(linalg._qr_dtype(W.dtype)), caps, tau=tau, min_ranks=floors)
        self.set_factors([B.to(W.dtype) for B in bases], core.to(W.dtype))

    def kernel(self) -> Tensor:
        """The dense kernel ``C ×₀ U₀ ×₁ U₁ ×₂ U₂ ×₃ U₃`` (differentiable; for inspection and tests)."""
        return linalg.multi_mode_product(self.C, self.bases)

    def matrix(self) -> Tensor:
        """The kernel as an ``out × (in·kh·kw)`` matrix."""
        return self.kernel().reshape(self.out_dim, self.in_dim)

    @property
    def weight(self) -> Tensor:
        """Dense kernel ``(out, in, kh, kw)``, detached (for inspection only)."""
        return self.kernel().detach()

    @classmethod
    def like(
        cls,
        conv: nn.Conv2d,
        ranks: int | float | Sequence[int],
        *,
        bias: bool = False,
        max_rank: int | None = None,
        min_rank: int = 1,
        tucker_modes: Sequence[int] = (0, 1, 2, 3),
    ) -> TuckerConv2d:
        """A fresh layer with ``conv``'s geometry, device and dtype (factors initialised, not copied)."""
        return cls(
            *geometry_of(conv),
            ranks,
            bias=bias,
            max_rank=max_rank,
            min_rank=min_rank,
            tucker_modes=tucker_modes,
            **placement_of(conv),
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: int | float | Sequence[int] | None = None,
        tau: float | None = None,
        *,
        max_rank: int | None = None,
        min_rank: int = 1,
        tucker_modes: Sequence[int] = (0, 1, 2, 3),
    ) -> TuckerConv2d:
        """Factorize ``conv`` by a truncated HOSVD of its kernel (``ranks``, ``tau`` or both).

        With ``tau`` alone the adaptive modes take the rank of the truncation
        rule and the others full rank; with both, ``ranks`` caps each mode.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"TuckerConv2d supports groups=1 only, got a grouped convolution (groups={conv.groups}); "
                "leave this layer dense"
            )
        if ranks is None and tau is None:
            raise ValueError("from_conv needs ranks=, tau= or both")
        layer = cls.like(
            conv, 1, bias=conv.bias is not None, max_rank=max_rank, min_rank=min_rank, tucker_modes=tucker_modes
        )
        if ranks is None:
            ranks = tuple(layer.full_ranks)
        layer.init_from_kernel(conv.weight, ranks, tau=tau)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function."""
        conv = self._dense_conv(self.bias is not None, self.C.device, self.C.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def dense_num_parameters(self) -> int:
        """Parameters of the dense twin of this layer."""
        return math.prod(self.mode_sizes) + (self.bias.numel() if self.bias is not None else 0)

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = _TuckerFunction.apply(self._pad_input(x), self.C, self.U0, self.U1, self.U2, self.U3, self.bias, self)
        return y.squeeze(0) if unbatched else y

    def uses_dense_kernel(self) -> bool:
        """Whether a pass goes through the full kernel (formed from the factors) rather than thin products.

        Both routes compute the same output and the same projected gradients.
        Per output position the thin route costs about ``in·r₁ + r₀r₁·kh·kw +
        r₀·out`` multiply-adds forward, and its backward about three such core
        convolutions, eight in a pass that records the mode gradients (the mode
        gradients of ``out`` and ``in``, and the core step's gradient at doubled
        ranks); the dense route about ``out·in·kh·kw`` for each of the forward,
        ``G`` and the input gradient, after which every projection acts on the
        small ``G``. ``"auto"`` takes the cheaper (the dense one for small
        kernels such as LeNet5's); ``self.contraction`` set to ``"thin"`` or
        ``"dense"`` forces a route.
        """
        if self.contraction != "auto":
            return self.contraction == "dense"
        r0, r1 = self.C.shape[:2]
        kernel = self.kernel_size[0] * self.kernel_size[1]
        request = self.grad_request
        core_convs = 8 if request is not None and ("K" in request or "L" in request) else 3
        thin = 2 * (self.in_channels * r1 + self.out_channels * r0) + core_convs * r0 * r1 * kernel
        return 3 * self.out_channels * self.in_channels * kernel < thin

    def _conv(self, a: Tensor, D: Tensor) -> Tensor:
        return F.conv2d(a, D, None, self.stride, self._conv_padding, self.dilation)

    def _conv_weight(self, a: Tensor, shape: Sequence[int], b: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_weight(a, tuple(shape), b, self.stride, self._conv_padding, self.dilation)

    def _conv_input(self, shape: Sequence[int], D: Tensor, b: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_input(tuple(shape), D, b, self.stride, self._conv_padding, self.dilation)

    # ------------------------------------------------------------ gradients
    def _accumulate(self, grads: list[Tensor | None]) -> None:
        dt = self.C.dtype
        for i, g in enumerate(grads):
            if g is not None:
                g = g.to(dt)
                old = self.grad_modes[i]
                self.grad_modes[i] = g if old is None else old + g

    def _mode_grads(
        self, x: Tensor, dy: Tensor, a1: Tensor, b1: Tensor, gD: Tensor, C: Tensor, U2: Tensor, U3: Tensor
    ) -> list[Tensor | None]:
        """``Mat_i(G ×_{j≠i} U_jᵀ) Q_i`` for every adaptive mode, from thin products (``Mat_i(C)ᵀ = Q_i R_i``)."""
        out: list[Tensor | None] = [None] * MODES
        shape = tuple(C.shape)
        for i in self.tucker_modes:
            Q = mode_coordinates(C, i)  # Π_{j≠i} r_j × q
            folded = linalg.fold(Q.mT, i, (*shape[:i], Q.shape[1], *shape[i + 1 :]))
            if i == 0:  # Δᵀ · conv(U₁ᵀx, E₀), E₀ = fold(Q₀ᵀ) ×₂ U₂ ×₃ U₃
                E = linalg.multi_mode_product(folded, [None, None, U2, U3])
                out[0] = _contract(dy, self._conv(a1, E))
            elif i == 1:  # xᵀ · conv_inputᵀ(Δ U₀, E₁)
                E = linalg.multi_mode_product(folded, [None, None, U2, U3])
                c = self._conv_input((a1.shape[0], Q.shape[1], *a1.shape[2:]), E, b1)
                out[1] = _contract(x, c)
            else:  # spatial modes: from G ×₀ U₀ᵀ ×₁ U₁ᵀ, projected on the other spatial basis
                other = 3 if i == 2 else 2
                T = linalg.mode_product(gD, (U3 if other == 3 else U2).mT, other)
                out[i] = linalg.unfold(T, i) @ Q
        return out

    def project_grad(
        self, bases: Sequence[Tensor], records: list[tuple[Tensor, Tensor] | Tensor] | None = None
    ) -> Tensor | None:
        """``G ×₀ B₀ᵀ ×₁ B₁ᵀ ×₂ B₂ᵀ ×₃ B₃ᵀ`` for the kernel gradient ``G`` of the recorded passes.

        Contracted through the same thin products as the backward (``G`` is
        never formed); ``records`` defaults to :attr:`pass_inputs`. ``None``
        when nothing was recorded.
        """
        B0, B1, B2, B3 = bases
        out = None
        for entry in self.pass_inputs if records is None else records:
            if isinstance(entry, Tensor):  # the dense route kept G itself
                g = linalg.multi_mode_product(entry, [B.to(entry.dtype).mT for B in bases])
                out = g if out is None else out + g
                continue
            x, dy = entry
            a = _channels(B1.to(x.dtype).mT, x)
            b = _channels(B0.to(dy.dtype).mT, dy)
            g = self._conv_weight(a, (B0.shape[1], B1.shape[1], *self.kernel_size), b)
            g = linalg.multi_mode_product(g, [None, None, B2.to(g.dtype).mT, B3.to(g.dtype).mT])
            out = g if out is None else out + g
        return None if out is None else out.to(self.C.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, ranks={self.ranks}, "
            f"tucker_modes={self.tucker_modes}, min_rank={self.min_rank}, max_rank={self.max_rank}"
        )


def mode_coordinates(C: Tensor, mode: int) -> Tensor:
    """``Q_i`` of ``Mat_i(C)ᵀ = Q_i R_i``: the coordinates of the K-step of ``mode`` (orthonormal columns)."""
    return linalg.qr(linalg.unfold(C.detach(), mode).mT)[0]


def check_tucker_modes(modes: Any) -> tuple[int, ...]:
    """``modes`` as a sorted tuple of distinct mode indices in ``0..3``; a clear error otherwise."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        raise ValueError(f"tucker_modes must be a sequence of mode indices in 0..3 (out, in, kh, kw), got {modes!r}")
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m < MODES or m in out:
            raise ValueError(
                f"tucker_modes must hold distinct mode indices in 0..3 (0 out, 1 in, 2 kh, 3 kw), got {tuple(modes)!r}"
            )
        out.append(int(m))
    return tuple(sorted(out))
