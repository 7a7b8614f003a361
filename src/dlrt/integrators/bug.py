"""The basis-update & Galerkin integrators: rank-adaptive BUG and fixed-rank BUG.

"Low-rank lottery tickets" (Schotthöfer et al., NeurIPS 2022), docs/algorithms.md §2.
In the rank-adaptive BUG the augmented bases contain the old ones, so the
Galerkin point ``Û S̃ V̂ᵀ`` *is* ``W₀`` and the S-step's gradient ``Ûᵀ G₀ V̂`` is
the gradient of the K/L pass: one forward/backward pass per step, against three
in the authors' code. The fixed-rank BUG moves to bases that do not contain the
old ones and takes a second pass there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import linalg
from .base import (
    KL,
    NONE,
    Integrator,
    K_and_L_steps,
    KL_grads,
    S_steps,
    augment,
    change_basis,
    drop_state,
    split_layers,
    tucker_augment,
    tucker_fixed_rank_bases,
    tucker_galerkin_grad,
)

if TYPE_CHECKING:
    from ..optimizer import DLRTOptimizer

#: The K/L pass of the rank-adaptive BUG also keeps each layer's input and output gradient
#: (``"X"``), for the block ``Ũᵀ G₀ Ṽ`` of the S-step's gradient in the new directions.
KLX = frozenset({"K", "L", "X"})


class BUG(Integrator):
    """Rank-adaptive augmented BUG (docs/algorithms.md §2).

    Phase 0 (one pass at ``W₀``): ``K₁ = U₀S₀ − λG₀V₀``, ``L₁ = V₀S₀ᵀ − λG₀ᵀU₀``;
    ``Û = orth([U₀, K₁])``, ``V̂ = orth([V₀, L₁])``; Galerkin core
    ``S̃ = (ÛᵀU₀)S₀(V₀ᵀV̂)``, which represents ``W₀`` exactly; the S-step along
    ``ÛᵀG₀V̂``, from the same pass: ``U₀ᵀG₀V₀``, ``(G₀ᵀU₀)ᵀṼ``, ``Ũᵀ(G₀V₀)`` and
    ``Ũᵀ G₀ Ṽ`` contracted from the layer's recorded input and output gradient.
    Then ``coefficient_steps − 1`` further S-steps (each with its own pass) and
    the end of the cycle (:meth:`~dlrt.integrators.base.Integrator.end_cycle`:
    truncation, §1). Every step needs only the gradient at the current point,
    so ``step()`` also works after a plain ``loss.backward()``.

    Tucker layers take the same step mode by mode (TDLRT, docs/tucker.md): each
    adapted basis is augmented by its K-gradient's range, the Galerkin core
    represents ``W₀``, and the core steps along ``G₀ ×ᵢ Û_iᵀ`` contracted from the
    same pass; the truncation cuts every adapted mode by the SVD of its unfolding.
    """

    name = "bug"

    def request(self, phase: int) -> frozenset[str]:
        return KLX if phase == 0 else NONE

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        layers = opt.lowrank_layers
        if opt.phase == 0:
            loss = opt.evaluate(closure, KLX, "K/L/S")
            layers, tucker = split_layers(layers)
            for layer in layers:
                if layer.pending_growth:
                    # A fresh adapter: the K/L step from S₀ = 0 moves its placeholder bases to
                    # range(G V₀), range(Gᵀ U₀) (no separate growth); state of older factors is dropped.
                    drop_state(opt, layer)
                    layer.pending_growth = False
            pass_grads = [(opt.S_grad(layer), *KL_grads(opt, layer), layer.pass_inputs) for layer in layers]
            G_hats, corners, requests = [], [], []
            for layer, (gS, gK, gL, inputs), (_, _, dK, dL) in zip(layers, pass_grads, K_and_L_steps(opt, layers)):
                r_u, r_v = layer.S.shape
                # With one step per cycle the truncation follows in this step: it moves the K/L states.
                augment(opt, layer, dK, dL, defer_kl_state=self.coefficient_steps == 1)  # clears the pass's records
                U_new, V_new = layer.U.detach()[:, r_u:], layer.V.detach()[:, r_v:]
                G_hat = torch.empty_like(layer.S)
                G_hat[:r_u, :r_v] = gS
                G_hat[:r_u, r_v:] = gL.mT @ V_new  # U₀ᵀ G₀ Ṽ
                G_hat[r_u:, :r_v] = U_new.mT @ gK  # Ũᵀ G₀ V₀
                if U_new.shape[1] and V_new.shape[1]:
                    corners.append(G_hat[r_u:, r_v:])
                    requests.append((layer, U_new, V_new, inputs))
                G_hats.append(G_hat)
            # Ũᵀ G₀ Ṽ of all layers at once: with a process group, one all-reduce of the small blocks.
            for corner, g in zip(corners, opt.pass_grads(requests)):
                corner.copy_(g)
            for layer in tucker:
                inputs, gC = layer.pass_inputs, opt.S_grad(layer)
                tucker_augment(opt, layer)  # clears the pass's records
                G_hats.append(tucker_galerkin_grad(opt, layer, inputs, gC))
            S_steps(opt, layers + tucker, G_hats)
        else:
            loss = opt.evaluate(closure, NONE, "S")
            S_steps(opt, layers, [opt.S_grad(layer) for layer in layers])
        self.advance(opt)
        return loss


class FixedRankBUG(Integrator):
    """Fixed-rank BUG: ``U₁ = orth(K₁)``, ``V₁ = orth(L₁)``, Galerkin core, S-step at ``U₁ S̃ V₁ᵀ``; no truncation.

    A Tucker layer moves every adapted basis by its K-step
    (:func:`~dlrt.integrators.base.tucker_fixed_rank_bases`: plain gradient descent).

    The new bases do not contain the old ones, so the S-step's gradient is
    taken at a new point: two passes per step.
    """

    name = "fixed"
    adaptive = False
    passes_per_step = 2

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        layers = opt.lowrank_layers
        if opt.phase == 0:
            if closure is None:
                raise RuntimeError(
                    f"integrator {self.name!r} needs two passes per step: call step(closure) "
                    "with a closure that zeroes grads, computes the loss, calls backward and returns it"
                )
            opt.evaluate(closure, KL, "K/L")
            matrix, tucker = split_layers(layers)
            for layer in matrix:
                if layer.pending_growth:
                    drop_state(opt, layer)
                    layer.pending_growth = False
            for layer, (K1, L1, _, _) in zip(matrix, K_and_L_steps(opt, matrix)):
                change_basis(opt, layer, linalg.orth(K1), linalg.orth(L1))
            for layer in tucker:
                tucker_fixed_rank_bases(opt, layer)
        loss = opt.evaluate(closure, NONE, "S")
        S_steps(opt, layers, [opt.S_grad(layer) for layer in layers])
        self.advance(opt)
        return loss
