"""``LowRankConv2d``: a conv kernel in matrix format, applied as two convolutions.

The kernel ``(out, in, kh, kw)`` is the matrix ``W`` of shape
``out × (in·kh·kw)`` (docs/algorithms.md §0). The forward is a ``kh×kw`` convolution
with the ``r`` filters ``Vᵀ`` followed by a ``1×1`` convolution with ``U S``;
the kernel is never formed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .base import LowRankLayer, default_dense_init


def geometry_of(conv: nn.Conv2d) -> tuple[Any, ...]:
    """``(in_channels, out_channels, kernel_size)`` of ``conv``: the positional arguments of a conv layer."""
    return (conv.in_channels, conv.out_channels, conv.kernel_size)


def placement_of(conv: nn.Conv2d) -> dict[str, Any]:
    """The keyword arguments that give a new conv layer ``conv``'s geometry, device and dtype."""
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
        "groups": conv.groups,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }


class ConvGeometry:
    """Stride, padding (ints, ``"same"``, ``"valid"``, every ``padding_mode``) and dilation of a 2-D
    convolution, validated as ``nn.Conv2d`` does; shared by the matrix and Tucker formats.

    Padding that ``F.conv2d`` cannot do itself (a non-zero mode, or the asymmetric
    ``"same"`` of an even kernel) is applied to the input first (:meth:`_pad_input`).
    """

    def _set_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str,
        dilation: int | tuple[int, int],
        padding_mode: str,
        groups: int,
    ) -> None:
        name = type(self).__name__
        if groups != 1:
            raise ValueError(f"{name} supports groups=1 only, got groups={groups}; leave this layer dense")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride=1 (as in nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        # (left, right, top, bottom) for F.pad, or None when conv2d pads itself.
        self._pre_pad = self._explicit_padding()

    def _explicit_padding(self) -> tuple[int, int, int, int] | None:
        if self.padding == "valid":
            pads = [(0, 0), (0, 0)]
        elif self.padding == "same":
            pads = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
        else:
            pads = [(p, p) for p in self.padding]
        symmetric = all(lo == hi for lo, hi in pads)
        if self.padding_mode == "zeros" and symmetric:
            self._conv_padding = (pads[0][0], pads[1][0])
            return None
        self._conv_padding = (0, 0)
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)

    def _pad_input(self, x: Tensor) -> Tensor:
        if self._pre_pad is None:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._pre_pad, mode=mode)

    def _dense_conv(
        self, bias: bool, device: Any, dtype: Any, out_channels: int | None = None, in_channels: int | None = None
    ) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this geometry (weights to be copied in); channel counts other than the layer's
        for the factors of an exported layer (a low-rank layer's ``r`` filters, a Tucker layer's core)."""
        return nn.Conv2d(
            self.in_channels if in_channels is None else in_channels,
            self.out_channels if out_channels is None else out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=bias,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )


class LowRankConv2d(ConvGeometry, LowRankLayer):
    """A 2-D convolution whose kernel matrix is held as ``U S Vᵀ``.

    Supports stride, padding (ints, ``"same"``, ``"valid"`` and every
    ``padding_mode``) and dilation; ``groups`` must be 1.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as for ``nn.Conv2d``.
        rank: starting rank, ``1 <= rank <= min(out, in·kh·kw)``.
        max_rank, min_rank: bounds for rank-adaptive integrators.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        groups: int = 1,
        max_rank: int | None = None,
        min_rank: int = 1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode, groups)
        self.out_dim = self.out_channels
        self.in_dim = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_factors(rank, max_rank, min_rank, device, dtype)
        if bias:
            bound = 1.0 / self.in_dim**0.5
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.init_from_matrix(default_dense_init(self.out_dim, self.in_dim, device, dtype), rank)

    @classmethod
    def like(
        cls, conv: nn.Conv2d, rank: int, *, bias: bool = False, max_rank: int | None = None, min_rank: int = 1
    ) -> LowRankConv2d:
        """A fresh layer with ``conv``'s geometry, device and dtype (factors initialised, not copied)."""
        return cls(*geometry_of(conv), rank=rank, bias=bias, max_rank=max_rank, min_rank=min_rank, **placement_of(conv))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int | None = None,
        *,
        tau: float | None = None,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> LowRankConv2d:
        """Factorize ``conv`` by a truncated SVD of its kernel matrix (``rank``, ``tau`` or both)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        if rank is None and tau is None:
            raise ValueError("from_conv needs rank=, tau= or both")
        W = conv.weight
        layer = cls.like(conv, min_rank, bias=conv.bias is not None, max_rank=max_rank, min_rank=min_rank)
        layer.init_from_matrix(W.reshape(W.shape[0], -1), rank=rank, tau=tau)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        """The convolution by ``scale · W`` plus the bias; ``scale`` (an adapter's ``lora_alpha / r``) costs
        only ``r``-channel products."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = self._apply_lowrank(self._pad_input(x), self.bias, scale)
        return y.squeeze(0) if unbatched else y

    @property
    def weight(self) -> Tensor:
        """Dense kernel ``(out, in, kh, kw)``, detached (for inspection only)."""
        return self.matrix().detach().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function."""
        conv = self._dense_conv(self.bias is not None, self.U.device, self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # Shape-specific products of LowRankLayer; activations are (B, channels, H, W).
    def _kernel(self, V: Tensor) -> Tensor:
        return V.mT.reshape(V.shape[1], self.in_channels, *self.kernel_size)

    def _project_in(self, x: Tensor, V: Tensor) -> Tensor:
        return F.conv2d(x, self._kernel(V), None, self.stride, self._conv_padding, self.dilation)

    # The 1×1 products act on the channels of (B, r, H, W) activations as batched
    # matrix products over the (B, r, H·W) view: an order of magnitude faster on CPU
    # than a 1×1 convolution (mkldnn) or einsum (permuted copies).
    @staticmethod
    def _channels(M: Tensor, a: Tensor) -> Tensor:
        B, _, H, W = a.shape
        # bmm with a broadcast M: matmul would fold the batch into one product through
        # two transposed copies of the activations.
        return torch.bmm(M.expand(B, -1, -1), a.reshape(B, a.shape[1], H * W)).reshape(B, M.shape[0], H, W)

    @classmethod
    def _mul_core(cls, a: Tensor, C: Tensor) -> Tensor:
        return cls._channels(C.mT, a)

    @classmethod
    def _project_out(cls, a: Tensor, U: Tensor, bias: Tensor | None) -> Tensor:
        y = cls._channels(U, a)
        return y if bias is None else y.add_(bias[:, None, None])

    @classmethod
    def _project_out_adjoint(cls, dy: Tensor, U: Tensor) -> Tensor:
        return cls._channels(U.mT, dy)

    @staticmethod
    def _contract(p: Tensor, q: Tensor) -> Tensor:
        # Σ over batch and positions of p qᵀ as a batched product of views (no copies).
        B = p.shape[0]
        return torch.bmm(p.reshape(B, p.shape[1], -1), q.reshape(B, q.shape[1], -1).mT).sum(0)

    def _basis_grad_in(self, x: Tensor, b: Tensor) -> Tensor:
        r = b.shape[1]
        gk = torch.nn.grad.conv2d_weight(
            x, (r, self.in_channels, *self.kernel_size), b, self.stride, self._conv_padding, self.dilation
        )
        return gk.reshape(r, -1).mT

    def _input_grad(self, c: Tensor, V: Tensor, x_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(x_shape, self._kernel(V), c, self.stride, self._conv_padding, self.dilation)

    @staticmethod
    def _bias_grad(dy: Tensor) -> Tensor:
        return dy.sum((0, 2, 3))

    # The dense route (LowRankLayer.uses_dense_kernel): one convolution with the full kernel.
    @staticmethod
    def _input_width(x: Tensor) -> int:
        return x.shape[1]  # channels: x.numel() / channels = the (input) positions

    def _dense_kernel(self, W: Tensor) -> Tensor:
        return W.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _dense_apply(self, x: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, self._dense_kernel(W), bias, self.stride, self._conv_padding, self.dilation)

    def _dense_weight_grad(self, x: Tensor, dy: Tensor) -> Tensor:
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        g = torch.nn.grad.conv2d_weight(x, shape, dy, self.stride, self._conv_padding, self.dilation)
        return g.reshape(self.out_channels, -1)

    def _dense_input_grad(self, dy: Tensor, W: Tensor, x_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(
            x_shape, self._dense_kernel(W), dy, self.stride, self._conv_padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, " + super().extra_repr()
        )
