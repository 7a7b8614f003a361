"""The parallel BUG integrator of GeoLoRA (Schotthöfer et al., ICLR 2025), docs/algorithms.md §3.

All three projected gradients come from one forward/backward pass at ``W₀``,
so a step costs one pass plus small QR/SVDs. ``G₀V₀`` and ``G₀ᵀU₀`` are taken
directly from the layer's backward, never as ``∂ℒ/∂U · S⁻¹``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .base import (
    NONE,
    Integrator,
    KL_grads,
    S_steps,
    augment,
    grow_from_gradient,
    split_layers,
    tucker_augment,
    tucker_galerkin_grad,
)
from .bug import KLX

if TYPE_CHECKING:
    from ..layers import LowRankLayer
    from ..optimizer import DLRTOptimizer


class ParallelBUG(Integrator):
    """Parallel rank-adaptive BUG (docs/algorithms.md §3).

    Phase 0: one pass → ``G₀V₀``, ``G₀ᵀU₀``, ``U₀ᵀG₀V₀``; new directions
    ``Ũ`` from ``orth([U₀, G₀V₀])``, ``Ṽ`` from ``orth([V₀, G₀ᵀU₀])``; the augmented
    core ``[[S₀, 0], [0, 0]]`` takes one inner-optimizer step along
    ``[[U₀ᵀG₀V₀, (G₀ᵀU₀)ᵀṼ], [Ũᵀ(G₀V₀), 0]]`` (with plain SGD this is exactly
    the core of §3.4). Then ``coefficient_steps − 1`` further S-steps, and
    truncation (§1). Every step needs only the gradient at the current point,
    so ``step()`` also works after a plain ``loss.backward()``.

    A fresh adapter (``S₀ = 0`` on placeholder bases, ``layer.pending_growth``)
    instead gets bases grown from the gradient at the start of a cycle
    (:func:`~dlrt.integrators.base.grow_from_gradient`), keeping its rank and
    function; until a pass reaches it, it is left alone. The end of the cycle
    in which it grew does not truncate it while its core is still zero
    (:meth:`~dlrt.integrators.base.Integrator.end_cycle`); the other layers of
    the same step are truncated as usual.

    A Tucker layer is augmented mode by mode as in ``bug``; its core steps along
    ``G₀ ×ᵢ Û_iᵀ`` without the blocks in which two or more modes are new (the
    Tucker form of leaving out ``Ũᵀ G₀ Ṽ``).
    """

    name = "parallel"

    def request(self, phase: int) -> frozenset[str]:
        if phase == 0 and self.sees_normal:
            return KLX
        return super().request(phase)

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        layers = opt.lowrank_layers
        stepped, grads = [], []
        corners: list[tuple[LowRankLayer, Tensor]] = []
        if opt.phase == 0:
            request = self.request(0)
            loss = opt.evaluate(closure, request, "augmentation")
            layers, tucker = split_layers(layers)
            wanted = []
            for layer in layers:
                gK, gL = KL_grads(opt, layer)
                if layer.pending_growth:
                    if bool(gK.any()) and bool(gL.any()):
                        grow_from_gradient(opt, layer, gK, gL)
                    continue
                gS = opt.S_grad(layer)
                r_u, r_v = layer.S.shape
                inputs = layer.pass_inputs
                RU, RV = augment(opt, layer, gK, gL)
                # Ûᵀ G V₀ and V̂ᵀ Gᵀ U₀ are the QR factors' last blocks (RU = Ûᵀ[U₀, G V₀]):
                # Ũᵀ G V₀ = RU[r_u:, r_u:] and U₀ᵀ G Ṽ = (Ṽᵀ Gᵀ U₀)ᵀ = RV[r_v:, r_v:]ᵀ.
                G_hat = torch.zeros(RU.shape[0], RV.shape[0], dtype=gS.dtype, device=gS.device)
                G_hat[:r_u, :r_v] = gS
                G_hat[:r_u, r_v:] = RV[r_v:, r_v:].mT
                G_hat[r_u:, :r_v] = RU[r_u:, r_u:]
                stepped.append(layer)
                grads.append(G_hat)
                U_new, V_new = layer.U.detach()[:, r_u:], layer.V.detach()[:, r_v:]
                if "X" in request and U_new.shape[1] and V_new.shape[1]:
                    wanted.append((layer, U_new, V_new, inputs))
            # Ũᵀ G₀ Ṽ, which the step leaves at zero, still tells the rank rule where the loss pushes
            # outside the tangent space (the gradient's normal component, docs/algorithms.md §1).
            corners = [(req[0], g) for req, g in zip(wanted, opt.pass_grads(wanted))]
            for layer in tucker:
                inputs, gC = layer.pass_inputs, opt.S_grad(layer)
                tucker_augment(opt, layer)
                stepped.append(layer)
                grads.append(tucker_galerkin_grad(opt, layer, inputs, gC, parallel=True))
        else:
            loss = opt.evaluate(closure, NONE, "coefficient")
            for layer in layers:
                if not layer.pending_growth:  # placeholder bases: nothing to step until they grow
                    stepped.append(layer)
                    grads.append(opt.S_grad(layer))
        S_steps(opt, stepped, grads)
        for layer, corner in corners:
            if layer not in opt.trends:  # the group's tau_mode was changed since construction
                continue
            trend = opt.trends[layer].clone()
            trend[-corner.shape[0] :, -corner.shape[1] :] = corner.to(trend.dtype)
            opt.trends[layer] = trend
        self.advance(opt)
        return loss
