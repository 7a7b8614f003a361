"""What fails a step: non-finite losses, gradients and updated parameters (docs/algorithms.md §7).

A pass whose loss or gradients hold inf or NaN, or an update that makes a factor or a
dense parameter non-finite, raises :class:`NonFiniteError` naming the layer or
parameter; :class:`~dlrt.optimizer.DLRTOptimizer` then rolls the step back
(``rollback.py``). The checks read the gradients in one fused pass per device and
dtype (:func:`_any_nonfinite`) and look for the name only once something is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..integrators import Integrator
from ..layers import FactorizedLayer, TuckerConv2d


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient, or the update non-finite parameters; the step was not taken."""


class FiniteChecksMixin:
    """The finiteness checks of :class:`~dlrt.optimizer.DLRTOptimizer` (a part of that class)."""

    # Set by DLRTOptimizer.__init__.
    integrator: Integrator
    layer_names: list[str]
    lowrank_layers: list[FactorizedLayer]
    param_groups: list[dict[str, Any]]
    steps: int
    _dense_names: dict[int, str]

    def _check_finite(self, loss: Any, request: frozenset[str], what: str) -> None:
        where = f"step {self.steps} ({self.integrator.name!r} integrator, {what} pass)"
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"{where}: non-finite loss ({loss.detach().flatten()[:1].item()})")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise NonFiniteError(f"{where}: non-finite loss ({loss})")
        # A layer's S.grad carries any inf/NaN of its G V and Gᵀ U (layers/base.py, _carry_nonfinite),
        # so the fused check reads the small cores, not the n×r projected gradients.
        grads: list[Tensor] = []
        for layer in self.lowrank_layers:
            if layer.core.grad is not None:
                grads.append(layer.core.grad)
            else:
                grads += [g for g in _projected(layer) if g is not None]
        grads += [p.grad for group in self.param_groups[1:] for p in group["params"] if p.grad is not None]
        if not grads or not _any_nonfinite(grads):
            return
        named = []
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            if isinstance(layer, TuckerConv2d):
                labels = [f"mode {i} K-gradient" for i in range(len(layer.bases))] + ["core"]
                pairs = zip(labels, [*layer.grad_modes, layer.C.grad])
            else:
                pairs = zip(("G V", "Gᵀ U", "Uᵀ G V"), (layer.grad_K, layer.grad_L, layer.S.grad))
            named += [(f"layer {name!r} ({label})", g) for label, g in pairs]
        for group in self.param_groups[1:]:
            named += [(f"parameter {self._dense_names[id(p)]!r}", p.grad) for p in group["params"]]
        bad = next(n for n, g in named if g is not None and not bool(torch.isfinite(g).all()))
        raise NonFiniteError(f"{where}: non-finite gradient in {bad}")

    def _check_updated(
        self, dense: list[tuple[Tensor, Tensor, dict[str, Any]]] | None, cause: BaseException | None = None
    ) -> None:
        """Raise :class:`NonFiniteError` if the update made a factor or a dense parameter non-finite.

        One fused pass over the new factors and dense values (docs/algorithms.md §7): finite
        gradients with a step far too large are caught before they are committed.
        """
        tensors = [t.detach() for layer in self.lowrank_layers for t in layer.factor_parameters()]
        tensors += [value for _, value, _ in dense or ()]
        if not _any_nonfinite(tensors):
            return
        names = [
            f"factors of layer {name!r}"
            for name, layer in zip(self.layer_names, self.lowrank_layers)
            for _ in layer.factor_parameters()
        ]
        names += [f"parameter {self._dense_names[id(p)]!r}" for p, _, _ in dense or ()]
        bad = next(i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all()))
        where = f"step {self.steps} ({self.integrator.name!r} integrator)"
        raise NonFiniteError(
            f"{where}: the update made the {names[bad]} non-finite although the gradients were finite: "
            "the step is far too large (lower lr, or clip with max_grad_norm=)"
        ) from cause


def _projected(layer: FactorizedLayer) -> list[Tensor | None]:
    """The projected gradients a layer's backward recorded besides its core's ``.grad``."""
    if isinstance(layer, TuckerConv2d):
        return list(layer.grad_modes)
    return [layer.grad_K, layer.grad_L]


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[Any, Any], list[Tensor]]:
    groups: dict[tuple[Any, Any], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _any_nonfinite(tensors: list[Tensor]) -> bool:
    """Whether any tensor holds inf or NaN: one fused pass per (device, dtype), one sync."""
    flags = []
    for (device, dtype), ts in _by_device_and_dtype(tensors).items():
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            # float32 explicitly: the kernel refuses any other dtype, and the default dtype may be another.
            found = torch.zeros(1, dtype=torch.float32, device=device)
            # GradScaler's fused inf/NaN check; with a scale of 1 it leaves the tensors as they are.
            torch._amp_foreach_non_finite_check_and_unscale_(
                ts, found, torch.ones(1, dtype=torch.float32, device=device)
            )
            flags.append(found)
        else:
            flags.extend((~torch.isfinite(t).all()).to(torch.float32).reshape(1) for t in ts)
    return bool(torch.cat(flags).any()) if flags else False
