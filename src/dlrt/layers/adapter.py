"""``LowRankAdapter``: a frozen layer plus a rank-adaptive low-rank update.

``y = W₀x + b + s·U S Vᵀ x`` (ALGORITHMS §3, adapter form). The update is a
bias-free :class:`LowRankLinear` / :class:`LowRankConv2d` held as the child
``lora``, so the integrators drive it like any other low-rank layer and its
backward yields the projected gradients of ``s·G`` directly; the frozen layer
is the child ``base_layer``. Forward cost on top of the frozen layer:
``O(B (n + m) r)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import linalg
from .base import LowRankLayer
from .conv import LowRankConv2d
from .linear import LowRankLinear


class LowRankAdapter(nn.Module):
    """Wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` with an update ``scaling · U S Vᵀ``.

    The update starts at ``S = 0`` on random orthonormal bases of rank ``r``,
    so the wrapped layer's function is unchanged; the integrator grows the
    bases from the gradient and truncates the rank.

    Args:
        base_layer: the layer to adapt; its parameters are frozen here.
        r: initial rank, ``1 <= r <= min(out, in·kh·kw)``.
        scaling: fixed factor of the update (``lora_alpha / r`` in the config);
            it does not follow rank changes.
        dropout: dropout probability on the update's input.
        max_rank, min_rank: bounds of the adapter's rank.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        r: int,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> None:
        super().__init__()
        w = base_layer.weight
        kw = {"max_rank": max_rank, "min_rank": min_rank, "device": w.device, "dtype": w.dtype}
        lora: LowRankLayer
        if isinstance(base_layer, nn.Linear):
            _check_rank(r, max_rank, base_layer.out_features, base_layer.in_features)
            lora = LowRankLinear(base_layer.in_features, base_layer.out_features, rank=r, bias=False, **kw)
        elif isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1:
                raise ValueError(f"LowRankAdapter supports groups=1 convolutions only, got groups={base_layer.groups}")
            _check_rank(r, max_rank, base_layer.out_channels, w[0].numel())
            lora = LowRankConv2d(
                base_layer.in_channels,
                base_layer.out_channels,
                base_layer.kernel_size,
                rank=r,
                stride=base_layer.stride,
                padding=base_layer.padding,
                dilation=base_layer.dilation,
                bias=False,
                padding_mode=base_layer.padding_mode,
                **kw,
            )
        else:
            raise TypeError(f"LowRankAdapter wraps nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.lora = lora
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(r)

    @torch.no_grad()
    def reset_adapter(self, r: int | None = None) -> None:
        """Restart the update at zero: ``S = 0`` on random orthonormal bases of rank ``r``.

        The bases are placeholders: the ``parallel`` integrator's first step
        replaces them by the gradient's dominant subspaces (ALGORITHMS §3).
        """
        lora = self.lora
        r = lora.rank if r is None else r
        kw = {"device": lora.U.device, "dtype": linalg._qr_dtype(lora.U.dtype)}
        U = linalg.orth(torch.randn(lora.out_dim, r, **kw)).to(lora.U.dtype)
        V = linalg.orth(torch.randn(lora.in_dim, r, **kw)).to(lora.U.dtype)
        lora.set_factors(U, U.new_zeros(r, r), V)
        lora.pending_growth = True

    @property
    def rank(self) -> int:
        return self.lora.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.scaling * self.lora(self.dropout(x))

    def delta_weight(self) -> Tensor:
        """``scaling · U S Vᵀ`` in the shape of the base layer's weight (detached)."""
        return (self.scaling * self.lora.matrix().detach()).reshape(self.base_layer.weight.shape)

    def num_parameters(self) -> int:
        """Parameters the update stores: ``U``, ``S`` and ``V``."""
        lora = self.lora
        return lora.U.numel() + lora.S.numel() + lora.V.numel()

    @torch.no_grad()
    def merged(self) -> nn.Linear | nn.Conv2d:
        """The base layer with the update added to its weight (modified in place and returned)."""
        w = self.base_layer.weight
        w.add_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _check_rank(r: int, max_rank: int | None, n: int, m: int) -> None:
    full = min(n, m)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= full:
        raise ValueError(f"adapter rank r={r!r} is out of range for a {n}×{m} layer: it must be in [1, {full}]")
    if max_rank is not None and max_rank < r:
        raise ValueError(f"r={r} exceeds max_rank={max_rank}")
