"""What scales a pass's gradients: GradScaler's unscaling (fp16 AMP) and clipping by ``max_grad_norm``.

Both act on every gradient the integrator steps with: the projected gradients
``G V``, ``Gᵀ U``, ``Uᵀ G V`` (or a Tucker layer's), the dense gradients, and, through
``_pass_scale``, the contractions of the recorded inputs that ``pass_grad`` computes
later. The clipping norm is the tangent-space norm (see ``max_grad_norm`` in
:class:`~dlrt.optimizer.DLRTOptimizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..distributed import Communicator
from ..integrators import Integrator
from ..layers import FactorizedLayer, TuckerConv2d
from .checks import _by_device_and_dtype, _projected


class ScalingMixin:
    """AMP unscaling and gradient clipping of :class:`~dlrt.optimizer.DLRTOptimizer` (a part of that class)."""

    #: torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` and lets ``step`` unscale and skip.
    _step_supports_amp_scaling = True

    # Set by DLRTOptimizer.__init__.
    communicator: Communicator | None
    integrator: Integrator
    lowrank_layers: list[FactorizedLayer]
    param_groups: list[dict[str, Any]]
    max_grad_norm: float | None
    last_grad_norm: float | None
    _pass_scale: float

    def _pass_grads(self) -> tuple[list[Tensor], Tensor | None]:
        """The gradients of the last pass, and the squared global norm (tangent norm per layer)."""
        grads: list[Tensor] = []
        squares: list[Tensor] = []
        for layer in self.lowrank_layers:
            if isinstance(layer, TuckerConv2d):
                gC = layer.C.grad
                modes = [(B.detach(), g) for B, g in zip(layer.bases, layer.grad_modes) if g is not None]
                grads += ([] if gC is None else [gC]) + [g for _, g in modes]
                # The tangent norm: the core's gradient, and each mode's K-gradient outside its basis.
                squares += [] if gC is None else [gC.square().sum()]
                squares += [(g.square().sum() - (B.mT @ g).square().sum()).clamp_min(0) for B, g in modes]
                continue
            gS, gK, gL = layer.S.grad, layer.grad_K, layer.grad_L
            present = [g for g in (gS, gK, gL) if g is not None]
            grads += present
            if gK is not None and gL is not None and gS is not None:
                squares.append(gK.square().sum() + gL.square().sum() - gS.square().sum())
            else:
                squares += [g.square().sum() for g in present]
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    grads.append(p.grad)
                    squares.append(p.grad.square().sum())
        if not squares:
            return grads, None
        return grads, torch.stack([q.to(squares[0].device, torch.float64) for q in squares]).sum().clamp_min(0.0)

    def _clip(self) -> None:
        if self.max_grad_norm is None:
            return
        grads, square = self._pass_grads()
        if square is None:
            return
        norm = float(square.sqrt())
        self.last_grad_norm = norm
        if norm > self.max_grad_norm:
            scale = self.max_grad_norm / norm
            for g in grads:
                g.mul_(scale)
            self._pass_scale *= scale

    def _amp_unscale(self, closure: Callable[[], Any] | None) -> bool:
        """GradScaler's protocol (``_step_supports_amp_scaling``): validate, then unscale or report an overflow.

        Returns whether the scaler found an overflow (the step must then be skipped).
        Nothing is changed when this raises.
        """
        scale, found_inf = self.__dict__.get("grad_scale"), self.__dict__["found_inf"]
        if self.communicator is not None:
            raise RuntimeError(
                "torch.amp.GradScaler is not supported with a process group: each process would decide alone "
                "whether to skip a step. Use bf16 autocast (torch.autocast(device, dtype=torch.bfloat16)) instead"
            )
        if self.integrator.passes_per_step > 1:
            raise RuntimeError(
                f"integrator {self.integrator.name!r} takes two forward/backward passes per step (a closure), "
                "which torch.amp.GradScaler cannot drive: use bf16 autocast without a scaler "
                "(torch.autocast(device, dtype=torch.bfloat16)), or integrator='bug' or 'parallel' with fp16 "
                "and GradScaler"
            )
        if closure is not None:
            raise RuntimeError(
                "torch.amp.GradScaler cannot drive a step with a closure (the closure's loss is not scaled): "
                "call scaler.scale(loss).backward(), then scaler.step(optimizer) without a closure"
            )
        if scale is None:
            raise RuntimeError(
                "scaler.unscale_(optimizer) was called before scaler.step(optimizer): it unscales only .grad, "
                "not the projected gradients G V and Gᵀ U this optimizer steps with. Drop the unscale_ call; "
                "to clip gradients pass max_grad_norm= to DLRTOptimizer (it clips after unscaling)"
            )
        if bool(found_inf):
            return True
        grads: list[Tensor] = []
        for layer in self.lowrank_layers:
            grads += [g for g in (*_projected(layer), layer.core.grad) if g is not None]
        for group in self.param_groups[1:]:
            grads += [p.grad for p in group["params"] if p.grad is not None]
        # As GradScaler.unscale_: the reciprocal in float64, applied in float32.
        inv = scale.double().reciprocal().float()
        for (device, _), ts in _by_device_and_dtype(grads).items():
            torch._foreach_mul_(ts, inv.to(device))
        self._pass_scale *= float(inv)  # the recorded pass inputs (pass_grad) are unscaled lazily
        return False
