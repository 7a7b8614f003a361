"""Measured memory of one training step, on CPU as on CUDA (for the benchmarks).

``peak_step_bytes(step, device)`` runs ``step()`` once and returns the peak of
the bytes allocated *during* it (activations, gradients, optimizer
temporaries), above what was allocated before it:

* on CUDA from the caching allocator's counters
  (``torch.cuda.max_memory_allocated``);
* on CPU from the allocation and free events of ``torch.profiler``
  (``profile_memory=True``), summed in time order. Blocks allocated before the
  step and freed during it are not counted as freed, so the figure is an
  upper bound when ``step`` frees older tensors (call ``zero_grad`` first).

A step's peak memory is then :func:`resident_bytes` (what a model and its
optimizer hold between steps) plus this figure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["peak_step_bytes", "resident_bytes"]


def resident_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> int:
    """Bytes of all parameters, buffers, existing gradients and optimizer state.

    Counted by storage, so tensors that share memory (tied weights, views) count once.
    """
    tensors: list[Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if opt is not None:
        tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_step_bytes(step: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``step()`` runs, above the bytes allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"peak_step_bytes measures CPU and CUDA steps, not {device.type!r}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak
