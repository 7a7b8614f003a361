"""``LowRankAdapter``: a frozen layer plus a rank-adaptive low-rank update.

``y = W₀x + b + s·U S Vᵀ x`` (docs/algorithms.md §3, adapter form). The update is a
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
from .ranks import check_rank
from .registry import lowrank_spec


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
        spec = lowrank_spec(base_layer)
        reason = spec.unsupported(base_layer)
        if reason is not None or spec.like is None:
            raise ValueError(
                f"LowRankAdapter cannot adapt this {type(base_layer).__name__}: "
                + (f"it is {reason}" if reason is not None else f"{spec.describe()} has no like= constructor")
            )
        check_rank(r, spec.matrix_shape(base_layer), what="r", min_rank=min_rank, max_rank=max_rank)
        lora = spec.like(base_layer, r, bias=False, max_rank=max_rank, min_rank=min_rank)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.lora = lora
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(r)

    @torch.no_grad()
    def reset_adapter(self, r: int | None = None) -> None:
        """Restart the update at zero: ``S = 0`` on random orthonormal bases of rank ``r`` (default: the current).

        The bases are placeholders (``pending_growth``): the integrator's next
        step replaces them by the gradient's dominant subspaces (docs/algorithms.md §3)
        and drops the optimizer state left from the old factors.

        Raises:
            ValueError: ``r`` is not an int in ``[1, max_rank]``.
        """
        lora = self.lora
        r = lora.rank if r is None else r
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= lora.max_rank:
            raise ValueError(
                f"adapter rank r={r!r} is out of range: it must be an int in [1, max_rank={lora.max_rank}]"
            )
        kw = {"device": lora.U.device, "dtype": linalg._qr_dtype(lora.U.dtype)}
        U = linalg.orth(torch.randn(lora.out_dim, r, **kw)).to(lora.U.dtype)
        V = linalg.orth(torch.randn(lora.in_dim, r, **kw)).to(lora.U.dtype)
        lora.set_factors(U, U.new_zeros(r, r), V)
        lora.pending_growth = True
        lora.just_grown = False

    @property
    def rank(self) -> int:
        return self.lora.rank

    def forward(self, x: Tensor) -> Tensor:
        # The scaling rides on the update's r-wide products (LowRankLayer's scale), not on an n-wide output.
        return self.base_layer(x) + self.lora(self.dropout(x), scale=self.scaling)

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
