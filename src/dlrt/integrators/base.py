"""What every integrator shares: the geometric operations, written once.

An integrator orchestrates passes (``opt.evaluate``) and these operations; it
never touches data. Each operation moves a layer's factors and transports the
optimizer state that lives in factor coordinates (ALGORITHMS §5):

* K-state (``n×r``, stored under ``layer.U``): columns in V-coordinates;
* L-state (``m×r``, stored under ``layer.V``): columns in U-coordinates;
* S-state (``r×r``, stored under ``layer.S``): ``U``-rows, ``V``-columns.

State dicts are replaced, never mutated, so a failed step can be rolled back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .. import linalg
from ..layers import LowRankLayer
from ..optim.inner import clone_state, transport_state

if TYPE_CHECKING:
    from ..optimizer import DLRTOptimizer

KL = frozenset({"K", "L"})
NONE: frozenset[str] = frozenset()


class Integrator:
    """Base class: one ``step`` = one call of :meth:`DLRTOptimizer.step`.

    Args:
        coefficient_steps: number of updates of the core ``S`` on a frozen
            augmented basis before the next truncation (ALGORITHMS §8). Each
            one is a separate optimizer step (its own batch); 1 gives the
            integrators of the papers, one S-update per augmentation.
    """

    name: ClassVar[str]
    #: Whether steps end in a truncation (rank adaptation).
    adaptive: ClassVar[bool] = True

    def __init__(self, coefficient_steps: int = 1) -> None:
        if isinstance(coefficient_steps, bool) or not isinstance(coefficient_steps, int) or coefficient_steps < 1:
            raise ValueError(f"coefficient_steps must be an int >= 1, got {coefficient_steps!r}")
        self.coefficient_steps = coefficient_steps

    def request(self, phase: int) -> frozenset[str]:
        """Projected gradients the first pass of a step in ``phase`` needs."""
        return KL if phase == 0 else NONE

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- ops
def factor_step(opt: DLRTOptimizer, key: Tensor, x: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
    """The inner-optimizer step ``Δ`` for the factor quantity ``x`` whose state lives under ``key``.

    ``x`` is not modified; the new state replaces the old one.
    """
    state = clone_state(opt.state.get(key, {}))
    delta = opt.rule.step(x, grad.to(x.dtype), state, group)
    opt.state[key] = state
    return delta


def transport(opt: DLRTOptimizer, key: Tensor, left: Tensor | None, right: Tensor | None) -> None:
    """Transport the state stored under ``key`` (if any) by ``left @ m @ right``."""
    state = opt.state.get(key)
    if state:
        opt.state[key] = transport_state(state, opt.rule, left, right)


def KL_grads(layer: LowRankLayer) -> tuple[Tensor, Tensor]:
    """``(G V, Gᵀ U)`` of the last pass; zeros for a layer the loss did not reach."""
    gK, gL = layer.grad_K, layer.grad_L
    U, V, S = layer.U.detach(), layer.V.detach(), layer.S.detach()
    return (
        torch.zeros(U.shape[0], S.shape[1], dtype=U.dtype, device=U.device) if gK is None else gK,
        torch.zeros(V.shape[0], S.shape[0], dtype=V.dtype, device=V.device) if gL is None else gL,
    )


def K_and_L_steps(
    opt: DLRTOptimizer, layer: LowRankLayer, group: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ALGORITHMS §2.2: ``K₁ = U₀S₀ − λ G₀V₀`` and ``L₁ = V₀S₀ᵀ − λ G₀ᵀU₀``.

    Returns ``(K₁, L₁, ΔK, ΔL)`` with the steps ``ΔK = K₁ − U₀S₀``,
    ``ΔL = L₁ − V₀S₀ᵀ`` computed directly (``range([U₀, K₁]) = range([U₀, ΔK])``).
    """
    U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
    gK, gL = KL_grads(layer)
    K0, L0 = U0 @ S0, V0 @ S0.mT
    dK = factor_step(opt, layer.U, K0, gK, group)
    dL = factor_step(opt, layer.V, L0, gL, group)
    return K0 + dK, L0 + dL, dK, dL


def change_basis(
    opt: DLRTOptimizer,
    layer: LowRankLayer,
    U1: Tensor,
    V1: Tensor,
    S1: Tensor | None = None,
    A: Tensor | None = None,
    B: Tensor | None = None,
) -> None:
    """Move the layer to bases ``(U1, V1)`` and transport all its state.

    The new core is the Galerkin projection ``(U1ᵀU₀) S₀ (V₀ᵀV₁)`` unless
    ``S1`` is given; ``A = U1ᵀU₀`` and ``B = V₀ᵀV₁`` are computed unless given.
    """
    U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
    A = U1.mT @ U0 if A is None else A  # r1×r0
    B = V0.mT @ V1 if B is None else B  # r0×r1
    if S1 is None:
        S1 = A @ S0 @ B
    transport(opt, layer.S, A, B)
    transport(opt, layer.U, None, B)  # K-state: columns follow V
    transport(opt, layer.V, None, A.mT)  # L-state: columns follow U
    layer.set_factors(U1, S1, V1)


def augment(opt: DLRTOptimizer, layer: LowRankLayer, KU: Tensor, LV: Tensor) -> tuple[Tensor, Tensor]:
    """Move the layer to ``Û = orth([U₀, KU])``, ``V̂ = orth([V₀, LV])`` (ALGORITHMS §0).

    The core becomes the Galerkin projection ``(ÛᵀU₀) S₀ (V₀ᵀV̂)`` and all state
    is transported. At most ``r`` new directions per side, fewer when the layer is
    close to full rank (the core may then be rectangular) or when ``KU``/``LV``
    add fewer directions. Returns ``(Û, V̂)``.
    """
    U_hat, A = linalg.augment_basis_with_projection(layer.U.detach(), KU)
    V_hat, Bt = linalg.augment_basis_with_projection(layer.V.detach(), LV)
    change_basis(opt, layer, U_hat, V_hat, A=A, B=Bt.mT)
    return U_hat, V_hat


def grow_from_gradient(opt: DLRTOptimizer, layer: LowRankLayer, gK: Tensor, gL: Tensor) -> None:
    """Bases from the gradient for a layer whose core is zero (a fresh adapter, ALGORITHMS §3).

    At ``S₀ = 0`` the tangent space at the random starting bases holds only
    about ``r/n + r/m`` of the gradient, so a parallel step would barely move
    the layer. ``G V₀`` and ``Gᵀ U₀`` are a two-sided randomized sketch of ``G``
    (Halko et al. 2011): ``U₁ = orth(G V₀)`` and ``V₁ = orth(Gᵀ U₀)`` span
    (approximately) its dominant column and row spaces. The core stays zero,
    so the layer's function is unchanged by this step.
    """
    U1, V1 = linalg.orth(gK), linalg.orth(gL)
    S1 = U1.new_zeros(U1.shape[1], V1.shape[1])
    change_basis(opt, layer, U1, V1, S1=S1)


def S_step(opt: DLRTOptimizer, layer: LowRankLayer, grad: Tensor, group: dict[str, Any]) -> None:
    """``S ← S − λ ∇_S`` with the inner optimizer (the Galerkin/coefficient step)."""
    S0 = layer.S.detach()
    layer.set_factors(layer.U.detach(), S0 + factor_step(opt, layer.S, S0, grad, group), layer.V.detach())


def truncate(opt: DLRTOptimizer, layers: list[LowRankLayer], group: dict[str, Any]) -> None:
    """ALGORITHMS §1 on every layer of one truncation event (each layer exactly once).

    Per layer with the group's ``tau``, or jointly over all layers with
    ``truncation="global"`` (and an optional total-rank ``budget``).
    """
    if not layers:
        return
    svds = [linalg.svd_truncate(layer.S.detach(), rank=min(layer.S.shape)) for layer in layers]
    absolute = group["tau_mode"] == "absolute"
    if group["truncation"] == "global":
        ranks = linalg.global_truncation_ranks(
            [t.sigma for t in svds],
            tau=group["tau"],
            budget=group["budget"],
            absolute=absolute,
            min_ranks=[layer.min_rank for layer in layers],
            max_ranks=[layer.max_rank for layer in layers],
        )
    else:
        ranks = [
            linalg.truncation_rank(
                t.sigma, group["tau"], absolute=absolute, min_rank=layer.min_rank, max_rank=layer.max_rank
            )
            for t, layer in zip(svds, layers)
        ]
    for layer, t, r in zip(layers, svds, ranks):
        P, Q = t.P[:, :r], t.Q[:, :r]
        U1 = layer.U.detach() @ P
        V1 = layer.V.detach() @ Q
        # U1ᵀÛ = Pᵀ and V̂ᵀV1 = Q since Û, V̂ are orthonormal.
        change_basis(opt, layer, U1, V1, S1=torch.diag(t.sigma[:r]), A=P.mT, B=Q)
