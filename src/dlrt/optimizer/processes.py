"""Data parallelism inside the optimizer: one process group, one all-reduce per pass (docs/distributed.md).

Every pass's gradients are averaged over the processes (:meth:`ProcessGroupMixin._average_pass`);
after every step the ranks are compared and rank 0's factors adopted where a truncation
decided differently (:meth:`~ProcessGroupMixin._agree_ranks`); every ``check_every``
steps the factors' checksums are compared (:meth:`~ProcessGroupMixin.check_consistency`).
At construction the processes check that they hold the same model
(:func:`_check_same_model`) and take rank 0's weights (:func:`_broadcast_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Communicator, DistributedError
from ..integrators.base import factor_state, layer_flags, restore_layer_flags, set_factor_state
from ..layers import FactorizedLayer
from .checks import _by_device_and_dtype


class ProcessGroupMixin:
    """Process-group averaging and consistency checks of :class:`~dlrt.optimizer.DLRTOptimizer` (a part of it)."""

    # Set by DLRTOptimizer.__init__.
    communicator: Communicator | None
    layer_names: list[str]
    lowrank_layers: list[FactorizedLayer]
    param_groups: list[dict[str, Any]]
    phase: int
    steps: int
    _dense_names: dict[int, str]

    def _average_pass(self, loss: Any, request: frozenset[str], what: str) -> bool:
        """Replace the pass's gradients by their mean over the processes: one all-reduce (docs/distributed.md).

        It carries every layer's ``Uᵀ G V`` (and ``G V``, ``Gᵀ U`` when the pass
        records them), the dense gradients, a presence flag for each (a gradient
        no process has stays ``None``) and whether this process's loss is
        non-finite. Every process passes the same layout: it follows from the
        ranks, which agree (:meth:`_agree_ranks`), and from ``request``.
        Returns whether another process had a non-finite loss.
        """
        assert self.communicator is not None
        slots: list[tuple[Tensor | None, tuple[int, ...], Tensor, Callable[[Tensor], None]]] = []
        for layer in self.lowrank_layers:
            S = layer.S
            slots.append((S.grad, tuple(S.shape), S, functools.partial(setattr, S, "grad")))
            if "K" in request:
                slots.append(
                    (layer.grad_K, (layer.U.shape[0], S.shape[1]), S, functools.partial(setattr, layer, "grad_K"))
                )
                slots.append(
                    (layer.grad_L, (layer.V.shape[0], S.shape[0]), S, functools.partial(setattr, layer, "grad_L"))
                )
        for group in self.param_groups[1:]:
            for p in group["params"]:
                slots.append((p.grad, tuple(p.shape), p, functools.partial(setattr, p, "grad")))
        tensors = [g.detach().to(like.dtype) if g is not None else like.new_zeros(shape) for g, shape, like, _ in slots]
        bad_loss = loss is not None and not bool(torch.isfinite(torch.as_tensor(loss).detach()).all())
        first = slots[0][2]
        flags = torch.tensor([float(g is not None) for g, *_ in slots] + [float(bad_loss)], dtype=first.dtype)
        tensors.append(flags.to(first.device))
        averaged = self.communicator.average(tensors, f"the {what} pass's gradients")
        present = averaged.pop().tolist()
        for (_, _, _, set_grad), g, flag in zip(slots, averaged, present):
            if flag > 0:
                set_grad(g)
        return present[-1] > 0 and not bad_loss

    def _agree_ranks(self) -> None:
        """Make every process hold rank 0's ranks: compare them (one small all-reduce); where a layer's differ
        (a truncation or augmentation decided differently in the last bits), adopt rank 0's factors and state."""
        comm = self.communicator
        assert comm is not None
        shapes = [s for m in self.lowrank_layers for s in m.S.shape]
        device = self.lowrank_layers[0].S.device
        v = torch.tensor(shapes, dtype=torch.int64, device=device)
        both = comm.all_reduce(torch.cat([v, -v]), "the ranks", op="max").cpu()
        high, low = both[: len(shapes)], -both[len(shapes) :]
        differ = [
            i
            for i in range(len(self.lowrank_layers))
            if bool((high[2 * i : 2 * i + 2] != low[2 * i : 2 * i + 2]).any())
        ]
        if differ:
            self._adopt_from_rank0(differ)

    def _adopt_from_rank0(self, which: list[int]) -> None:
        """Copy the factors, flags and factor state of the layers ``which`` from rank 0 to every process."""
        comm = self.communicator
        assert comm is not None
        payload = None
        if comm.rank == 0:
            payload = {}
            for i in which:
                layer = self.lowrank_layers[i]
                states = {
                    kind: {
                        k: v.cpu() if isinstance(v, Tensor) else v for k, v in factor_state(self, layer, kind).items()
                    }
                    for kind in ("K", "L", "S")
                }
                factors = [t.detach().cpu() for t in layer.factor_parameters()]
                payload[i] = (factors, layer_flags(layer), states)
        payload = comm.broadcast_object(payload, "rank 0's factors of the layers whose ranks differ")
        for i, (factors, flags, states) in payload.items():
            layer = self.lowrank_layers[i]
            like = layer.S
            layer.set_factors(*(t.to(device=like.device, dtype=like.dtype) for t in factors))
            restore_layer_flags(layer, flags)
            for kind, st in states.items():
                moved = {k: v.to(like.device) if isinstance(v, Tensor) else v for k, v in st.items()}
                set_factor_state(self, layer, kind, moved or None)

    @torch.no_grad()
    def check_consistency(self) -> None:
        """Raise :class:`~dlrt.distributed.DistributedError` unless all processes hold the same model.

        Compares, in one all-reduce, the step counter, every layer's ranks and
        checksums of its factors (norms and sums of ``U``, ``S``, ``V``; a sum
        also sees a column whose sign flipped) and of every dense parameter.
        Ranks must be equal, checksums equal to a relative 1e-6. The error names
        the first layer or parameter that differs. Without a process group it
        does nothing. Runs by itself every ``check_every`` steps.
        """
        comm = self.communicator
        if comm is None:
            return
        labels: list[str] = ["the step counter", "the cycle phase"]
        exact: list[bool] = [True, True]
        values: list[Tensor] = [torch.tensor(float(self.steps)), torch.tensor(float(self.phase))]
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            U, S, V = (t.detach() for t in (layer.U, layer.S, layer.V))
            labels += [f"layer {name!r} (ranks)"] * 2 + [f"layer {name!r} (factor checksums)"] * 6
            exact += [True, True] + [False] * 6
            values += [torch.tensor(float(r)) for r in S.shape]
            values += [t.norm() for t in (U, S, V)] + [t.sum() for t in (U, S, V)]
        for group in self.param_groups[1:]:
            for p in group["params"]:
                labels += [f"parameter {self._dense_names[id(p)]!r} (checksums)"] * 2
                exact += [False, False]
                values += [p.detach().norm(), p.detach().sum()]
        # Computed in each tensor's own dtype and device (deterministic on every process), compared in float64.
        v = torch.stack([t.cpu().to(torch.float64).reshape(()) for t in values])
        device = self.lowrank_layers[0].S.device
        both = comm.all_reduce(torch.cat([v, -v]).to(device), "the consistency checksums", op="max").cpu()
        high, low = both[: len(v)], -both[len(v) :]
        for label, is_exact, hi, lo in zip(labels, exact, high.tolist(), low.tolist()):
            if (hi != lo) if is_exact else abs(hi - lo) > 1e-6 * (1.0 + max(abs(hi), abs(lo))):
                raise DistributedError(
                    f"the {comm.size} processes have diverged at step {self.steps}: {label} range from {lo!r} to "
                    f"{hi!r}. Every process must run the same model, optimizer settings and number of steps on "
                    "the same hardware type; restart from the last checkpoint"
                )


def _check_same_model(comm: Communicator, model: nn.Module, named: list[tuple[str, FactorizedLayer]]) -> None:
    """Raise ``ValueError`` on every process unless all hold the same layers, ranks and parameter shapes."""
    params = [(n, p) for n, p in model.named_parameters()]
    device = named[0][1].core.device
    head = torch.tensor([len(named), len(params)], dtype=torch.int64, device=device)
    both = comm.all_reduce(torch.cat([head, -head]), "the model's layout", op="max").cpu()
    if bool((both[:2] != -both[2:]).any()):
        raise ValueError(
            f"the processes build different models ({len(named)} low-rank layers and {len(params)} parameters "
            "here, not on every process): give every process the same model and configuration"
        )
    sizes = [s for _, m in named for s in m.core.shape] + [p.numel() for _, p in params]
    v = torch.tensor(sizes, dtype=torch.int64, device=device)
    both = comm.all_reduce(torch.cat([v, -v]), "the model's shapes", op="max").cpu()
    differ = (both[: len(sizes)] != -both[len(sizes) :]).tolist()
    labels = [f"layer {n!r} (ranks)" for n, m in named for _ in m.core.shape]
    labels += [f"parameter {n!r} (size)" for n, _ in params]
    bad = [label for label, d in zip(labels, differ) if d]
    if bad:
        raise ValueError(
            f"the processes hold different models: {bad[0]} differs; give every process the same model, ranks "
            "and configuration (and load the same checkpoint)"
        )


@torch.no_grad()
def _broadcast_model(comm: Communicator, model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (one broadcast per device and dtype), as DDP starts."""
    tensors = [p for p in model.parameters()] + [b for b in model.buffers() if b.numel()]
    for (_, _), ts in _by_device_and_dtype(tensors).items():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        comm.broadcast(flat, "the model's parameters and buffers")
        for t, piece in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(piece.view_as(t))
