"""``LowRankLinear``: ``y = x Wᵀ + b`` with ``W = U S Vᵀ`` never formed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import LowRankLayer, default_dense_init


class LowRankLinear(LowRankLayer):
    """A linear layer whose ``out×in`` weight is held as ``U S Vᵀ``.

    Forward costs ``O(B (in + out) r)``. Built directly it starts from the best
    rank-``rank`` approximation of the weight ``nn.Linear`` would initialise;
    :meth:`from_linear` factorizes an existing layer.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        rank: starting rank, ``1 <= rank <= min(in, out)``.
        bias: learn an additive bias.
        max_rank, min_rank: bounds for rank-adaptive integrators
            (default ``min(in, out)`` and 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        max_rank: int | None = None,
        min_rank: int = 1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = self.in_dim = int(in_features)
        self.out_features = self.out_dim = int(out_features)
        self._init_factors(rank, max_rank, min_rank, device, dtype)
        if bias:
            bound = 1.0 / in_features**0.5
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.init_from_matrix(default_dense_init(out_features, in_features, device, dtype), rank)

    @classmethod
    def like(
        cls, linear: nn.Linear, rank: int, *, bias: bool = False, max_rank: int | None = None, min_rank: int = 1
    ) -> LowRankLinear:
        """A fresh layer with ``linear``'s shape, device and dtype (factors initialised, not copied)."""
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            bias=bias,
            max_rank=max_rank,
            min_rank=min_rank,
            device=w.device,
            dtype=w.dtype,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        tau: float | None = None,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> LowRankLinear:
        """Factorize ``linear`` by a truncated SVD of its weight.

        Give ``rank``, or ``tau`` to pick the rank by the truncation rule
        (relative tolerance, docs/algorithms.md §1), or both (``tau``'s rank, at most
        ``rank``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        if rank is None and tau is None:
            raise ValueError("from_linear needs rank=, tau= or both")
        W = linear.weight
        # Built at min_rank (a cheap init), then set from the SVD of W.
        layer = cls.like(linear, min_rank, bias=linear.bias is not None, max_rank=max_rank, min_rank=min_rank)
        layer.init_from_matrix(W, rank=rank, tau=tau)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        """``scale · x Wᵀ + b``; ``scale`` (an adapter's ``lora_alpha / r``) costs only ``r``-wide products."""
        return self._apply_lowrank(x, self.bias, scale)

    @property
    def weight(self) -> Tensor:
        """Dense ``out×in`` reconstruction, detached (for inspection only)."""
        return self.matrix().detach()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.U.device, dtype=self.U.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(self.matrix())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # Shape-specific products of LowRankLayer (rows = batch, any leading dims). A product with a thin
    # result (r columns, B·T rows) is formed transposed, thin factor on the left (``(Vᵀ Xᵀ)ᵀ``): the
    # result is then stored r×(B·T), its long side contiguous, and MKL's kernels for a narrow right
    # factor, which are several times slower below 16 columns, are avoided (benchmarks/profile_step.py).
    @staticmethod
    def _project_in(x: Tensor, V: Tensor) -> Tensor:
        return _thin_product(x, V)

    @staticmethod
    def _mul_core(a: Tensor, C: Tensor) -> Tensor:
        return a @ C

    @staticmethod
    def _project_out(a: Tensor, U: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return a @ U.mT
        return torch.nn.functional.linear(a, U, bias)

    @staticmethod
    def _project_out_adjoint(dy: Tensor, U: Tensor) -> Tensor:
        return _thin_product(dy, U)

    @staticmethod
    def _contract(p: Tensor, q: Tensor) -> Tensor:
        p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
        if q.shape[-1] < p.shape[-1]:
            return (q.mT @ p).mT
        return p.mT @ q

    @staticmethod
    def _basis_grad_in(x: Tensor, b: Tensor) -> Tensor:
        return LowRankLinear._contract(x, b)

    @staticmethod
    def _input_grad(c: Tensor, V: Tensor, x_shape: torch.Size) -> Tensor:
        return c @ V.mT

    @staticmethod
    def _bias_grad(dy: Tensor) -> Tensor:
        return dy.reshape(-1, dy.shape[-1]).sum(0)

    # The dense route (LowRankLayer.uses_dense_kernel): W itself, G = Δᵀ X.
    @staticmethod
    def _input_width(x: Tensor) -> int:
        return x.shape[-1]

    @staticmethod
    def _dense_apply(x: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
        return torch.nn.functional.linear(x, W, bias)

    @staticmethod
    def _dense_weight_grad(x: Tensor, dy: Tensor) -> Tensor:
        return dy.reshape(-1, dy.shape[-1]).mT @ x.reshape(-1, x.shape[-1])

    @staticmethod
    def _dense_input_grad(dy: Tensor, W: Tensor, x_shape: torch.Size) -> Tensor:
        return dy @ W


#: Columns of a thin factor from which ``x @ M`` is formed directly (no faster transposed).
_THIN_COLUMNS = 64


def _thin_product(x: Tensor, M: Tensor) -> Tensor:
    """``x @ M`` for a thin ``M`` (``k×r``) over the last dimension of ``x``, formed as ``(Mᵀ xᵀ)ᵀ``.

    The result has ``x``'s shape with the last dimension ``r``; its storage is
    ``r × rows`` (a transposed view), which every later product reads as it is.
    From ``_THIN_COLUMNS`` columns on, both forms cost the same and ``x @ M`` is kept.
    """
    if M.shape[-1] >= _THIN_COLUMNS:
        return x @ M
    rows = x.reshape(-1, x.shape[-1])
    return (M.mT @ rows.mT).mT.reshape(*x.shape[:-1], M.shape[-1])
