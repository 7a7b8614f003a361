"""The augmented backward-corrected projector-splitting integrator (ABC-PSI), docs/algorithms.md §10.

Kusch, Schotthöfer, Walter, "An augmented backward-corrected projector splitting
integrator for dynamical low-rank training" (2025). A projector-splitting
integrator steps ``K``, then ``S`` backwards, then ``L``; the backward S-step is
what makes the classical one unstable for small singular values. ABC replaces it
by a projection onto an augmented basis, which needs no gradient:

1. K-step at ``W₀``: ``K¹ = U₀S₀ − λ G₀V₀``;
2. augmentation ``Û = orth([U₀, K¹])`` (the old basis first);
3. backward-corrected coefficients ``Ŝ = ÛᵀU₀S₀`` (``2r×r``): ``Û Ŝ V₀ᵀ = W₀``;
4. L-step from ``L⁰ = V₀Ŝᵀ`` along ``∇_L ℒ(Û Lᵀ) = G₀ᵀÛ``, taken at ``Û L⁰ᵀ = W₀``:
   ``L¹ = L⁰ − λ G₀ᵀÛ``;
5. truncation of ``W₁ = Û L¹ᵀ``.

Every gradient is taken at ``W₀``, so one pass serves the step: ``G₀ᵀU₀`` comes
from the backward and ``G₀ᵀŨ`` (the new directions) is contracted from the
layer's recorded input and output gradient. With one step per cycle the
truncation is the SVD of ``L¹`` itself (``W₁ = (Û P) Σ Qᵀ`` for ``L¹ᵀ = P Σ Qᵀ``):
one QR (the augmentation) and one SVD per layer and step, against two QRs and
one SVD for ``bug``. With ``coefficient_steps > 1`` the cycle first splits
``L¹ = V̂ R`` (a second QR), moves the layer to ``(Û, Rᵀ, V̂)`` and takes the
remaining S-steps there before it truncates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import linalg
from .base import (
    NONE,
    Integrator,
    KL_grads,
    S_steps,
    augment,
    change_basis,
    drop_state,
    factor_state,
    factor_steps,
)

if TYPE_CHECKING:
    from ..optimizer import DLRTOptimizer

#: One pass: G V, Gᵀ U and the recorded inputs for G₀ᵀŨ.
KLX = frozenset({"K", "L", "X"})


class ABC(Integrator):
    """Rank-adaptive augmented backward-corrected projector-splitting integrator (docs/algorithms.md §10).

    Phase 0 (one pass at ``W₀``): K-step, ``Û = orth([U₀, K¹ − U₀S₀])``, ``Ŝ = ÛᵀU₀S₀``,
    L-step ``L¹ = V₀Ŝᵀ − λ G₀ᵀÛ``; with ``coefficient_steps=1`` truncation of
    ``Û L¹ᵀ`` by the SVD of ``L¹``; otherwise ``L¹ = V̂R``, the layer moves to
    ``(Û, Rᵀ, V̂)``, and ``coefficient_steps − 1`` S-steps (each with its own
    pass) precede the truncation. Every step needs only the gradient at the
    current point, so ``step()`` also works after a plain ``loss.backward()``.
    """

    name = "abc"
    tucker = False  # the backward-corrected L-step has no Tucker form here

    def request(self, phase: int) -> frozenset[str]:
        return KLX if phase == 0 else NONE

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        layers = opt.lowrank_layers
        if opt.phase > 0:
            loss = opt.evaluate(closure, NONE, "S")
            S_steps(opt, layers, [opt.S_grad(layer) for layer in layers])
            self.advance(opt)
            return loss
        loss = opt.evaluate(closure, KLX, "K/L")
        for layer in layers:
            if layer.pending_growth:
                # A fresh adapter: the K-step from S₀ = 0 moves its placeholder basis to range(G V₀).
                drop_state(opt, layer)
                layer.pending_growth = False
        records = [layer.pass_inputs for layer in layers]
        directions = [KL_grads(opt, layer) for layer in layers]
        K_items = [(layer, "K", layer.U.detach() @ layer.S.detach(), dK) for layer, (dK, _) in zip(layers, directions)]
        K_deltas = factor_steps(opt, K_items)
        L_items, blocks, requests = [], [], []
        for layer, (_, dL), dK_step, inputs in zip(layers, directions, K_deltas, records):
            r_u = layer.S.shape[0]
            V0 = layer.V.detach()
            augment(opt, layer, dK_step, None)  # Û = orth([U₀, ΔK]), Ŝ = ÛᵀU₀S₀; clears the pass's records
            U_new = layer.U.detach()[:, r_u:]
            grad = torch.empty(V0.shape[0], layer.U.shape[1], dtype=dL.dtype, device=dL.device)
            grad[:, :r_u] = dL  # G₀ᵀU₀
            if U_new.shape[1]:
                blocks.append(grad[:, r_u:])
                requests.append((layer, U_new, None, inputs))
            L_items.append((layer, "L", V0 @ layer.S.detach().mT, grad))
        # G₀ᵀŨ of all layers at once: with a process group, one all-reduce.
        for block, g in zip(blocks, opt.pass_grads(requests)):
            block.copy_(g.mT)
        L_deltas = factor_steps(opt, L_items)
        L1s = {layer: L0 + dL for (layer, _, L0, _), dL in zip(L_items, L_deltas)}
        if opt.lowrank_group["tau_mode"] == "gradient":  # its trend, in the coordinates of W₁ = Û L¹ᵀ
            for layer, _, _, grad in L_items:
                opt.trends[layer] = opt.rule.trend(grad, factor_state(opt, layer, "L")).mT
        if self.coefficient_steps == 1:
            self.advance(opt, cores={layer: L1.mT for layer, L1 in L1s.items()})
            return loss
        for layer, L1 in L1s.items():
            V_hat, R = linalg.qr(L1)
            V0 = layer.V.detach()
            eye = torch.eye(layer.U.shape[1], dtype=R.dtype, device=R.device)
            change_basis(opt, layer, layer.U.detach(), V_hat, S1=R.mT, A=eye, B=V0.mT @ V_hat)
        self.advance(opt)
        return loss
