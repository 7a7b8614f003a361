"""``DLRTOptimizer``: the torch.optim-style object users drive.

It owns the bookkeeping (which layers, which dense parameters, optimizer
state, the integrator's phase), runs the forward/backward passes an integrator
asks for, checks them, and makes every step all-or-nothing: a non-finite loss,
gradient or updated parameter leaves factors, dense parameters, optimizer state
and the model's buffers exactly as they were (docs/algorithms.md §7).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import Communicator, DistributedError, resolve_group
from .integrators import INTEGRATORS, Integrator
from .integrators.base import factor_state, layer_flags, restore_layer_flags, set_factor_state, settle_kl_state
from .layers import FactorizedLayer, LowRankLayer, TuckerConv2d, check_rank
from .optim import RULES
from .optim.inner import InnerRule, check_real


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient, or the update non-finite parameters; the step was not taken."""


_UNSET: Any = object()


class DLRTOptimizer(torch.optim.Optimizer):
    """Train a model's low-rank layers with a geometric integrator, and the rest densely.

    Args:
        model: a module holding :class:`~dlrt.layers.LowRankLayer` s (see
            :func:`dlrt.convert`). Its other trainable parameters (biases,
            norms, layers left dense) are trained by the same inner optimizer
            in the same step.
        integrator: ``"bug"`` (rank-adaptive BUG), ``"parallel"`` or ``"abc"``
            (augmented backward-corrected projector splitting; all three one
            pass per step), or ``"fixed"`` (fixed-rank BUG, two passes per step).
        optimizer: inner optimizer for K, L, S and the dense parameters:
            ``"sgd"``, ``"adam"`` or ``"adamw"`` (per entry of K, L, S), or the
            geometric ``"geo-heavyball"`` and ``"geo-adam"``, whose momentum is a
            tangent vector of the manifold, carried across every augmentation
            and truncation (docs/algorithms.md §9); the dense parameters then
            take SGD with momentum and Adam.
        lr: learning rate λ (default: the inner optimizer's, 0.01 for SGD and
            1e-3 for Adam/AdamW).
        dense_lr: learning rate of the dense parameters (default: ``lr``), e.g.
            a larger one for a new classifier head. It is the dense parameter
            group's ``lr``, so a learning-rate scheduler scales it with ``lr``.
        momentum: SGD and geo-heavyball (β, default 0 and 0.9).
        dampening, nesterov: SGD only.
        betas, eps: Adam, AdamW and geo-adam.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) decay. On K, L, S it
            is the projected gradient of ``‖W‖²/2``; the bases U, V never decay.
        tau: truncation tolerance ϑ = τ‖σ‖₂ (``tau_mode="relative"``) or ϑ = τ
            (``"absolute"``). Every float hyper-parameter must be finite and in
            its range; a bad one is a ``ValueError`` naming it.
        truncation: ``"local"`` (each layer by its own σ) or ``"global"``
            (σ of all layers pooled, GeoLoRA).
        budget: with global truncation, at most this many singular values
            (the sum of all ranks) are kept.
        max_rank, min_rank: override the bounds stored in every layer. A
            layer whose current rank exceeds its (resulting) ``max_rank`` is an
            error naming the layer: truncate it first, or raise the bound.
        coefficient_steps: S-steps per augmentation (docs/algorithms.md §8); default 1, or
            the integrator instance's own when ``integrator`` is an instance.
        max_grad_norm: clip every pass's gradients to this global norm (None:
            no clipping). The norm is the Riemannian one the integrator steps
            along: per low-rank layer the tangent projection of ``G``,
            ``‖P(G)‖² = ‖GV‖² + ‖GᵀU‖² − ‖UᵀGV‖²`` (only ``‖UᵀGV‖²`` in an
            S-only pass), plus the dense gradients; all of them are scaled by
            ``min(1, max_grad_norm / norm)``. The norm before clipping is
            kept in :attr:`last_grad_norm`. (``torch.nn.utils.clip_grad_norm_``
            and Trainer's ``max_grad_norm`` see only ``.grad``, not ``GV``, ``GᵀU``.)
        on_nonfinite: ``"raise"`` a :class:`NonFiniteError`, or ``"skip"``
            the step with a warning; either way nothing changes. A step fails
            on a non-finite loss or gradient, and on finite gradients whose
            update makes a factor or dense parameter non-finite (a step size
            far too large). "Nothing changes" covers the factors, the dense
            parameters, the optimizer state and the model's buffers (BatchNorm
            statistics updated by the failed forward passes, including a
            forward run before a closure-free ``step()``).
        process_group: average every pass over the processes of this
            ``torch.distributed`` group (data parallelism, docs/distributed.md);
            default: the default group when ``torch.distributed`` is initialised,
            none otherwise. One all-reduce per pass carries the projected
            gradients ``G V``, ``Gᵀ U``, ``Uᵀ G V`` and the dense gradients; the
            ranks are compared after every step and rank 0's decision is adopted
            where they differ; the model is broadcast from rank 0 here.
        check_every: with a process group, compare the ranks and factor
            checksums of all processes every this many steps
            (:meth:`check_consistency`; 0: only on demand).

    A step is ``loss = opt.step(closure)``; the closure zeroes the gradients,
    computes the loss, calls ``backward()`` and returns the loss, and the
    integrator calls it as often as its method needs. ``bug`` and ``parallel``
    also accept ``opt.step()`` after a plain ``loss.backward()``.

    Mixed precision: bf16 autocast (``torch.autocast(device, dtype=torch.bfloat16)``)
    works with every integrator and needs no scaler. fp16 autocast with
    ``torch.amp.GradScaler`` works with ``bug`` and ``parallel``: call
    ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
    The optimizer follows GradScaler's protocol for optimizers that unscale
    themselves (``_step_supports_amp_scaling``): it unscales the projected
    gradients ``G V``, ``Gᵀ U``, ``Uᵀ G V`` (and what ``bug`` contracts from the
    recorded output gradients) and the dense gradients, and skips the
    step (changing nothing) when the scaler found an overflow, so the scaler
    lowers its scale. Each layer's ``S.grad`` carries the non-finiteness of its
    ``G V``/``Gᵀ U``, so the scaler's check sees an overflow in them too.
    The two-pass ``fixed`` integrator needs a closure, which GradScaler
    cannot drive: it raises a clear error (use bf16 autocast, or ``bug`` or
    ``parallel``). ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` is
    refused: it unscales only ``.grad``, not ``G V``/``Gᵀ U``; clip with
    ``max_grad_norm=`` instead, which acts after the unscaling.
    """

    #: torch.amp.GradScaler sets ``grad_scale`` and ``found_inf`` and lets ``step`` unscale and skip.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        integrator: str | Integrator = "bug",
        optimizer: str = "sgd",
        lr: float | None = None,
        *,
        dense_lr: float | None = None,
        momentum: float = _UNSET,
        dampening: float = _UNSET,
        nesterov: bool = _UNSET,
        betas: tuple[float, float] = _UNSET,
        eps: float = _UNSET,
        weight_decay: float = 0.0,
        tau: float = 0.1,
        tau_mode: str = "relative",
        truncation: str = "local",
        budget: int | None = None,
        max_rank: int | None = None,
        min_rank: int | None = None,
        coefficient_steps: int | None = None,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "raise",
        process_group: Any = None,
        check_every: int = 100,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DLRTOptimizer expects the model (an nn.Module), got {type(model).__name__}")
        self.integrator = _make_integrator(integrator, coefficient_steps)
        if optimizer not in RULES:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(RULES)}")
        self.rule: InnerRule = RULES[optimizer]()
        hyper = dict(self.rule.defaults)
        given = {"momentum": momentum, "dampening": dampening, "nesterov": nesterov, "betas": betas, "eps": eps}
        for key, value in given.items():
            if value is _UNSET:
                continue
            if key not in hyper:
                valid = sorted(k for k in given if k in hyper)
                raise ValueError(f"{key}= does not apply to optimizer={optimizer!r} (it takes {valid})")
            hyper[key] = value
        if lr is not None:
            hyper["lr"] = lr
        hyper["weight_decay"] = weight_decay
        if "betas" in hyper and isinstance(hyper["betas"], (tuple, list)):
            hyper["betas"] = tuple(hyper["betas"])
        self.rule.validate(hyper)  # every float finite and in range, named in the message
        tau = check_real("tau", tau, low=0.0)
        if tau_mode not in ("relative", "absolute"):
            raise ValueError(f"tau_mode must be 'relative' or 'absolute', got {tau_mode!r}")
        if truncation not in ("local", "global"):
            raise ValueError(f"truncation must be 'local' or 'global', got {truncation!r}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
                raise TypeError(f"budget must be an int (a total rank) or None, got {budget!r}")
            if truncation != "global" or budget < 1:
                raise ValueError("budget= needs truncation='global' and a positive total rank")
            budget = int(budget)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if max_grad_norm is not None:
            max_grad_norm = check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        if dense_lr is not None:
            dense_lr = check_real("dense_lr", dense_lr, low=0.0)

        named = [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLayer) and m.core.requires_grad]
        if not named:
            raise ValueError(
                "the model has no trainable low-rank layers: convert it first with "
                "dlrt.convert(model, rank=...) or build it from dlrt.LowRankLinear/LowRankConv2d"
            )
        tucker = [n for n, m in named if isinstance(m, TuckerConv2d)]
        if tucker and (self.rule.geometric or not self.integrator.tucker):
            what = f"optimizer={optimizer!r}" if self.rule.geometric else f"integrator={self.integrator.name!r}"
            raise ValueError(
                f"{what} does not drive Tucker layers ({', '.join(tucker)}): use integrator 'bug', 'parallel' "
                "or 'fixed' with optimizer 'sgd', 'adam' or 'adamw', or convert those layers with conv='matrix'"
            )
        bounds = [_rank_bounds(name, layer, min_rank, max_rank) for name, layer in named]
        if isinstance(check_every, bool) or not isinstance(check_every, numbers.Integral) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0 (0: only on demand), got {check_every!r}")
        group = resolve_group(process_group)
        comm = None
        if group is not None:
            if tucker:
                raise ValueError(
                    f"data-parallel training does not drive Tucker layers yet ({', '.join(tucker)}): convert them "
                    "with conv='matrix', or train in one process"
                )
            comm = Communicator(group)
            _check_same_model(comm, model, named)
        if budget is not None and budget < sum(lo for lo, _ in bounds):
            raise ValueError(f"budget={budget} is below the sum of min_rank over {len(named)} layers")
        # Everything is validated: from here on the model and this object change.
        self.on_nonfinite = on_nonfinite
        self.max_grad_norm = max_grad_norm
        #: Global gradient norm of the last pass, before clipping (see ``max_grad_norm``).
        self.last_grad_norm: float | None = None
        for (_, layer), (lo, hi) in zip(named, bounds):
            layer.min_rank, layer.max_rank = lo, hi
        self.layer_names = [n for n, _ in named]
        self.lowrank_layers: list[FactorizedLayer] = [m for _, m in named]
        factor_ids = {id(p) for m in self.lowrank_layers for p in m.factor_parameters()}
        self._dense_names: dict[int, str] = {}
        dense = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in factor_ids:
                dense.append(p)
                self._dense_names[id(p)] = name
        groups = [
            {
                "params": [p for m in self.lowrank_layers for p in m.factor_parameters()],
                "kind": "lowrank",
                "tau": float(tau),
                "tau_mode": tau_mode,
                "truncation": truncation,
                "budget": budget,
            }
        ]
        if dense:
            groups.append({"params": dense, "kind": "dense", **({} if dense_lr is None else {"lr": dense_lr})})
        super().__init__(groups, hyper)
        self.phase = 0
        self.steps = 0
        #: Factor clipping and unscaling applied to the last pass's gradients (pass_grad applies it too).
        self._pass_scale = 1.0
        #: Layers whose K/L states an augmentation left in the old coordinates for a truncation later in
        #: the same step (integrators/base.py, augment); empty between steps.
        self.deferred_kl_state: dict[LowRankLayer, tuple[int, int]] = {}
        #: A geometric optimizer's step direction per layer for the current pass (optim/geometric.py);
        #: empty between steps.
        self.directions: dict[LowRankLayer, Any] = {}
        self._buffer_guard = _BufferGuard(model)
        self._set_request(self.integrator.request(0))
        #: The process group's collectives (None: single process); ``communicator.bytes`` counts their payload.
        self.communicator: Communicator | None = comm
        self.check_every = int(check_every)
        if comm is not None:
            _broadcast_model(comm, model)

    # ------------------------------------------------------------- properties
    @property
    def lowrank_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    # ---------------------------------------------------------------- passes
    def _set_request(self, request: frozenset[str]) -> None:
        for layer in self.lowrank_layers:
            layer.grad_request = request

    def evaluate(self, closure: Callable[[], Any] | None, request: frozenset[str], what: str) -> Any:
        """Run one forward/backward pass (or use the gradients already there) and check it."""
        if closure is None:
            loss = None
            self._require_grads(request)
        else:
            self._set_request(request)
            self._pass_scale = 1.0
            with torch.enable_grad():
                loss = closure()
        peers_bad_loss = self._average_pass(loss, request, what) if self.communicator is not None else False
        self._check_finite(loss, request, what)
        if peers_bad_loss:
            where = f"step {self.steps} ({self.integrator.name!r} integrator, {what} pass)"
            raise NonFiniteError(f"{where}: non-finite loss on another process")
        self._clip()
        if self.rule.geometric:
            self._set_directions()
        return loss

    # ---------------------------------------------------------- processes
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

    def _set_directions(self) -> None:
        """A geometric optimizer's step direction per layer for this pass, and its new tangent momentum.

        The gradients stay as the pass left them (a failed step can be retried);
        the integrator reads the directions through ``KL_grads`` / :meth:`S_grad` /
        :meth:`pass_grad`. Layers the loss did not reach, and fresh adapters still
        waiting for their bases, step along the plain gradient (none).
        """
        self.directions = {}
        group = self.lowrank_group
        for layer in self.lowrank_layers:
            gS = layer.S.grad
            if gS is None or layer.pending_growth:  # (geometric optimizers drive matrix layers only)
                continue
            factors = (layer.U.detach(), layer.S.detach(), layer.V.detach())
            states = tuple(factor_state(self, layer, kind) for kind in ("K", "L", "S"))
            direction, new = self.rule.direction(factors, (layer.grad_K, layer.grad_L, gS), states, group)
            for kind, st in zip(("K", "L", "S"), new):
                set_factor_state(self, layer, kind, st)
            self.directions[layer] = direction

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

    def S_grad(self, layer: LowRankLayer) -> Tensor:
        """``Uᵀ D V`` for the last pass's step direction ``D`` (the gradient, or with a geometric optimizer
        the gradient combined with the momentum); zeros for a layer the loss did not reach."""
        direction = self.directions.get(layer)
        if direction is not None:
            return direction.S.to(layer.S.dtype)
        g = layer.core.grad
        return torch.zeros_like(layer.core) if g is None else g

    def pass_grad(
        self, layer: LowRankLayer, left: Tensor, right: Tensor | None, records: list[Any] | None = None
    ) -> Tensor:
        """``leftᵀ D right`` for the layer's step direction ``D`` of the last pass (``right=None``: ``leftᵀ D``).

        ``D`` is the gradient, clipped and unscaled as the pass was, or with a
        geometric optimizer the gradient combined with the momentum (:meth:`S_grad`).

        Needs a pass that recorded its inputs (``"X"`` in the request; ``records``
        as for :meth:`~dlrt.layers.LowRankLayer.project_grad`); zeros for a
        layer the loss did not reach.
        """
        if self.communicator is not None:
            return self.pass_grads([(layer, left, right, records)])[0]
        g = layer.project_grad(left, right, records)
        if g is not None and self._pass_scale != 1.0:
            g = g * self._pass_scale
        direction = self.directions.get(layer)
        if direction is not None:  # leftᵀ D right, D = a G + N (optim/geometric.py)
            return direction.project(g, left, right).to(left.dtype)
        if g is None:
            return left.new_zeros(left.shape[1], (layer.shape[1] if right is None else right.shape[1]))
        return g

    def pass_grads(self, requests: list[tuple[LowRankLayer, Tensor, Tensor | None, list[Any] | None]]) -> list[Tensor]:
        """:meth:`pass_grad` of every ``(layer, left, right, records)``; with a process group the
        local contractions are averaged over the processes in one all-reduce (before a geometric
        optimizer's momentum is added), so integrators ask for all of a step's at once."""
        if self.communicator is None:
            return [self.pass_grad(*r) for r in requests]
        local = []
        for layer, left, right, records in requests:
            g = layer.project_grad(left, right, records)
            if g is None:
                g = left.new_zeros(left.shape[1], (layer.shape[1] if right is None else right.shape[1]))
            elif self._pass_scale != 1.0:
                g = g * self._pass_scale
            local.append(g)
        out = []
        for (layer, left, right, _), g in zip(requests, self.communicator.average(local, "the contracted gradients")):
            direction = self.directions.get(layer)
            out.append(g if direction is None else direction.project(g, left, right).to(left.dtype))
        return out

    def _require_grads(self, request: frozenset[str]) -> None:
        if all(layer.core.grad is None for layer in self.lowrank_layers):
            raise RuntimeError(
                "step() was called without a closure and no gradients are present: call loss.backward() "
                "first, or pass step(closure)"
            )
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            if layer.core.grad is None:
                continue
            if isinstance(layer, TuckerConv2d):
                modes = any(layer.grad_modes[i] is not None for i in layer.tucker_modes)
                recorded = (("K", modes), ("L", modes), ("X", layer.pass_inputs))
            else:
                recorded = (("K", layer.grad_K is not None), ("L", layer.grad_L is not None), ("X", layer.pass_inputs))
            for kind, present in recorded:
                if kind in request and not present:
                    what = "inputs" if kind == "X" else f"projected gradient {kind}"
                    raise RuntimeError(
                        f"layer {name!r} has no recorded {what}: the backward pass ran "
                        "before this optimizer was created or after its grad_request was changed"
                    )

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

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One integrator step; see the class docstring. Returns the closure's last loss."""
        if "found_inf" in self.__dict__:  # called by torch.amp.GradScaler.step
            try:
                overflow = self._amp_unscale(closure)
            except BaseException:
                # GradScaler deletes these only after a step that returns.
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
                raise
            if overflow:  # the scaler lowers its scale in update(); this step changes nothing
                self._buffer_guard.clear()
                return None
        if closure is not None:
            self._buffer_guard.clear()  # the closure's own forward passes are this step's
        saved = self._snapshot()
        try:
            try:
                loss = self.integrator.step(self, closure)
                settle_kl_state(self)
                if self.communicator is not None:
                    self._agree_ranks()
            except torch.linalg.LinAlgError as err:
                # A factorization of non-finite factors: the update itself blew up.
                self._check_updated(None, cause=err)
                if "non-finite" not in str(err):
                    raise
                raise NonFiniteError(
                    f"step {self.steps} ({self.integrator.name!r} integrator): the update met non-finite values "
                    f"although the gradients were finite ({err}): the step is far too large "
                    "(lower lr, or clip with max_grad_norm=)"
                ) from err
            self._check_updated(dense := self._dense_updates())
            for p, value, state in dense:
                p.copy_(value)
                self.state[p] = state
        except NonFiniteError as err:
            self._restore(saved)
            if self.on_nonfinite == "raise":
                raise
            warnings.warn(f"{err}; step skipped, parameters, buffers and optimizer state unchanged", stacklevel=2)
            return None
        except BaseException:
            self._restore(saved)
            raise
        self._buffer_guard.clear()
        self.directions = {}
        self._pass_scale = 1.0  # the step consumed the pass (a failed one keeps it, consistently scaled)
        self.steps += 1
        self._set_request(self.integrator.request(self.phase))
        if self.check_every and self.steps % self.check_every == 0:
            self.check_consistency()
        return loss

    def _dense_updates(self) -> list[tuple[Tensor, Tensor, dict[str, Any]]]:
        """The inner step of every dense parameter, not yet applied: ``(p, new value, new state)``."""
        out = []
        for group in self.param_groups[1:]:
            params = [p for p in group["params"] if p.grad is not None]
            # Shallow copies: the rule writes new tensors (InnerRule.step); no entry before the commit.
            states = [dict(self.state.get(p, {})) for p in params]
            xs = [p.detach() for p in params]
            deltas = self.rule.step_many(xs, [p.grad for p in params], states, group)
            out += [(p, x + d, st) for p, x, d, st in zip(params, xs, deltas, states)]
        return out

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

    def _snapshot(self) -> tuple[Any, ...]:
        # Factors are replaced, never written in place, and state dicts are replaced, never
        # mutated (integrators/base.py); dense parameters are written only after every check.
        factors = [
            (tuple(p.data for p in m.factor_parameters()), layer_flags(m), _pass_of(m)) for m in self.lowrank_layers
        ]
        states = {p: self.state[p] for p in self.param_groups[0]["params"] if p in self.state}
        return factors, states, self.phase

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self._buffer_guard.restore()
        self.deferred_kl_state.clear()
        self.directions = {}
        factors, states, phase = saved
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

    @torch.no_grad()
    def finish_cycle(self) -> None:
        """End the current coefficient cycle now (``coefficient_steps > 1``), by the integrator's
        end-of-cycle rule (:meth:`~dlrt.integrators.Integrator.end_cycle`): the same one a full
        cycle ends with, so a layer whose bases were just grown from the gradient keeps its rank.

        Between truncations the layers sit on their augmented bases (up to twice
        the rank); call this before saving or merging a model mid-cycle. Nothing
        happens at phase 0.
        """
        if self.phase == 0:
            return
        self.integrator.end_cycle(self)
        self._set_request(self.integrator.request(self.phase))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for layer in self.lowrank_layers:
            layer.clear_pass()
        self._pass_scale = 1.0
        self.directions = {}

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dlrt"] = {
            "integrator": self.integrator.name,
            "coefficient_steps": self.integrator.coefficient_steps,
            "optimizer": self.rule.name,
            "phase": self.phase,
            "steps": self.steps,
            "layers": {n: list(m.core.shape) for n, m in zip(self.layer_names, self.lowrank_layers)},
        }
        return sd

    def check_state_dict(self, state_dict: dict[str, Any], cores: dict[str, tuple[int, int]] | None = None) -> None:
        """Raise ``ValueError`` unless ``state_dict`` can be loaded; change nothing.

        Checks the metadata (integrator, inner optimizer, coefficient steps,
        phase, low-rank layers and their cores), the parameter groups, and the
        shape of every state tensor against its parameter. ``cores`` gives the
        core shape each layer will have (:func:`dlrt.load` validates before it
        resizes the layers); default: their current shapes.
        """
        meta = state_dict.get("dlrt") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("not a DLRTOptimizer state dict (no 'dlrt' entry)")
        for key, mine in (
            ("integrator", self.integrator.name),
            ("optimizer", self.rule.name),
            ("coefficient_steps", self.integrator.coefficient_steps),
        ):
            if meta.get(key) != mine:
                raise ValueError(
                    f"the state dict was saved with {key}={meta.get(key)!r}, this optimizer has {mine!r}: "
                    f"create the optimizer with {key}={meta.get(key)!r} to resume it"
                )
        for key in ("phase", "steps"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the state dict's {key} must be an int >= 0, got {value!r}")
        if meta["phase"] >= self.integrator.coefficient_steps:
            raise ValueError(
                f"the state dict's phase {meta['phase']} is not below coefficient_steps="
                f"{self.integrator.coefficient_steps}"
            )
        saved_layers = meta.get("layers")
        if not isinstance(saved_layers, dict):
            raise ValueError("the state dict's 'dlrt' entry has no 'layers' table")
        if cores is None:
            cores = {n: tuple(m.core.shape) for n, m in zip(self.layer_names, self.lowrank_layers)}
        if list(saved_layers) != self.layer_names:
            missing = sorted(set(saved_layers) - set(self.layer_names))
            extra = sorted(set(self.layer_names) - set(saved_layers))
            raise ValueError(
                f"the state dict's low-rank layers do not match the model's: missing in the model {missing}, "
                f"not in the state dict {extra}"
            )
        for name, shape in saved_layers.items():
            if list(shape) != list(cores[name]):
                raise ValueError(
                    f"layer {name!r} has core shape {list(cores[name])} but the state dict has {list(shape)}: "
                    "load the model's factors first (dlrt.load restores both)"
                )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            raise ValueError("the state dict's parameter groups do not match this optimizer's")
        shapes: list[tuple[int, ...]] = []
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            if isinstance(layer, TuckerConv2d):
                # No state under the bases; the core's state has the core's shape.
                shapes += [(n, r) for n, r in zip(layer.mode_sizes, cores[name])] + [tuple(cores[name])]
                continue
            (r_u, r_v), (n, m) = cores[name], layer.shape
            # K-state n×r_v under U, S-state r_u×r_v under S, L-state m×r_u under V (integrators/base.py).
            shapes += [(n, r_v), (r_u, r_v), (m, r_u)]
        for group in self.param_groups[1:]:
            shapes += [tuple(p.shape) for p in group["params"]]
        names = [
            f"{n}.{k}"
            for n, layer in zip(self.layer_names, self.lowrank_layers)
            for k in (("U0", "U1", "U2", "U3", "C") if isinstance(layer, TuckerConv2d) else ("U", "S", "V"))
        ]
        names += [self._dense_names[id(p)] for g in self.param_groups[1:] for p in g["params"]]
        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError("the state dict has no 'state' table")
        for idx, st in state.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(shapes):
                raise ValueError(f"the state dict has state for parameter #{idx!r}, this optimizer has {len(shapes)}")
            for key, val in st.items():
                if isinstance(val, Tensor) and val.dim() and tuple(val.shape) != shapes[idx]:
                    raise ValueError(
                        f"optimizer state {key!r} of {names[idx]!r} has shape {tuple(val.shape)}, "
                        f"expected {shapes[idx]}"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        sd = dict(state_dict)
        meta = sd.pop("dlrt")
        super().load_state_dict(sd)
        # torch casts floating state to its parameter's dtype; the inner rules choose their own
        # (Adam keeps float32 moments for half-precision factors), so keep the saved dtypes.
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            for key, value in sd["state"].get(idx, {}).items():
                mine = self.state[p].get(key)
                if isinstance(value, Tensor) and isinstance(mine, Tensor) and mine.dtype != value.dtype:
                    self.state[p][key] = value.to(device=mine.device, copy=True)
        self._buffer_guard.clear()
        self.phase = int(meta["phase"])
        self.steps = int(meta["steps"])
        self._set_request(self.integrator.request(self.phase))


def _projected(layer: FactorizedLayer) -> list[Tensor | None]:
    """The projected gradients a layer's backward recorded besides its core's ``.grad``."""
    if isinstance(layer, TuckerConv2d):
        return list(layer.grad_modes)
    return [layer.grad_K, layer.grad_L]


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


def _make_integrator(integrator: str | Integrator, coefficient_steps: int | None) -> Integrator:
    """The integrator by name (with ``coefficient_steps``, default 1), or the instance given.

    An instance carries its own ``coefficient_steps``; a different value passed
    beside it is an error, never silently dropped (``None`` means not given).
    """
    if isinstance(integrator, Integrator):
        if coefficient_steps is not None and coefficient_steps != integrator.coefficient_steps:
            cls = type(integrator).__name__
            raise ValueError(
                f"coefficient_steps={coefficient_steps!r} disagrees with the integrator instance's "
                f"{cls}(coefficient_steps={integrator.coefficient_steps}): pass it to one of them only, "
                f"e.g. integrator={cls}(coefficient_steps={coefficient_steps!r}) or integrator={integrator.name!r}"
            )
        return integrator
    if not isinstance(integrator, str) or integrator not in INTEGRATORS:
        raise ValueError(
            f"unknown integrator {integrator!r}; choose one of {sorted(INTEGRATORS)} or pass an Integrator instance"
        )
    return INTEGRATORS[integrator](coefficient_steps=1 if coefficient_steps is None else coefficient_steps)


def _rank_bounds(name: str, layer: FactorizedLayer, min_rank: int | None, max_rank: int | None) -> tuple[int, int]:
    """The layer's ``(min_rank, max_rank)`` after the optimizer's overrides, validated.

    A Tucker layer's bounds apply to each adapted mode, capped by the mode's full rank.
    """
    tucker = isinstance(layer, TuckerConv2d)
    full = max(layer.full_ranks) if tucker else min(layer.shape)
    for key, value in (("max_rank", max_rank), ("min_rank", min_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{key} must be an int or None, got {type(value).__name__} {value!r}")
    hi = layer.max_rank
    if max_rank is not None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        hi = min(int(max_rank), full)
    lo = layer.min_rank if min_rank is None else check_rank(min_rank, layer.shape, what="min_rank", layer=name)
    if lo > hi:
        raise ValueError(f"layer {name!r}: min_rank={lo} exceeds max_rank={hi}")
    if tucker:
        over = [i for i in layer.tucker_modes if layer.ranks[i] > min(hi, layer.full_ranks[i])]
        if over:
            raise ValueError(
                f"layer {name!r} has ranks {layer.ranks}, above max_rank={hi} in mode(s) {over}: truncate it first "
                f"(layer.init_from_kernel(layer.weight, ranks=...)), or raise max_rank"
            )
        return lo, hi
    if layer.rank > hi:
        source = "the optimizer's max_rank" if max_rank is not None else "its own max_rank"
        raise ValueError(
            f"layer {name!r} has rank {layer.rank}, above {source} (max_rank={hi}): truncate it first "
            f"(layer.init_from_matrix(layer.matrix(), rank={hi})), or raise max_rank"
        )
    return lo, hi
