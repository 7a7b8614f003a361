"""Rollback: a failed step leaves the model and the optimizer exactly as they were (docs/algorithms.md §7).

Before a step :meth:`RollbackMixin._snapshot` keeps references to the factors, the
layers' flags and last pass, the low-rank state and the phase (the integrators
replace these, never write them in place); :meth:`RollbackMixin._restore` puts them
back. The model's buffers (BatchNorm statistics), which the step's forward passes do
update in place, are copied by :class:`_BufferGuard` the first time each module runs
and copied back on failure.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..integrators import Integrator
from ..integrators.base import layer_flags, restore_layer_flags
from ..layers import FactorizedLayer, LowRankLayer, TuckerConv2d
from .checks import _projected


class RollbackMixin:
    """Snapshot and restore of :class:`~dlrt.optimizer.DLRTOptimizer` (a part of that class)."""

    # Set by DLRTOptimizer.__init__ (state and param_groups by torch.optim.Optimizer).
    integrator: Integrator
    lowrank_layers: list[FactorizedLayer]
    param_groups: list[dict[str, Any]]
    state: Any
    phase: int
    deferred_kl_state: dict[LowRankLayer, tuple[int, int]]
    directions: dict[LowRankLayer, Any]
    _buffer_guard: _BufferGuard
    _set_request: Callable[[frozenset[str]], None]

    def _snapshot(self) -> tuple[Any, ...]:
        # Factors are replaced, never written in place, and state dicts are replaced, never
        # mutated (integrators/base.py); dense parameters are written only after every check.
        factors = [
            (tuple(p.data for p in m.factor_parameters()), layer_flags(m), _pass_of(m)) for m in self.lowrank_layers
        ]
        states = {p: self.state[p] for p in self.param_groups[0]["params"] if p in self.state}
        return factors, states, self.phase, dict(self.trends)

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self._buffer_guard.restore()
        self.deferred_kl_state.clear()
        self.directions = {}
        factors, states, phase, self.trends = saved
        for m, (data, flags, grads) in zip(self.lowrank_layers, factors):
            if any(p.data is not t for p, t in zip(m.factor_parameters(), data)):
                if isinstance(m, TuckerConv2d):
                    m.set_factors(data[:-1], data[-1])
                else:
                    m.set_factors(*data)
            restore_layer_flags(m, flags)
            _restore_pass(m, grads)  # a closure-free step can be retried on the same backward
        for p in self.param_groups[0]["params"]:
            if p in states:
                self.state[p] = states[p]
            else:
                self.state.pop(p, None)
        self.phase = phase
        self._set_request(self.integrator.request(phase))


def _pass_of(layer: FactorizedLayer) -> tuple[Any, ...]:
    """What the layer's last backward left: the gradients of its factors and its recorded projections."""
    return (tuple(p.grad for p in layer.factor_parameters()), _projected(layer), list(layer.pass_inputs))


def _restore_pass(layer: FactorizedLayer, saved: tuple[Any, ...]) -> None:
    grads, projected, inputs = saved
    for p, g in zip(layer.factor_parameters(), grads):
        p.grad = g
    if isinstance(layer, TuckerConv2d):
        layer.grad_modes = list(projected)
    else:
        layer.grad_K, layer.grad_L = projected
    layer.pass_inputs = inputs


def _inert_hook(*_: Any) -> None:
    """What a buffer hook becomes in a pickled or deep-copied model: nothing."""


def _make_inert_hook() -> Callable[..., None]:
    return _inert_hook


class _BufferHook:
    """Forward pre-hook of a module with buffers: hands the module to its guard before the forward."""

    def __init__(self, guard: _BufferGuard) -> None:
        self.guard = weakref.ref(guard)

    def __call__(self, module: nn.Module, args: Any) -> None:
        guard = self.guard()
        if guard is not None:
            guard.save(module)

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy of the model (pickle, deepcopy) is not guarded by this optimizer.
        return (_make_inert_hook, ())


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


class _BufferGuard:
    """Rolls the model's buffers (BatchNorm statistics and counters) back with a failed step (docs/algorithms.md §7).

    A forward pre-hook on every module that has floating or integer buffers copies
    them the first time the module runs in training mode since the last step (a
    module in eval mode does not update its buffers). A failed step copies them
    back; a finished one drops the copies. So the rollback covers the forward
    passes of a closure and the forward a closure-free ``step()`` follows, and
    costs one copy of those buffers per step: for BatchNorm two floats per channel
    and a counter, a few KiB for a ResNet, against megabytes of parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved: dict[int, tuple[nn.Module, list[tuple[str, Tensor, Tensor]]]] = {}
        handles = []
        for module in model.modules():
            if any(_guarded(b) for _, b in module.named_buffers(recurse=False)):
                handles.append(module.register_forward_pre_hook(_BufferHook(self)))
        weakref.finalize(self, _remove_hooks, handles)

    def save(self, module: nn.Module) -> None:
        if not module.training or id(module) in self.saved:
            return
        with torch.no_grad():
            copies = [(n, b, b.clone()) for n, b in module.named_buffers(recurse=False) if _guarded(b)]
        self.saved[id(module)] = (module, copies)

    def restore(self) -> None:
        with torch.no_grad():
            for module, copies in self.saved.values():
                for name, buf, copy in copies:
                    buf.copy_(copy)
                    if module._buffers.get(name) is not buf:  # the forward replaced the tensor
                        module._buffers[name] = buf
        self.saved.clear()

    def clear(self) -> None:
        self.saved.clear()

    def nbytes(self) -> int:
        """Bytes held by the current copies."""
        return sum(c.nbytes for _, copies in self.saved.values() for _, _, c in copies)


def _guarded(buf: Tensor | None) -> bool:
    return buf is not None and buf.numel() > 0 and (buf.is_floating_point() or _is_int(buf.dtype))


def _is_int(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
