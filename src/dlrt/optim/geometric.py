"""Geometry-aware optimizers: heavy-ball and Adam whose moments live on the low-rank manifold (docs/algorithms.md §9).

Per-entry momentum on the factors ``K``, ``L``, ``S`` (today's ``sgd`` with
momentum, ``adam``) keeps one buffer per factor quantity in coordinates that
depend on the factor representation: rotating the bases (``U → UQ``,
``V → VP``, ``S → QᵀSP``) leaves ``W`` unchanged but changes Adam's step, and a
buffer that is padded with zeros at an augmentation forgets what the old
momentum says about the new directions. Here the momentum of a low-rank layer
is one tangent vector ``M`` of the manifold at the current point, kept in the
factored form of :func:`dlrt.linalg.tangent_transport` (``M V``, ``Mᵀ U``,
``Uᵀ M V`` under the layer's K-, L- and S-state), and moved across every
augmentation and truncation by projection onto the new tangent space.

Each pass ``k`` gives the gradient ``G`` (its projections, plus for ``bug`` and
``abc`` the contractions of the recorded inputs). With ``N`` the part of the
direction that is not this pass's gradient (a tangent vector):

* ``geo-heavyball``: the integrator steps along ``D = G + N``, ``N = β M + λ_wd W``,
  and the new momentum is ``P(D) = P(G) + N`` (``P``: the tangent projection);
* ``geo-adam``: ``M ← β₁ M + (1 − β₁) P(G + λ_wd W)``, a per-layer scalar second
  moment ``v ← β₂ v + (1 − β₂) ‖P(G + λ_wd W)‖²_F / r``, and the integrator steps
  along ``D = c ((1 − β₁)(G + λ_wd W) + β₁ M_old)`` with
  ``c = 1 / ((1 − β₁ᵗ)(√(v / (1 − β₂ᵗ)) + ε))``.

The integrator then takes a plain step ``−λ D`` (its K-, L- and S-steps use
``D V``, ``Dᵀ U``, ``Ûᵀ D V̂``), so with ``β = 0`` ``geo-heavyball`` is the
integrator with plain SGD, step for step. A pass that measures only ``Uᵀ G V``
(a coefficient step) adds only the projection ``U Uᵀ G V Vᵀ``. Dense
parameters (biases, layers left dense) live in a flat space, where the
geometric methods are the usual ones: SGD with heavy-ball momentum and Adam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .inner import SGD, Adam, InnerRule, check_real


@dataclass
class Direction:
    """The step direction of one low-rank layer for one pass: ``D = a G + N`` (``N`` tangent at the pass point).

    ``K``, ``L``, ``S`` are ``D V₀``, ``Dᵀ U₀`` and ``U₀ᵀ D V₀`` (``K`` and ``L``
    are ``None`` after a coefficient pass); ``NK``, ``NL``, ``NS`` the factored
    ``N``; ``a`` the weight of the raw gradient, which the integrator needs for
    the projections of ``G`` it contracts itself (:meth:`project`).
    """

    a: Tensor | float
    K: Tensor | None
    L: Tensor | None
    S: Tensor
    NK: Tensor | None
    NL: Tensor | None
    NS: Tensor
    U0: Tensor
    V0: Tensor

    def project(self, g: Tensor | None, left: Tensor, right: Tensor | None) -> Tensor:
        """``leftᵀ D right`` from ``g = leftᵀ G right`` (``right=None``: the identity); after a full pass only."""
        assert self.NK is not None and self.NL is not None, "a coefficient pass has no K-, L-parts"
        U0, V0 = self.U0, self.V0
        Vr = V0.mT if right is None else V0.mT @ right
        LU = left.mT @ U0
        NLr = self.NL.mT if right is None else self.NL.mT @ right
        out = (left.mT @ self.NK) @ Vr + LU @ (NLr - self.NS @ Vr)
        return out if g is None else out + self.a * g


class GeometricRule(InnerRule):
    """Base of the geometric optimizers: the factor quantities step along the direction they are given.

    The momentum is not kept per factor quantity: :meth:`direction` builds a
    layer's direction and its new tangent state from a pass, and the
    integrators move that state jointly (``integrators/base.py``,
    ``transport_tangent``). Dense parameters are stepped by :attr:`euclidean`.
    """

    geometric: ClassVar[bool] = True
    #: Factor state is moved jointly by the tangent projection, never per quantity.
    transports: ClassVar[dict[str, str]] = {}
    euclidean: ClassVar[type[InnerRule]]

    def __init__(self) -> None:
        self._flat = self.euclidean()

    def flat_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of :attr:`euclidean` for the dense parameters."""
        raise NotImplementedError

    def step(self, x: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        if group.get("kind") == "dense":
            return self._flat.step(x, g, state, self.flat_group(group))
        return g.mul(-group["lr"])  # the direction holds momentum and decay already

    def step_many(
        self, xs: list[Tensor], gs: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]
    ) -> list[Tensor]:
        if group.get("kind") == "dense":
            return self._flat.step_many(xs, gs, states, self.flat_group(group))
        return [g.mul(-group["lr"]) for g in gs]

    def direction(
        self,
        factors: tuple[Tensor, Tensor, Tensor],
        grads: tuple[Tensor | None, Tensor | None, Tensor],
        states: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
        group: dict[str, Any],
    ) -> tuple[Direction, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        """A layer's direction for one pass and its new K-, L- and S-states (new dicts, new tensors).

        ``factors = (U₀, S₀, V₀)`` at the pass point; ``grads = (G V₀, Gᵀ U₀, U₀ᵀ G V₀)``
        (the first two ``None`` after a coefficient pass); ``states``: the layer's
        current K-, L- and S-states (``{}`` when there is no momentum yet).
        """
        U0, S0, V0 = factors
        full = grads[0] is not None and grads[1] is not None
        dt = _work_dtype(S0.dtype)
        U0, S0, V0 = U0.to(dt), S0.to(dt), V0.to(dt)
        old = [st.get("tangent") for st in states]
        if any(t is None for t in old):
            old = [U0.new_zeros(U0.shape[0], S0.shape[1]), V0.new_zeros(V0.shape[0], S0.shape[0]), torch.zeros_like(S0)]
        old = [t.to(dt) for t in old]
        wd = group["weight_decay"]
        # W's own projections (W V₀, Wᵀ U₀, U₀ᵀ W V₀): W is a tangent vector at W.
        W = [U0 @ S0, V0 @ S0.mT, S0] if full else [None, None, S0]
        g = [None if gp is None else gp.to(dt) for gp in (grads if full else (None, None, grads[2]))]
        gw = [None if gp is None else (gp if not wd else torch.add(gp, Wp, alpha=wd)) for gp, Wp in zip(g, W)]
        shape = (U0.shape[0], V0.shape[0], min(S0.shape))
        decay, share, mult, scalars = self._coefficients(gw, states[2], shape, group)
        # New momentum: decay · M + share · P(G + λ_wd W); a coefficient pass measures only U Uᵀ G V Vᵀ,
        # whose K- and L-parts are U X and V Xᵀ.
        if full:
            new = [Mp * decay + gp * share for Mp, gp in zip(old, gw)]
        else:
            X = gw[2] * share
            new = [torch.addmm(old[0] * decay, U0, X), torch.addmm(old[1] * decay, V0, X.mT), old[2] * decay + X]
        # N: the part of the direction that is not this pass's raw gradient (tangent at the pass point).
        N: list[Tensor | None] = [None, None, None]
        for i, (Mp, Wp) in enumerate(zip(old, W)):
            if Wp is not None:  # a coefficient pass needs only N's S-part
                N[i] = mult * (torch.add(Mp * decay, Wp, alpha=share * wd) if wd else Mp * decay)
        a = mult * share
        dK, dL = (a * g[0] + N[0], a * g[1] + N[1]) if full else (None, None)
        direction = Direction(a, dK, dL, a * g[2] + N[2], N[0], N[1], N[2], U0, V0)
        out = ({**states[0], "tangent": new[0]}, {**states[1], "tangent": new[1]}, {**states[2], "tangent": new[2]})
        out[2].update(scalars)
        return direction, out

    def _coefficients(
        self, gw: list[Tensor | None], S_state: dict[str, Any], shape: tuple[int, int, int], group: dict[str, Any]
    ) -> tuple[float, float, Tensor | float, dict[str, Any]]:
        """``(decay, share, mult, scalars)``: ``M ← decay·M + share·P(g)``, ``D = mult·(decay·M + share·g)``;
        ``shape = (n, m, r)`` of the layer at the pass point."""
        raise NotImplementedError


class GeoHeavyBall(GeometricRule):
    """Heavy-ball momentum on the manifold: ``M ← β T(M) + P(G)``, step ``−λ (G + β T(M))`` (§9)."""

    name = "geo-heavyball"
    euclidean = SGD
    defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}

    def validate(self, group: dict[str, Any]) -> None:
        super().validate(group)
        check_real("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)

    def flat_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**group, "dampening": 0.0, "nesterov": False}

    def _coefficients(self, gw, S_state, shape, group):  # type: ignore[no-untyped-def]
        return group["momentum"], 1.0, 1.0, {}


class GeoAdam(GeometricRule):
    """Adam on the manifold: a tangent first moment and one second moment per layer (§9).

    The second moment is the mean of ``‖P(g)‖²_F`` over the layer's rank
    (``second_moment="rank"``, so a step's Frobenius norm is about ``lr·√r`` for
    every layer) or over the ``r(n + m − r)`` coordinates of its tangent space
    (``"coordinates"``: about ``lr·√(r(n + m − r))``, larger for larger layers,
    as per-entry Adam's steps are).
    """

    name = "geo-adam"
    euclidean = Adam
    defaults: ClassVar[dict[str, Any]] = {**Adam.defaults, "second_moment": "rank"}
    SECOND_MOMENTS = ("rank", "coordinates")

    def validate(self, group: dict[str, Any]) -> None:
        self._flat.validate(group)
        if group["second_moment"] not in self.SECOND_MOMENTS:
            raise ValueError(
                f"second_moment must be one of {list(self.SECOND_MOMENTS)}, got {group['second_moment']!r}"
            )

    def flat_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return group

    def _coefficients(self, gw, S_state, shape, group):  # type: ignore[no-untyped-def]
        b1, b2 = group["betas"]
        n, m, r = shape
        # A group saved before the option existed has no key: it averaged over the rank.
        count = r * (n + m - r) if group.get("second_moment", "rank") == "coordinates" else r
        if gw[0] is not None:  # ‖P(g)‖²_F = ‖g V‖² + ‖gᵀ U‖² − ‖Uᵀ g V‖²
            sq = (gw[0].square().sum() + gw[1].square().sum() - gw[2].square().sum()).clamp_min(0.0)
        else:
            sq = gw[2].square().sum()
        t = int(S_state.get("step", 0)) + 1
        v = S_state.get("exp_avg_sq")
        v = sq * ((1.0 - b2) / count) if v is None else torch.add(v.to(sq) * b2, sq, alpha=(1.0 - b2) / count)
        c = 1.0 / ((1.0 - b1**t) * ((v / (1.0 - b2**t)).sqrt() + group["eps"]))
        return b1, 1.0 - b1, c, {"exp_avg_sq": v, "step": t}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
