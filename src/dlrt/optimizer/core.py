"""``DLRTOptimizer``: the torch.optim-style object users drive.

It owns the bookkeeping (which layers, which dense parameters, optimizer
state, the integrator's phase), runs the forward/backward passes an integrator
asks for, checks them, and makes every step all-or-nothing: a non-finite loss,
gradient or updated parameter leaves factors, dense parameters, optimizer state
and the model's buffers exactly as they were (docs/algorithms.md §7).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import linalg
from ..distributed import Communicator, resolve_group
from ..integrators import INTEGRATORS, Integrator
from ..integrators.base import check_budget_unit, factor_state, rank_costs, set_factor_state, settle_kl_state
from ..layers import FactorizedLayer, LowRankLayer, TuckerConv2d, check_rank
from ..optim import RULES
from ..optim.inner import InnerRule, check_real
from .checks import FiniteChecksMixin, NonFiniteError
from .processes import ProcessGroupMixin, _broadcast_model, _check_same_model
from .rollback import RollbackMixin, _BufferGuard
from .scaling import ScalingMixin
from .state import StateDictMixin

_UNSET: Any = object()


class DLRTOptimizer(
    StateDictMixin, ProcessGroupMixin, ScalingMixin, FiniteChecksMixin, RollbackMixin, torch.optim.Optimizer
):
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
        second_moment: geo-adam only: what its one second moment per layer
            averages ``‖P(G)‖²_F`` over. ``"rank"`` (default): the rank r, so a
            step moves every layer by about ``lr·√r`` in Frobenius norm, whatever
            its size. ``"coordinates"``: the r(n + m − r) coordinates of the
            layer's tangent space, as per-entry Adam moves every entry by about
            ``lr``: a step then moves an n×m layer by about ``lr·√(r(n + m − r))``,
            so larger layers take larger steps (docs/algorithms.md §9.3).
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) decay. On K, L, S it
            is the projected gradient of ``‖W‖²/2``; the bases U, V never decay.
        tau: truncation tolerance, in [0, 1) for the relative rules. Every float
            hyper-parameter must be finite and in its range; a bad one is a
            ``ValueError`` naming it.
        tau_mode: the rank rule (docs/algorithms.md §1). ``"gradient"`` (default):
            keep the singular directions of the weight by ϑ = τ‖σ‖₂ and add the
            directions of the gradient trend (the inner optimizer's averaged
            gradient) that the kept bases cannot represent, down to a τ-share of
            it, so ranks grow while the loss pushes outside the bases and shrink
            when it stops. ``"relative"``: ϑ = τ‖σ‖₂ alone (ranks only fall from
            the start rank). ``"absolute"``: ϑ = τ.
        tau_grad: the gradient rule's tolerance on the trend (the share of its
            normal component that may be left out), in [0, 1); default ``tau``. A
            coarse weight tolerance (τ 0.2) with a finer one here (0.1) keeps
            the growth that τ 0.2 alone does not allow.
        truncation: ``"local"`` (each layer by its own σ) or ``"global"``
            (σ of all layers pooled, GeoLoRA).
        budget: with global truncation, at most this many singular values
            (the sum of all ranks) are kept; with ``budget_unit="params"``, at
            most this many parameters in the factors ``U``, ``S``, ``V`` of all
            low-rank layers together.
        budget_unit: what ``budget`` counts: ``"rank"`` (default) or
            ``"params"``. With ``"params"`` the ``k``-th rank of an ``n×m`` layer
            costs the ``n + m + 2k − 1`` parameters it adds (a column of ``U``
            and of ``V``, the core's growth from ``(k−1)²`` to ``k²``): the
            pooled singular values are kept, the largest first, while the next
            one's parameters fit, and the gradient rule's new directions get
            only the parameters left. Matrix layers only (not Tucker layers).
        budget_order: the order in which the budget takes the pooled
            singular values (and the gradient rule's new directions):
            ``"sigma"`` (default, GeoLoRA's: the largest first) or
            ``"energy"`` (the largest ``σ²`` per unit of the budget they cost:
            the same order as ``"sigma"`` in ranks, a different one in
            ``"params"``, where it favours the cheaper layers); needs a ``budget``.
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
        second_moment: str = _UNSET,
        weight_decay: float = 0.0,
        tau: float = 0.1,
        tau_mode: str = "gradient",
        tau_grad: float | None = None,
        truncation: str = "local",
        budget: int | None = None,
        budget_unit: str = "rank",
        budget_order: str = "sigma",
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
        given = {
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "betas": betas,
            "eps": eps,
            "second_moment": second_moment,
        }
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
        tau = linalg.check_tau(tau, tau_mode)
        if tau_grad is not None:
            tau_grad = linalg.check_tau(tau_grad, "relative", "tau_grad")
        if truncation not in ("local", "global"):
            raise ValueError(f"truncation must be 'local' or 'global', got {truncation!r}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
                raise TypeError(f"budget must be an int (a total rank) or None, got {budget!r}")
            if truncation != "global" or budget < 1:
                raise ValueError("budget= needs truncation='global' and a positive total rank")
            budget = int(budget)
        budget_unit = check_budget_unit(budget_unit, budget, budget_order)
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
        if tucker and budget_unit == "params":
            raise ValueError(
                f"budget_unit='params' prices the ranks of matrix layers only, not those of the Tucker layers "
                f"({', '.join(tucker)}): use budget_unit='rank', or convert those layers with conv='matrix'"
            )
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
        if budget is not None and budget_unit == "params":
            floor = sum(int(rank_costs(m, "params", lo).sum()) for (_, m), (lo, _) in zip(named, bounds))
            if budget < floor:
                raise ValueError(
                    f"budget={budget} parameters is below what min_rank costs over {len(named)} layers ({floor}): "
                    "raise the budget or lower min_rank"
                )
        elif budget is not None and budget < sum(lo for lo, _ in bounds):
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
                "tau_grad": tau_grad,
                "truncation": truncation,
                "budget": budget,
                "budget_unit": budget_unit,
                "budget_order": budget_order,
            }
        ]
        if dense:
            groups.append({"params": dense, "kind": "dense", **({} if dense_lr is None else {"lr": dense_lr})})
        super().__init__(groups, hyper)
        self.phase = 0
        self.steps = 0
        #: Factor clipping and unscaling applied to the last pass's gradients (pass_grad applies it too).
        self._pass_scale = 1.0
        #: The caller's CPU thread count during a step whose factor algebra runs on one thread
        #: (:meth:`_factor_threads`); the passes and their contractions run on it. None between steps.
        self._pass_threads: int | None = None
        #: Layers whose K/L states an augmentation left in the old coordinates for a truncation later in
        #: the same step (integrators/base.py, augment); empty between steps.
        self.deferred_kl_state: dict[LowRankLayer, tuple[int, int]] = {}
        #: A geometric optimizer's step direction per layer for the current pass (optim/geometric.py);
        #: empty between steps.
        self.directions: dict[LowRankLayer, Any] = {}
        #: Per layer, the gradient trend of its core's last S-step in the current cycle (the rule's
        #: momentum-averaged gradient, :meth:`InnerRule.trend`), in the core's coordinates, for the gradient
        #: rank rule (integrators/base.py, truncate); emptied when the cycle ends. Not saved in checkpoints:
        #: a cycle ended by :meth:`finish_cycle` right after a load is truncated by the weight rule alone.
        self.trends: dict[FactorizedLayer, Tensor] = {}
        self._buffer_guard = _BufferGuard(model)
        self.integrator.sees_normal = tau_mode == "gradient"
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
            with torch.enable_grad(), self._at_pass_threads():
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
        with self._at_pass_threads():  # a contraction over the pass's inputs: batch-sized
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
            with self._at_pass_threads():  # once for all (pass_grad's own switch is then a no-op)
                return [self.pass_grad(*r) for r in requests]
        local = []
        with self._at_pass_threads():
            contracted = [layer.project_grad(left, right, records) for layer, left, right, records in requests]
        for (layer, left, right, _), g in zip(requests, contracted):
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
                with self._factor_threads():
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

    @contextlib.contextmanager
    def _factor_threads(self) -> Iterator[None]:
        """Run the integrator's factor algebra on one CPU thread where every layer's factors are small.

        Products and factorizations of ``n×2r`` bases and ``r×r`` cores gain little
        from a second thread on an idle machine and lose much in thread barriers
        when other processes share the cores (GeoLoRA on MiniLM, 36 adapters:
        docs/performance.md). The passes
        (:meth:`evaluate`) and the contractions over their inputs (:meth:`pass_grad`)
        keep the caller's threads. Above :data:`dlrt.linalg.ONE_THREAD_FACTOR_ENTRIES`
        entries in any layer's augmented basis, and off the CPU, nothing changes.
        """
        threads = torch.get_num_threads()
        largest = max((2 * b.numel() for m in self.lowrank_layers for b in m.bases), default=0)
        on_cpu = self.lowrank_layers[0].core.device.type == "cpu"
        if threads == 1 or largest > linalg.ONE_THREAD_FACTOR_ENTRIES or not on_cpu:
            yield
            return
        self._pass_threads = threads
        try:
            with linalg.cpu_threads(1):
                yield
        finally:
            self._pass_threads = None

    def _at_pass_threads(self) -> contextlib.AbstractContextManager[None]:
        """The caller's thread count inside :meth:`_factor_threads` (for a pass or a batch-sized product)."""
        return contextlib.nullcontext() if self._pass_threads is None else linalg.cpu_threads(self._pass_threads)

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
