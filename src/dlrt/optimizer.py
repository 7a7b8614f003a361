"""``DLRTOptimizer``: the torch.optim-style object users drive.

It owns the bookkeeping (which layers, which dense parameters, optimizer
state, the integrator's phase), runs the forward/backward passes an integrator
asks for, checks them, and makes every step all-or-nothing: a non-finite loss
or gradient leaves factors and optimizer state exactly as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .integrators import INTEGRATORS, Integrator
from .layers import LowRankLayer
from .optim.inner import RULES, InnerRule


class NonFiniteError(FloatingPointError):
    """A pass produced a non-finite loss or gradient; the step was not taken."""


_UNSET: Any = object()


class DLRTOptimizer(torch.optim.Optimizer):
    """Train a model's low-rank layers with a geometric integrator, and the rest densely.

    Args:
        model: a module holding :class:`~dlrt.layers.LowRankLayer` s (see
            :func:`dlrt.convert`). Its other trainable parameters (biases,
            norms, layers left dense) are trained by the same inner optimizer
            in the same step.
        integrator: ``"bug"`` (rank-adaptive BUG, two passes per step),
            ``"fixed"`` (fixed-rank BUG) or ``"parallel"`` (one pass per step).
        optimizer: inner optimizer for K, L, S and the dense parameters:
            ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate λ (default: the inner optimizer's, 0.01 for SGD and
            1e-3 for Adam/AdamW).
        momentum, dampening, nesterov: SGD only.
        betas, eps: Adam/AdamW only.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) decay. On K, L, S it
            is the projected gradient of ``‖W‖²/2``; the bases U, V never decay.
        tau: truncation tolerance ϑ = τ‖σ‖₂ (``tau_mode="relative"``) or ϑ = τ
            (``"absolute"``).
        truncation: ``"local"`` (each layer by its own σ) or ``"global"``
            (σ of all layers pooled, GeoLoRA).
        budget: with global truncation, at most this many singular values
            (the sum of all ranks) are kept.
        max_rank, min_rank: override the bounds stored in every layer.
        coefficient_steps: S-steps per augmentation (ALGORITHMS §8).
        max_grad_norm: clip every pass's gradients to this global norm (None:
            no clipping). The norm is the Riemannian one the integrator steps
            along: per low-rank layer the tangent projection of ``G``,
            ``‖P(G)‖² = ‖GV‖² + ‖GᵀU‖² − ‖UᵀGV‖²`` (only ``‖UᵀGV‖²`` in an
            S-only pass), plus the dense gradients; all of them are scaled by
            ``min(1, max_grad_norm / norm)``. The norm before clipping is
            kept in :attr:`last_grad_norm`. (``torch.nn.utils.clip_grad_norm_``
            and Trainer's ``max_grad_norm`` see only ``.grad``, not ``GV``, ``GᵀU``.)
        on_nonfinite: ``"raise"`` a :class:`NonFiniteError`, or ``"skip"``
            the step with a warning; either way nothing changes.

    A step is ``loss = opt.step(closure)``; the closure zeroes the gradients,
    computes the loss, calls ``backward()`` and returns the loss, and the
    integrator calls it as often as its method needs. ``parallel`` also
    accepts ``opt.step()`` after a plain ``loss.backward()``.
    """

    def __init__(
        self,
        model: nn.Module,
        integrator: str | Integrator = "bug",
        optimizer: str = "sgd",
        lr: float | None = None,
        *,
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
        coefficient_steps: int = 1,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "raise",
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
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        self.rule.validate(hyper)
        if tau is None or tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if tau_mode not in ("relative", "absolute"):
            raise ValueError(f"tau_mode must be 'relative' or 'absolute', got {tau_mode!r}")
        if truncation not in ("local", "global"):
            raise ValueError(f"truncation must be 'local' or 'global', got {truncation!r}")
        if budget is not None and (truncation != "global" or budget < 1):
            raise ValueError("budget= needs truncation='global' and a positive total rank")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        #: Global gradient norm of the last pass, before clipping (see ``max_grad_norm``).
        self.last_grad_norm: float | None = None

        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLayer) and m.S.requires_grad]
        if not named:
            raise ValueError(
                "the model has no trainable low-rank layers: convert it first with "
                "dlrt.convert(model, rank=...) or build it from dlrt.LowRankLinear/LowRankConv2d"
            )
        bounds = [_rank_bounds(name, layer, min_rank, max_rank) for name, layer in named]
        if budget is not None and budget < sum(lo for lo, _ in bounds):
            raise ValueError(f"budget={budget} is below the sum of min_rank over {len(named)} layers")
        for (_, layer), (lo, hi) in zip(named, bounds):
            layer.min_rank, layer.max_rank = lo, hi
        self.layer_names = [n for n, _ in named]
        self.lowrank_layers: list[LowRankLayer] = [m for _, m in named]
        factor_ids = {id(p) for m in self.lowrank_layers for p in (m.U, m.S, m.V)}
        self._dense_names: dict[int, str] = {}
        dense = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in factor_ids:
                dense.append(p)
                self._dense_names[id(p)] = name
        groups = [
            {
                "params": [p for m in self.lowrank_layers for p in (m.U, m.S, m.V)],
                "kind": "lowrank",
                "tau": float(tau),
                "tau_mode": tau_mode,
                "truncation": truncation,
                "budget": budget,
            }
        ]
        if dense:
            groups.append({"params": dense, "kind": "dense"})
        super().__init__(groups, hyper)
        self.phase = 0
        self.steps = 0
        self._set_request(self.integrator.request(0))

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
            with torch.enable_grad():
                loss = closure()
        self._check_finite(loss, request, what)
        self._clip()
        return loss

    def _pass_grads(self) -> tuple[list[Tensor], Tensor | None]:
        """The gradients of the last pass, and the squared global norm (tangent norm per layer)."""
        grads: list[Tensor] = []
        squares: list[Tensor] = []
        for layer in self.lowrank_layers:
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

    def S_grad(self, layer: LowRankLayer) -> Tensor:
        """``Uᵀ G V`` of the last pass (zeros for a layer the loss did not reach)."""
        g = layer.S.grad
        return torch.zeros_like(layer.S) if g is None else g

    def _require_grads(self, request: frozenset[str]) -> None:
        if all(layer.S.grad is None for layer in self.lowrank_layers):
            raise RuntimeError(
                "step() was called without a closure and no gradients are present: call loss.backward() "
                "first, or pass step(closure)"
            )
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            if layer.S.grad is None:
                continue
            for kind, g in (("K", layer.grad_K), ("L", layer.grad_L)):
                if kind in request and g is None:
                    raise RuntimeError(
                        f"layer {name!r} has no recorded projected gradient {kind}: the backward pass ran "
                        "before this optimizer was created or after its grad_request was changed"
                    )

    def _check_finite(self, loss: Any, request: frozenset[str], what: str) -> None:
        where = f"step {self.steps} ({self.integrator.name!r} integrator, {what} pass)"
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"{where}: non-finite loss ({loss.detach().flatten()[:1].item()})")
        if isinstance(loss, float) and not torch.isfinite(torch.tensor(loss)):
            raise NonFiniteError(f"{where}: non-finite loss ({loss})")
        names, grads = [], []
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            for label, g in (("G V", layer.grad_K), ("Gᵀ U", layer.grad_L), ("Uᵀ G V", layer.S.grad)):
                if g is not None:
                    names.append(f"layer {name!r} ({label})")
                    grads.append(g)
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    names.append(f"parameter {self._dense_names[id(p)]!r}")
                    grads.append(p.grad)
        if grads and _any_nonfinite(grads):
            bad = next(i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all()))
            raise NonFiniteError(f"{where}: non-finite gradient in {names[bad]}")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One integrator step; see the class docstring. Returns the closure's last loss."""
        saved = self._snapshot()
        try:
            loss = self.integrator.step(self, closure)
            self._dense_step()
        except NonFiniteError as err:
            self._restore(saved)
            if self.on_nonfinite == "raise":
                raise
            warnings.warn(f"{err}; step skipped, factors and optimizer state unchanged", stacklevel=2)
            return None
        except BaseException:
            self._restore(saved)
            raise
        self.steps += 1
        self._set_request(self.integrator.request(self.phase))
        return loss

    def _dense_step(self) -> None:
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    self.rule.update_(p.data, p.grad, self.state[p], group)

    def _snapshot(self) -> tuple[Any, ...]:
        factors = [(m.U.data, m.S.data, m.V.data, m.pending_growth) for m in self.lowrank_layers]
        states = {p: self.state[p] for p in self.param_groups[0]["params"] if p in self.state}
        return factors, states, self.phase

    def _restore(self, saved: tuple[Any, ...]) -> None:
        factors, states, phase = saved
        for m, (U, S, V, pending) in zip(self.lowrank_layers, factors):
            if m.U.data is not U or m.S.data is not S or m.V.data is not V:
                m.set_factors(U, S, V)
            m.pending_growth = pending
        for p in self.param_groups[0]["params"]:
            if p in states:
                self.state[p] = states[p]
            else:
                self.state.pop(p, None)
        self.phase = phase
        self._set_request(self.integrator.request(phase))

    @torch.no_grad()
    def finish_cycle(self) -> None:
        """End a coefficient phase early (``coefficient_steps > 1``): truncate now.

        Between truncations the layers sit on their augmented bases (up to twice
        the rank); call this before saving or merging a model mid-cycle. Nothing
        happens at phase 0.
        """
        if self.phase == 0:
            return
        if self.integrator.adaptive:
            from .integrators.base import truncate

            truncate(self, self.lowrank_layers, self.lowrank_group)
        self.phase = 0
        self._set_request(self.integrator.request(0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for layer in self.lowrank_layers:
            layer.grad_K = layer.grad_L = None

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dlrt"] = {
            "integrator": self.integrator.name,
            "coefficient_steps": self.integrator.coefficient_steps,
            "optimizer": self.rule.name,
            "phase": self.phase,
            "steps": self.steps,
            "layers": {n: list(m.S.shape) for n, m in zip(self.layer_names, self.lowrank_layers)},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        meta = sd.pop("dlrt", None)
        if meta is None:
            raise ValueError("not a DLRTOptimizer state dict (no 'dlrt' entry)")
        for key, mine in (
            ("integrator", self.integrator.name),
            ("optimizer", self.rule.name),
            ("coefficient_steps", self.integrator.coefficient_steps),
        ):
            if meta[key] != mine:
                raise ValueError(f"the state dict was saved with {key}={meta[key]!r}, this optimizer has {mine!r}")
        saved_layers = meta["layers"]
        mine_layers = {n: list(m.S.shape) for n, m in zip(self.layer_names, self.lowrank_layers)}
        if list(saved_layers) != list(mine_layers):
            missing = sorted(set(saved_layers) - set(mine_layers))
            extra = sorted(set(mine_layers) - set(saved_layers))
            raise ValueError(
                f"the state dict's low-rank layers do not match the model's: missing in the model {missing}, "
                f"not in the state dict {extra}"
            )
        for name, shape in saved_layers.items():
            if list(shape) != mine_layers[name]:
                raise ValueError(
                    f"layer {name!r} has core shape {mine_layers[name]} but the state dict has {list(shape)}: "
                    "load the model's factors first (dlrt.load restores both)"
                )
        super().load_state_dict(sd)
        self.phase = int(meta["phase"])
        self.steps = int(meta["steps"])
        self._set_request(self.integrator.request(self.phase))


def _any_nonfinite(tensors: list[Tensor]) -> bool:
    """Whether any tensor holds inf or NaN: one fused pass per (device, dtype), one sync."""
    groups: dict[tuple[Any, Any], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for (device, dtype), ts in groups.items():
        if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            found = torch.zeros(1, device=device)
            # GradScaler's fused inf/NaN check; with a scale of 1 it leaves the tensors as they are.
            torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones(1, device=device))
            flags.append(found)
        else:
            flags.extend((~torch.isfinite(t).all()).float().reshape(1) for t in ts)
    return bool(torch.cat(flags).any())


def _make_integrator(integrator: str | Integrator, coefficient_steps: int) -> Integrator:
    if isinstance(integrator, Integrator):
        return integrator
    if integrator not in INTEGRATORS:
        raise ValueError(f"unknown integrator {integrator!r}; choose one of {sorted(INTEGRATORS)}")
    return INTEGRATORS[integrator](coefficient_steps=coefficient_steps)


def _rank_bounds(name: str, layer: LowRankLayer, min_rank: int | None, max_rank: int | None) -> tuple[int, int]:
    """The layer's ``(min_rank, max_rank)`` after the optimizer's overrides, validated."""
    full = min(layer.shape)
    hi = layer.max_rank
    if max_rank is not None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        hi = min(max_rank, full)
    lo = layer.min_rank
    if min_rank is not None:
        if not 1 <= min_rank <= full:
            raise ValueError(f"min_rank={min_rank} is out of range for layer {name!r}: it must be in [1, {full}]")
        lo = min_rank
    if lo > hi:
        raise ValueError(f"layer {name!r}: min_rank={lo} exceeds max_rank={hi}")
    return lo, hi
