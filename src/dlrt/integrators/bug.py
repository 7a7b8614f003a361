"""The basis-update & Galerkin integrators: rank-adaptive BUG and fixed-rank BUG.

"Low-rank lottery tickets" (Schotthöfer et al., NeurIPS 2022), docs/algorithms.md §2.
K and L share one forward/backward pass (both gradients are taken at W₀), the
S-step takes a second: two passes per step, against three in the authors' code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import linalg
from .base import KL, NONE, Integrator, K_and_L_steps, S_step, augment, change_basis, drop_state

if TYPE_CHECKING:
    from ..optimizer import DLRTOptimizer


class BUG(Integrator):
    """Rank-adaptive augmented BUG (docs/algorithms.md §2).

    Phase 0 (one pass at ``W₀``): ``K₁ = U₀S₀ − λG₀V₀``, ``L₁ = V₀S₀ᵀ − λG₀ᵀU₀``;
    ``Û = orth([U₀, K₁])``, ``V̂ = orth([V₀, L₁])``; Galerkin core
    ``S̃ = (ÛᵀU₀)S₀(V₀ᵀV̂)``. Then ``coefficient_steps`` S-steps on the
    augmented core (the first in the same call, each with its own pass), and
    the end of the cycle (:meth:`~dlrt.integrators.base.Integrator.end_cycle`:
    truncation, §1).
    """

    name = "bug"
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
            for layer in layers:
                if layer.pending_growth:
                    # A fresh adapter: the K/L step from S₀ = 0 moves its placeholder bases to
                    # range(G V₀), range(Gᵀ U₀) (no separate growth); state of older factors is dropped.
                    drop_state(opt, layer)
                    layer.pending_growth = False
                self.new_bases(opt, layer, *K_and_L_steps(opt, layer))
        loss = opt.evaluate(closure, NONE, "S")
        for layer in layers:
            S_step(opt, layer, opt.S_grad(layer))
        self.advance(opt)
        return loss

    def new_bases(self, opt: DLRTOptimizer, layer: Any, K1: Any, L1: Any, dK: Any, dL: Any) -> None:
        # range([U₀, K₁]) = range([U₀, ΔK]); the step is the better-conditioned input.
        augment(opt, layer, dK, dL)


class FixedRankBUG(BUG):
    """Fixed-rank BUG: ``U₁ = orth(K₁)``, ``V₁ = orth(L₁)``, Galerkin core, S-step; no truncation."""

    name = "fixed"
    adaptive = False

    def new_bases(self, opt: DLRTOptimizer, layer: Any, K1: Any, L1: Any, dK: Any, dL: Any) -> None:
        change_basis(opt, layer, linalg.orth(K1), linalg.orth(L1))
