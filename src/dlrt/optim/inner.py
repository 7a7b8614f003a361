"""Inner optimizers: the "−λ∇" of every integrator step (docs/algorithms.md §0, §5).

A rule updates one tensor in place from its gradient and its state. The same
rule steps the factor quantities K, L, S of every low-rank layer and the dense
parameters, so a layer's factors and its bias see the same optimizer. Each rule
declares how its state tensors transform when the bases change
(:func:`transport_state`): first moments linearly, Adam's second moments
through their square roots.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

LINEAR = "linear"
SQUARE = "square"
#: A per-entry weight in [0, 1]: moved with the squared transport matrices, so a
#: rotation among old coordinates keeps it and a new direction starts at 0.
WEIGHT = "weight"


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, after checking it is a finite real number in the given range.

    The message names ``name`` and the valid range, so a NaN/inf or out-of-range
    hyper-parameter fails where it is given, not as an ``IndexError`` or a LAPACK
    error steps later.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not math.isfinite(v) or not (lo_ok and hi_ok):
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be finite and in {lo}, {hi}, got {value!r}")
    return v


class InnerRule:
    """One step of an elementwise first-order optimizer on a single tensor."""

    name: ClassVar[str]
    #: Whether the rule keeps a layer's momentum as one tangent vector (optim/geometric.py)
    #: rather than per-entry state of each factor quantity.
    geometric: ClassVar[bool] = False
    #: state key -> how it transforms under a change of basis
    transports: ClassVar[dict[str, str]]
    defaults: ClassVar[dict[str, Any]]

    def validate(self, group: dict[str, Any]) -> None:
        """Check the rule's hyper-parameters in ``group`` (finite, in range), naming the bad key."""
        check_real("lr", group["lr"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)

    def step(self, x: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The step ``Δ`` (``x ← x + Δ``) for gradient ``g``; ``x`` is not modified.

        The new state is written into the dict ``state`` as *new* tensors: a
        tensor found in ``state`` is never modified in place, so a shallow copy
        (``dict(state)``) is all a caller needs to keep the old state (the
        optimizer's step rollback). Returning the step rather than the new
        value lets an integrator use it without cancellation, e.g. to augment a
        basis by ``range(Δ)``.
        """
        raise NotImplementedError

    def step_many(
        self, xs: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> list[Tensor]:
        """:meth:`step` for several tensors of one group at once; the same result, fewer Python round trips.

        Rules may fuse the tensors' updates into multi-tensor (``torch._foreach``)
        kernels; the steps equal those of :meth:`step` bit for bit.
        """
        return [self.step(x, g, st, group) for x, g, st in zip(xs, gs, states)]

    def trend(self, g: Tensor, state: dict[str, Any]) -> Tensor:
        """The direction the loss keeps pushing along, after a :meth:`step` with gradient ``g``.

        The gradient averaged over steps by the rule's own momentum where it keeps
        one (the rank rule ``tau_mode="gradient"`` grows a layer by it, and an
        average separates a persistent push from batch noise); ``g`` itself otherwise.
        """
        return g

    def update_(self, x: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Step ``x`` in place along ``g``; ``state`` receives the new state."""
        x.add_(self.step(x, g, state, group))


class SGD(InnerRule):
    """SGD with optional heavy-ball/Nesterov momentum and L2 weight decay (as torch.optim.SGD)."""

    name = "sgd"
    transports: ClassVar[dict[str, str]] = {"momentum_buffer": LINEAR}
    defaults: ClassVar[dict[str, Any]] = {
        "lr": 0.01,
        "momentum": 0.0,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
    }

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        check_real("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_real("dampening", group["dampening"], low=0.0, high=1.0)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"nesterov must be True or False, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def step(self, x: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        wd, mu = group["weight_decay"], group["momentum"]
        d = g.add(x, alpha=wd) if wd else g
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.clone()
            else:
                buf = buf.mul(mu).add_(d, alpha=1.0 - group["dampening"])
            state["momentum_buffer"] = buf
            d = d.add(buf, alpha=mu) if group["nesterov"] else buf
        return d.mul(-group["lr"])

    def trend(self, g: Tensor, state: dict[str, Any]) -> Tensor:
        return state.get("momentum_buffer", g)


class Adam(InnerRule):
    """Adam (coupled L2 weight decay), as torch.optim.Adam without amsgrad."""

    name = "adam"
    transports: ClassVar[dict[str, str]] = {
        "exp_avg": LINEAR,
        "exp_avg_sq": SQUARE,
        "weight1": WEIGHT,
        "weight2": WEIGHT,
    }
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    decoupled: ClassVar[bool] = False

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            check_real(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        check_real("eps", group["eps"], low=0.0)

    def _begin_step(self, x: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Create or convert the state's tensors for ``x`` and count the step."""
        b1, b2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(x)
            state["exp_avg_sq"] = torch.zeros_like(x)
        if "weight1" not in state:  # fresh, or a state saved before per-entry bias correction
            t0 = state["step"]
            state["weight1"] = torch.full_like(x, 1.0 - b1**t0)
            state["weight2"] = torch.full_like(x, 1.0 - b2**t0)
        for key in ("exp_avg", "exp_avg_sq", "weight1", "weight2"):
            if state[key].dtype != x.dtype:  # e.g. a state saved from a float32 run
                state[key] = state[key].to(x.dtype)
        state["step"] += 1

    def step_many(
        self, xs: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> list[Tensor]:
        half = (torch.float16, torch.bfloat16)
        if len(xs) < 2 or len({(x.device, x.dtype) for x in xs}) > 1 or xs[0].dtype in half:
            return super().step_many(xs, gs, states, group)
        # The operations of step(), each applied to all tensors by one multi-tensor kernel.
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        if wd and not self.decoupled:
            gs = torch._foreach_add(gs, xs, alpha=wd)
        for x, st in zip(xs, states):
            self._begin_step(x, st, group)
        ms = torch._foreach_lerp([st["exp_avg"] for st in states], gs, 1.0 - b1)
        vs = torch._foreach_mul([st["exp_avg_sq"] for st in states], b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
        w1s = torch._foreach_mul([st["weight1"] for st in states], b1)
        torch._foreach_add_(w1s, 1.0 - b1)
        w2s = torch._foreach_mul([st["weight2"] for st in states], b2)
        torch._foreach_add_(w2s, 1.0 - b2)
        for st, m, v, w1, w2 in zip(states, ms, vs, w1s, w2s):
            st["exp_avg"], st["exp_avg_sq"], st["weight1"], st["weight2"] = m, v, w1, w2
        denoms = torch._foreach_div(vs, w2s)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        deltas = torch._foreach_div(ms, w1s)
        torch._foreach_div_(deltas, denoms)
        torch._foreach_mul_(deltas, -lr)
        if wd and self.decoupled:
            torch._foreach_add_(deltas, xs, alpha=-lr * wd)
        return list(deltas)

    def step(self, x: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        # Half-precision values keep their moments and compute their step in float32: in
        # float16, g² and eps = 1e-8 underflow to 0, and an entry with a zero gradient would
        # step by 0/0.
        out_dtype = x.dtype
        if out_dtype in (torch.float16, torch.bfloat16):
            x, g = x.float(), g.float()
        if wd and not self.decoupled:
            g = g.add(x, alpha=wd)
        self._begin_step(x, state, group)
        # New tensors, never in place (see InnerRule.step).
        m = state["exp_avg"] = state["exp_avg"].lerp(g, 1.0 - b1)
        v = state["exp_avg_sq"] = state["exp_avg_sq"].mul(b2).addcmul_(g, g, value=1.0 - b2)
        # Bias correction per entry: w = 1 − βᵗ for an entry with t updates. After a basis
        # change an entry in a new direction has w ≈ 0 and its first step is sign(g)·lr,
        # as Adam's first step, not (1−β1)/√(1−β2) ≈ 3.2 times that (docs/algorithms.md §5).
        w1 = state["weight1"] = state["weight1"].mul(b1).add_(1.0 - b1)
        w2 = state["weight2"] = state["weight2"].mul(b2).add_(1.0 - b2)
        denom = (v / w2).sqrt_().add_(eps)
        delta = (m / w1).div_(denom).mul_(-lr)
        if wd and self.decoupled:
            delta.add_(x, alpha=-lr * wd)
        return delta.to(out_dtype)

    def trend(self, g: Tensor, state: dict[str, Any]) -> Tensor:
        # The bias-corrected first moment (per entry, as the step's).
        return state["exp_avg"] / state["weight1"] if "exp_avg" in state else g


class AdamW(Adam):
    """Adam with decoupled weight decay (as torch.optim.AdamW)."""

    name = "adamw"
    defaults: ClassVar[dict[str, Any]] = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy: tensors cloned. (A rule's step needs only ``dict(state)``: it never writes in place.)"""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def transport_state(
    state: dict[str, Any],
    rule: InnerRule,
    left: Tensor | None = None,
    right: Tensor | None = None,
    pad: tuple[int, int] = (0, 0),
    *,
    modes: Sequence[Tensor | None] | None = None,
) -> dict[str, Any]:
    """Move optimizer state to new factor coordinates (docs/algorithms.md §5).

    A buffer ``m`` in old coordinates becomes ``left @ m @ right`` (either side
    may be absent); a second moment ``v`` becomes ``(left @ √v @ right)²``; a
    per-entry weight ``w`` (Adam's bias-correction mass) becomes
    ``(left∘left) @ w @ (right∘right)``, clamped to [0, 1].
    For an S-buffer ``left = U1ᵀU0`` and ``right = V0ᵀV1``; for a K-buffer only
    ``right = V0ᵀV1``; for an L-buffer only ``right = U0ᵀU1``. ``pad = (rows,
    cols)`` appends zero rows and columns afterwards: the same as extending
    ``left`` by zero rows and ``right`` by zero columns (new directions
    orthogonal to the old ones), without multiplying by the zeros.

    ``modes`` (instead of ``left``/``right``): the state of a Tucker core, moved
    by ``m ×ᵢ modes[i]`` (``None`` leaves a mode). A second moment becomes
    ``v ×ᵢ (modesᵢ∘modesᵢ)``, the diagonal of the moved covariance if the entries
    were independent, and so does a weight. Unlike ``(√v ×ᵢ modesᵢ)²`` it cannot
    cancel to zero where the first moment does not: by Cauchy–Schwarz every new
    ratio ``|m'ₖ|/√v'ₖ`` is at most the norm of the old ratios. A Tucker core is
    rotated in four modes at every truncation, and the square-root rule let
    Adam's steps blow up there (docs/tucker.md).
    """
    if modes is not None:
        return _transport_modes(state, rule, modes)
    rows, cols = pad

    def padded(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, cols, 0, rows)) if rows or cols else t

    def move(t: Tensor) -> Tensor:
        # State may be kept at a higher precision than the factors (Adam's moments of half-precision factors).
        if left is not None:
            t = left.to(t.dtype) @ t
        if right is not None:
            t = t @ right.to(t.dtype)
        return t

    out = dict(state)
    for key, kind in rule.transports.items():
        t = state.get(key)
        if t is None:
            continue
        if left is None and right is None:
            out[key] = padded(t)  # no change of coordinates: no round trip through √v for second moments
        elif kind == LINEAR:
            out[key] = padded(move(t))
        elif kind == SQUARE:
            out[key] = padded(move(t.sqrt()).square_())
        else:  # WEIGHT
            sq_left = None if left is None else left.to(t.dtype).square()
            sq_right = None if right is None else right.to(t.dtype).square()
            w = t if sq_left is None else sq_left @ t
            out[key] = padded((w if sq_right is None else w @ sq_right).clamp_(0.0, 1.0))
    return out


def _transport_modes(state: dict[str, Any], rule: InnerRule, modes: Sequence[Tensor | None]) -> dict[str, Any]:
    """:func:`transport_state` for a state with one coordinate per mode (a Tucker core)."""
    from ..linalg import multi_mode_product

    def move(t: Tensor, square: bool) -> Tensor:
        mats = [None if M is None else M.to(t.dtype) for M in modes]
        return multi_mode_product(t, [None if M is None else (M.square() if square else M) for M in mats])

    out = dict(state)
    for key, kind in rule.transports.items():
        t = state.get(key)
        if t is None:
            continue
        if kind == LINEAR:
            out[key] = move(t, square=False)
        else:  # SQUARE and WEIGHT: by the squared transport matrices
            moved = move(t, square=True)
            out[key] = moved if kind == SQUARE else moved.clamp_(0.0, 1.0)
    return out
