"""``LowRankAdapter``: a frozen layer plus a rank-adaptive low-rank update.

``y = W₀x + b + s·U S Vᵀ x`` (docs/algorithms.md §3, adapter form). The update is a
bias-free :class:`LowRankLinear` / :class:`LowRankConv2d` held as the child
``lora``, so the integrators drive it like any other low-rank layer and its
backward yields the projected gradients of ``s·G`` directly; the frozen layer
is the child ``base_layer``. Forward cost on top of the frozen layer:
``O(B (n + m) r)``.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from .. import linalg
from .base import default_dense_init
from .ranks import check_rank
from .registry import lowrank_spec

#: How an adapter's update starts (``S = 0`` in all, so the wrapped layer's function is unchanged):
#:
#: * ``"gradient"``: random orthonormal placeholder bases that the integrator's next step replaces by
#:   the gradient's dominant subspaces (``pending_growth``, docs/algorithms.md §3);
#: * ``"random"``: random orthonormal bases that the integrator augments and truncates from the first
#:   step as any other layer's (LoRA's starting point in the factor form: a zero update on random bases);
#: * ``"lora"``: as ``"random"``, with ``V`` spanning the rows of LoRA's ``A`` (kaiming-uniform,
#:   ``a = √5``, as PEFT draws it) and ``U S = B = 0``.
ADAPTER_INITS = ("gradient", "random", "lora")


def check_adapter_init(init: object) -> str:
    """``init`` if it is one of :data:`ADAPTER_INITS`; a ``ValueError`` naming them otherwise."""
    if not isinstance(init, str) or init not in ADAPTER_INITS:
        raise ValueError(
            f"adapter init must be one of {ADAPTER_INITS}, got {init!r}: 'gradient' grows the bases from the "
            "first gradient, 'random' starts on random bases, 'lora' on the row space of LoRA's A"
        )
    return init


@functools.cache
def _takes_scale(layer_type: type) -> bool:
    """Whether ``layer_type``'s forward takes ``scale=`` (the built-in low-rank layers; a type registered
    with :func:`~dlrt.layers.register_lowrank` may not)."""
    return "scale" in inspect.signature(layer_type.forward).parameters


class LowRankAdapter(nn.Module):
    """Wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` with an update ``scaling · U S Vᵀ``.

    The update starts at ``S = 0`` on orthonormal bases of rank ``r`` chosen by
    ``init`` (:data:`ADAPTER_INITS`), so the wrapped layer's function is
    unchanged; the integrator moves the bases and truncates the rank.

    Args:
        base_layer: the layer to adapt; its parameters are frozen here.
        r: initial rank, ``1 <= r <= min(out, in·kh·kw)``.
        scaling: fixed factor of the update (``lora_alpha / r`` in the config);
            it does not follow rank changes.
        dropout: dropout probability on the update's input.
        max_rank, min_rank: bounds of the adapter's rank.
        init: how the update starts: ``"gradient"`` (default), ``"random"`` or ``"lora"``
            (:data:`ADAPTER_INITS`).
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
        init: str = "gradient",
    ) -> None:
        super().__init__()
        check_adapter_init(init)
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
        self.init = init
        self.reset_adapter(r)

    @torch.no_grad()
    def reset_adapter(self, r: int | None = None, init: str | None = None) -> None:
        """Restart the update at zero: ``S = 0`` at rank ``r`` (default: the current) on bases chosen by ``init``.

        ``init`` (default: the adapter's :attr:`init`, which it then becomes;
        :data:`ADAPTER_INITS`): with ``"gradient"`` the bases are random
        orthonormal placeholders (``pending_growth``): the integrator's next step
        replaces them by the gradient's dominant subspaces (docs/algorithms.md §3)
        and drops the optimizer state left from the old factors. With
        ``"random"`` (random orthonormal ``U``, ``V``) and ``"lora"`` (``V`` an
        orthonormal basis of the rows of LoRA's kaiming-uniform ``A``, random
        ``U``) the integrator augments and truncates the layer from its next step
        like any other, and nothing tells it that the factors were replaced: an
        optimizer built before keeps its state of the old factors, so restart a
        trained adapter with ``"gradient"``, or build the optimizer afresh.

        Raises:
            ValueError: ``r`` is not an int in ``[1, max_rank]``, or ``init`` is not one of
                :data:`ADAPTER_INITS`.
        """
        lora = self.lora
        r = lora.rank if r is None else r
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= lora.max_rank:
            raise ValueError(
                f"adapter rank r={r!r} is out of range: it must be an int in [1, max_rank={lora.max_rank}]"
            )
        init = check_adapter_init(self.init if init is None else init)
        kw = {"device": lora.U.device, "dtype": linalg._qr_dtype(lora.U.dtype)}
        if init == "lora":
            # PEFT's lora_A (r×in, kaiming-uniform) spans V; B = 0 makes U S = 0 on any U.
            V = linalg.orth(default_dense_init(r, lora.in_dim, **kw).mT).to(lora.U.dtype)
            U = linalg.orth(torch.randn(lora.out_dim, r, **kw)).to(lora.U.dtype)
        else:
            U = linalg.orth(torch.randn(lora.out_dim, r, **kw)).to(lora.U.dtype)
            V = linalg.orth(torch.randn(lora.in_dim, r, **kw)).to(lora.U.dtype)
        lora.set_factors(U, U.new_zeros(r, r), V)
        lora.pending_growth = init == "gradient"
        lora.just_grown = False
        self.init = init

    @property
    def rank(self) -> int:
        return self.lora.rank

    def forward(self, x: Tensor) -> Tensor:
        if _takes_scale(type(self.lora)):
            # The scaling rides on the update's r-wide products (LowRankLinear/LowRankConv2d's scale=),
            # not on an n-wide output and its gradient.
            return self.base_layer(x) + self.lora(self.dropout(x), scale=self.scaling)
        return self.base_layer(x) + self.scaling * self.lora(self.dropout(x))  # a registered type without scale=

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
        return f"rank={self.rank}, scaling={self.scaling:g}, init={self.init!r}"
