"""Use GeoLoRA with ``transformers.Trainer`` without forking it.

Give the Trainer the optimizer and the callback::

    opt = model.make_optimizer(max_grad_norm=1.0)  # clipping belongs in the optimizer
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0),
                      optimizers=(opt, None), callbacks=[GeoLoRACallback(opt)])

The Trainer calls ``optimizer.step()`` after ``loss.backward()``, which the
one-pass ``parallel`` integrator supports. The callback warns loudly when the
Trainer is not stepping a :class:`~dlrt.DLRTOptimizer` (the integrator would
then never run and the adapters would not change rank), and logs the adapters'
total rank. Importing this module needs ``transformers``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from transformers import TrainerCallback

from ..optimizer import DLRTOptimizer

logger = logging.getLogger(__name__)

__all__ = ["GeoLoRACallback"]


def _unwrap(optimizer: Any) -> Any:
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer).
    seen = 0
    while optimizer is not None and not isinstance(optimizer, DLRTOptimizer) and seen < 4:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer


class GeoLoRACallback(TrainerCallback):
    """Checks that the GeoLoRA integrator runs under ``transformers.Trainer`` and logs ranks.

    Args:
        optimizer: the :class:`~dlrt.DLRTOptimizer` passed to the Trainer
            (default: whatever optimizer the Trainer reports).
        check_after: after this many optimizer steps, warn if the integrator
            has not stepped.
    """

    def __init__(self, optimizer: DLRTOptimizer | None = None, check_after: int = 1) -> None:
        self.optimizer = optimizer
        self.check_after = check_after
        self._start_steps: int | None = None
        self._warned = False
        #: ``(global_step, total adapter rank)`` at every logging step.
        self.rank_history: list[tuple[int, int]] = []

    def _find(self, kwargs: dict[str, Any]) -> DLRTOptimizer | None:
        return _unwrap(kwargs.get("optimizer")) or self.optimizer

    def _alarm(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.error(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer_opt = _unwrap(kwargs.get("optimizer"))
        if trainer_opt is None and kwargs.get("optimizer") is not None:
            self._alarm(
                "GeoLoRA: the Trainer steps a "
                f"{type(kwargs['optimizer']).__name__}, not a dlrt.DLRTOptimizer, so the GeoLoRA integrator will "
                "NEVER run (ranks stay fixed, bases drift off orthonormality). Pass "
                "optimizers=(model.make_optimizer(...), None) to Trainer."
            )
        opt = trainer_opt or self.optimizer
        self._start_steps = opt.steps if opt is not None else None
        if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            warnings.warn(
                f"GeoLoRA: TrainingArguments.max_grad_norm={args.max_grad_norm} clips only the parameters' "
                "gradients, not the projected basis gradients the integrator uses; set max_grad_norm=0.0 there "
                "and pass max_grad_norm= to make_optimizer() instead",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._find(kwargs)
        if opt is None:
            if state.global_step >= self.check_after:
                self._alarm("GeoLoRA: no dlrt.DLRTOptimizer found: the integrator never ran")
            return
        start = self._start_steps or 0
        if state.global_step >= self.check_after and opt.steps == start:
            self._alarm(
                f"GeoLoRA: {state.global_step} Trainer steps but the integrator has not stepped once: "
                "is the DLRTOptimizer the one passed to Trainer(optimizers=...)?"
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        opt = self._find(kwargs)
        if opt is None:
            return
        total = sum(layer.rank for layer in opt.lowrank_layers)
        self.rank_history.append((state.global_step, total))
        if logs is not None:
            logs["total_rank"] = total

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._find(kwargs)
        if state.global_step > 0 and (opt is None or opt.steps == (self._start_steps or 0)):
            self._alarm("GeoLoRA: training ended and the integrator never ran: the adapters did not adapt")
