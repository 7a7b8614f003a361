"""What every integrator shares: the integrator ↔ optimizer contract and the geometric operations.

The contract
------------
A :class:`~dlrt.DLRTOptimizer` owns the bookkeeping; an :class:`Integrator`
owns the method. In one call of :meth:`Integrator.step` the integrator may

* **read** ``opt.lowrank_layers`` (the layers it drives, in a fixed order),
  ``opt.lowrank_group`` (their hyper-parameters: ``lr``, ``tau``, ``tau_mode``,
  ``truncation``, ``budget``, ...; read-only) and ``opt.phase`` (its position
  in the coefficient cycle, docs/algorithms.md §8);
* **run passes** only through ``opt.evaluate(closure, request, what)``, which
  runs (or checks the presence of) one forward/backward pass, checks it for
  non-finite values and clips it; it reads the pass's step direction (the
  gradient, or with a geometric optimizer the gradient combined with the
  momentum) through :func:`KL_grads`, ``opt.S_grad(layer)`` and
  ``opt.pass_grad(layer, left, right, records)``;
* **move layers** only through the operations of this module
  (:func:`change_basis`, :func:`augment`, :func:`grow_from_gradient`,
  :func:`S_steps`, :func:`truncate`), which keep every layer's optimizer state
  in step with its factors (docs/algorithms.md §5), and set the per-layer cycle flags
  (:data:`LAYER_FLAGS`: ``pending_growth``, ``just_grown``);
* **change optimizer state** only of its layers' factor quantities, through
  :func:`state_key` / :func:`factor_state` / :func:`set_factor_state`, and only
  by *replacing* a state dict, never mutating one (the optimizer's rollback
  keeps the old dicts by reference);
* **advance** ``opt.phase`` through :meth:`Integrator.advance`, and end a cycle
  only through :meth:`Integrator.end_cycle` (the one end-of-cycle rule, also
  used by :meth:`DLRTOptimizer.finish_cycle`).

It never touches the dense parameters or their state (the optimizer steps
them after the integrator), ``opt.steps``, the layers' ``grad_request`` (the
optimizer sets it from :meth:`Integrator.request` after every step), the
param groups, or the data. Everything it changes is covered by the
optimizer's step rollback: factors, the flags of :data:`LAYER_FLAGS`, the
state dicts of the low-rank group and ``opt.phase``.

Optimizer state in factor coordinates
-------------------------------------
``torch.optim`` keys state by parameter, so each factor quantity's state lives
under one of the layer's parameters; :func:`state_key` is the one place that
says which (checkpoints keep these keys):

* K-state (``n×r``, the state of ``K = U S``) under ``layer.U``; its columns are in V-coordinates;
* L-state (``m×r``, the state of ``L = V Sᵀ``) under ``layer.V``; its columns are in U-coordinates;
* S-state (``r×r``) under ``layer.S``: ``U``-rows, ``V``-columns.

A Tucker layer (:class:`~dlrt.layers.TuckerConv2d`) keeps state only for its
core, under ``layer.C``, one coordinate per mode; it moves mode by mode
(:func:`transport_core`). Its modes are augmented by the range of their
K-gradients, which is what a K-step spans with SGD, so no per-mode state is kept.

A geometric optimizer (``opt.rule.geometric``) keeps in these three slots the
projections ``M V``, ``Mᵀ U``, ``Uᵀ M V`` of one tangent vector ``M``; they move
together, by :func:`transport_tangent`, wherever the bases change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from .. import linalg
from ..layers import FactorizedLayer, LowRankLayer, TuckerConv2d
from ..optim.inner import transport_state

if TYPE_CHECKING:
    from ..optimizer import DLRTOptimizer

KL = frozenset({"K", "L"})
NONE: frozenset[str] = frozenset()

Kind = Literal["K", "L", "S"]
#: Per-layer integrator state kept on the layer (booleans); the optimizer's step
#: rollback saves and restores them with :func:`layer_flags` / :func:`restore_layer_flags`.
#:
#: * ``pending_growth``: the layer is a fresh adapter (``S = 0`` on placeholder
#:   bases); the ``parallel`` integrator leaves it alone until a pass reaches
#:   it, then grows its bases from the gradient (docs/algorithms.md §3).
#: * ``just_grown``: the bases were grown from the gradient in this cycle and
#:   the core is still the zero core of that step; the end of the cycle keeps
#:   the layer's rank (a zero core has no spectrum to truncate by). Cleared by
#:   the layer's next S-step and by the end of the cycle.
LAYER_FLAGS = ("pending_growth", "just_grown")


def layer_flags(layer: LowRankLayer) -> tuple[bool, ...]:
    """The values of :data:`LAYER_FLAGS` on ``layer`` (for a snapshot)."""
    return tuple(bool(getattr(layer, name, False)) for name in LAYER_FLAGS)


def restore_layer_flags(layer: LowRankLayer, flags: tuple[bool, ...]) -> None:
    """Set :data:`LAYER_FLAGS` on ``layer`` from :func:`layer_flags`' result."""
    for name, value in zip(LAYER_FLAGS, flags, strict=True):
        setattr(layer, name, value)


def state_key(layer: LowRankLayer, kind: Kind) -> Tensor:
    """The parameter under which the optimizer keeps the state of ``kind`` (``"K"``, ``"L"`` or ``"S"``)."""
    if kind == "K":
        return layer.U
    if kind == "L":
        return layer.V
    if kind == "S":
        return layer.core
    raise ValueError(f"unknown factor quantity {kind!r}: expected 'K', 'L' or 'S'")


def factor_state(opt: DLRTOptimizer, layer: LowRankLayer, kind: Kind) -> dict[str, Any]:
    """The inner-optimizer state of ``kind`` on ``layer`` (empty if none); do not mutate it."""
    return opt.state.get(state_key(layer, kind), {})


def set_factor_state(opt: DLRTOptimizer, layer: LowRankLayer, kind: Kind, state: dict[str, Any] | None) -> None:
    """Replace the state of ``kind`` on ``layer`` (``None`` drops it)."""
    key = state_key(layer, kind)
    if state is None:
        opt.state.pop(key, None)
    else:
        opt.state[key] = state


def drop_state(opt: DLRTOptimizer, layer: LowRankLayer) -> None:
    """Forget the layer's K-, L- and S-state (a layer that starts afresh, e.g. after ``reset_adapter``)."""
    for kind in ("K", "L", "S"):
        set_factor_state(opt, layer, kind, None)


class Integrator:
    """Base class: one ``step`` = one call of :meth:`DLRTOptimizer.step`; see the module docstring for
    what an integrator may read and change on the optimizer.

    A *cycle* is one augmentation (or growth) followed by ``coefficient_steps``
    S-steps in all, each a separate optimizer step with its own batch, and
    ends in the rule of :meth:`end_cycle`. ``opt.phase`` counts the steps taken
    in the current cycle (0 at its start).

    Args:
        coefficient_steps: number of updates of the core ``S`` on a frozen
            augmented basis before the next truncation (docs/algorithms.md §8). Each
            one is a separate optimizer step (its own batch); 1 gives the
            integrators of the papers, one S-update per augmentation.
    """

    name: ClassVar[str]
    #: Whether cycles end in a truncation (rank adaptation).
    adaptive: ClassVar[bool] = True
    #: Whether the integrator drives Tucker layers (:class:`~dlrt.layers.TuckerConv2d`) too.
    tucker: ClassVar[bool] = True
    #: Forward/backward passes per step (the first step of a cycle). Above 1 the step needs a
    #: closure, so torch.amp.GradScaler (which refuses closures) cannot drive it.
    passes_per_step: ClassVar[int] = 1
    #: Set by the optimizer when its rank rule reads the gradient's normal component
    #: (``tau_mode="gradient"``): an integrator whose step leaves part of it out may then have
    #: to record more of the pass (``parallel``: the block ``Ũᵀ G₀ Ṽ``).
    sees_normal: bool = False

    def __init__(self, coefficient_steps: int = 1) -> None:
        if isinstance(coefficient_steps, bool) or not isinstance(coefficient_steps, int) or coefficient_steps < 1:
            raise ValueError(f"coefficient_steps must be an int >= 1, got {coefficient_steps!r}")
        self.coefficient_steps = coefficient_steps

    def request(self, phase: int) -> frozenset[str]:
        """Projected gradients the first pass of a step in ``phase`` needs."""
        return KL if phase == 0 else NONE

    def step(self, opt: DLRTOptimizer, closure: Any) -> Any:
        raise NotImplementedError

    def advance(self, opt: DLRTOptimizer, cores: dict[LowRankLayer, Tensor] | None = None) -> None:
        """Count one step of the cycle; after ``coefficient_steps`` of them, end it (:meth:`end_cycle`).

        ``cores``: see :func:`truncate` (only where the cycle ends now).
        """
        opt.phase += 1
        if opt.phase >= self.coefficient_steps:
            self.end_cycle(opt, cores)

    def end_cycle(self, opt: DLRTOptimizer, cores: dict[LowRankLayer, Tensor] | None = None) -> None:
        """The end-of-cycle rule (docs/algorithms.md §8, with §1, §3, §4), the only place it is written.

        A rank-adaptive integrator truncates every layer that is on a trained
        core in this cycle, i.e. all layers except

        * fresh adapters still waiting for growth (``pending_growth``): they
          were not moved, and keep their placeholder rank;
        * layers whose bases were grown from the gradient in this cycle and
          whose core is still zero (``just_grown``): a zero core has no
          spectrum, and truncating it would cut the layer to ``min_rank``.

        Layers not truncated keep their rank and, with ``truncation="global"``
        and a ``budget``, count against it (their ranks, or their parameters with
        ``budget_unit="params"``): the truncated layers share what is left of
        the budget, but never less than their ``min_rank`` s
        (so the total stays within the budget whenever the ranks kept allow
        it). Then the flags are cleared and ``opt.phase`` returns to 0.
        Called by :meth:`advance` at the end of a full cycle and by
        :meth:`DLRTOptimizer.finish_cycle` to end one early.
        """
        layers = opt.lowrank_layers
        if self.adaptive:
            held = [any(layer_flags(m)) for m in layers]  # pending_growth or just_grown
            cut = [m for m, h in zip(layers, held) if not h]
            unit = opt.lowrank_group.get("budget_unit", "rank")
            kept = sum(budget_cost(m, unit) for m, h in zip(layers, held) if h)
            truncate(opt, cut, opt.lowrank_group, held=kept, cores=cores)
        for m in layers:
            m.just_grown = False
        opt.trends = {}
        opt.phase = 0


# --------------------------------------------------------------------------- ops
def factor_steps(opt: DLRTOptimizer, items: list[tuple[LowRankLayer, Kind, Tensor, Tensor]]) -> list[Tensor]:
    """The inner-optimizer steps ``Δ`` for factor quantities ``(layer, kind, x, grad)``, as one fused update.

    The ``x`` are not modified; each new state replaces the old one.
    """
    if not items:
        return []
    states = [dict(factor_state(opt, layer, kind)) for layer, kind, _, _ in items]  # rules write new tensors
    xs = [x for _, _, x, _ in items]
    grads = [g.to(x.dtype) for (_, _, _, g), x in zip(items, xs)]
    deltas = opt.rule.step_many(xs, grads, states, opt.lowrank_group)
    for (layer, kind, _, _), state in zip(items, states):
        set_factor_state(opt, layer, kind, state)
    return deltas


def transport(
    opt: DLRTOptimizer,
    layer: LowRankLayer,
    kind: Kind,
    left: Tensor | None,
    right: Tensor | None,
    pad: tuple[int, int] = (0, 0),
) -> None:
    """Transport the state of ``kind`` on ``layer`` (if any) by ``left @ m @ right``, then ``pad`` zero rows/columns."""
    state = factor_state(opt, layer, kind)
    if state:
        set_factor_state(opt, layer, kind, transport_state(state, opt.rule, left, right, pad=pad))


def transport_tangent(
    opt: DLRTOptimizer, layer: LowRankLayer, U1: Tensor, V1: Tensor, A: Tensor | None, B: Tensor | None
) -> None:
    """Move a geometric optimizer's tangent momentum of ``layer`` to the bases ``(U1, V1)`` (docs/algorithms.md §9).

    The momentum is the projections ``(M V, Mᵀ U, Uᵀ M V)`` kept as the layer's K-, L-
    and S-states; the new ones are those of its tangent projection at the new
    bases (:func:`dlrt.linalg.tangent_transport`), so new directions of an
    augmentation receive what the momentum already holds along them.
    """
    states = [factor_state(opt, layer, kind) for kind in ("K", "L", "S")]
    if any("tangent" not in st for st in states):
        return
    U0, V0 = layer.U.detach(), layer.V.detach()
    K, L, S = (st["tangent"] for st in states)
    dt = K.dtype
    moved = linalg.tangent_transport(
        U0.to(dt),
        V0.to(dt),
        K,
        L,
        S,
        U1.to(dt),
        V1.to(dt),
        None if A is None else A.to(dt),
        None if B is None else B.to(dt),
    )
    for kind, st, t in zip(("K", "L", "S"), states, moved):
        set_factor_state(opt, layer, kind, {**st, "tangent": t})


def KL_grads(opt: DLRTOptimizer, layer: LowRankLayer) -> tuple[Tensor, Tensor]:
    """``(D V, Dᵀ U)`` for the last pass's step direction ``D``; zeros for a layer the loss did not reach.

    ``D`` is the gradient ``G``, or with a geometric optimizer the gradient
    combined with the layer's tangent momentum (optim/geometric.py).
    """
    direction = opt.directions.get(layer)
    if direction is not None and direction.K is not None:
        return direction.K, direction.L
    gK, gL = layer.grad_K, layer.grad_L
    if gK is None:
        gK = layer.U.new_zeros(layer.U.shape[0], layer.S.shape[1])
    if gL is None:
        gL = layer.V.new_zeros(layer.V.shape[0], layer.S.shape[0])
    return gK, gL


def K_and_L_steps(opt: DLRTOptimizer, layers: list[LowRankLayer]) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """docs/algorithms.md §2.2 for every layer: ``K₁ = U₀S₀ − λ G₀V₀`` and ``L₁ = V₀S₀ᵀ − λ G₀ᵀU₀``.

    Returns ``(K₁, L₁, ΔK, ΔL)`` per layer, with the steps ``ΔK = K₁ − U₀S₀``,
    ``ΔL = L₁ − V₀S₀ᵀ`` computed directly (``range([U₀, K₁]) = range([U₀, ΔK])``).
    """
    items: list[tuple[LowRankLayer, Kind, Tensor, Tensor]] = []
    for layer in layers:
        U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
        gK, gL = KL_grads(opt, layer)
        items += [(layer, "K", U0 @ S0, gK), (layer, "L", V0 @ S0.mT, gL)]
    deltas = factor_steps(opt, items)
    out = []
    for i in range(len(layers)):
        K0, L0 = items[2 * i][2], items[2 * i + 1][2]
        dK, dL = deltas[2 * i], deltas[2 * i + 1]
        out.append((K0 + dK, L0 + dL, dK, dL))
    return out


def change_basis(
    opt: DLRTOptimizer,
    layer: LowRankLayer,
    U1: Tensor,
    V1: Tensor,
    S1: Tensor | None = None,
    A: Tensor | None = None,
    B: Tensor | None = None,
) -> None:
    """Move the layer to bases ``(U1, V1)`` and transport all its state.

    The new core is the Galerkin projection ``(U1ᵀU₀) S₀ (V₀ᵀV₁)`` unless
    ``S1`` is given; ``A = U1ᵀU₀`` and ``B = V₀ᵀV₁`` are computed unless given.
    """
    U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
    A = U1.mT @ U0 if A is None else A  # r1×r0
    B = V0.mT @ V1 if B is None else B  # r0×r1
    if S1 is None:
        S1 = A @ S0 @ B
    if opt.rule.geometric:
        transport_tangent(opt, layer, U1, V1, A, B)
    else:
        transport(opt, layer, "S", A, B)
        # K-state: columns follow V; L-state: columns follow U. Still in the coordinates before this
        # step's augmentation (augment(defer_kl_state=True)): only their first rows of B, Aᵀ apply.
        r_u_old, r_v_old = opt.deferred_kl_state.pop(layer, (A.shape[1], B.shape[0]))
        transport(opt, layer, "K", None, B[:r_v_old])
        transport(opt, layer, "L", None, A.mT[:r_u_old])
    layer.set_factors(U1, S1, V1)


def augment(
    opt: DLRTOptimizer, layer: LowRankLayer, KU: Tensor, LV: Tensor | None, *, defer_kl_state: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Move the layer to ``Û = orth([U₀, KU])``, ``V̂ = orth([V₀, LV])`` (docs/algorithms.md §0).

    The core becomes the Galerkin projection ``(ÛᵀU₀) S₀ (V₀ᵀV̂)`` and all state
    is transported. At most ``r`` new directions per side, fewer when the layer is
    close to full rank (the core may then be rectangular) or when ``KU``/``LV``
    add fewer directions. ``LV=None`` keeps ``V₀`` (the one-sided augmentation of
    ``abc``). Returns the factors ``(Ûᵀ[U₀, KU], V̂ᵀ[V₀, LV])`` of
    :func:`~dlrt.linalg.augment_basis_qr` (``None`` for a side kept); the new
    bases are the layer's ``U`` and ``V``.

    ``defer_kl_state``: the caller truncates the layer later in the same step (a
    cycle of one step), and nothing reads the K- and L-states before: they stay
    in the old coordinates, and the truncation's :func:`change_basis` moves them
    from there in one product, instead of padding them with zeros here and
    multiplying the zeros there (``opt.deferred_kl_state``; the optimizer pads
    whatever is left at the end of the step, :func:`settle_kl_state`). A geometric
    optimizer's tangent momentum is always moved here (:func:`transport_tangent`).
    """
    U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
    r_u, r_v = S0.shape
    U_hat, RU = linalg.augment_basis_qr(U0, KU)
    V_hat, RV = (V0, None) if LV is None else linalg.augment_basis_qr(V0, LV)
    a, b = U_hat.shape[1] - r_u, V_hat.shape[1] - r_v
    # ÛᵀU₀ = [R₁₁; 0] and V₀ᵀV̂ = [R₁₁'ᵀ, 0]: the new directions are orthogonal to the old
    # bases, and R₁₁, R₁₁' are the identity to round-off (the first columns of Û, V̂ are U₀, V₀
    # re-orthonormalized). The S-state moves by the old blocks; the K- and L-states (columns in
    # V- and U-coordinates, n×r and m×r) keep their columns: multiplying them by R₁₁ would cost
    # an n×r×r product per state tensor and change them only by round-off. New directions
    # start from zero state.
    A = RU[:r_u, :r_u]
    B = None if RV is None else RV[:r_v, :r_v].mT
    core = A @ S0 if B is None else A @ S0 @ B
    if opt.rule.geometric:
        # The full blocks ÛᵀU₀ and V₀ᵀV̂ (V̂ = V₀ when V is kept).
        B_full = torch.eye(r_v, dtype=S0.dtype, device=S0.device) if RV is None else RV[:, :r_v].mT
        transport_tangent(opt, layer, U_hat, V_hat, RU[:, :r_u], B_full)
    else:
        transport(opt, layer, "S", A, B, pad=(a, b))
        if defer_kl_state:
            opt.deferred_kl_state.setdefault(layer, (r_u, r_v))
        else:
            transport(opt, layer, "K", None, None, pad=(0, b))
            transport(opt, layer, "L", None, None, pad=(0, a))
    S_hat = torch.nn.functional.pad(core, (0, b, 0, a))
    layer.set_factors(U_hat, S_hat, V_hat)
    return RU, RV


def settle_kl_state(opt: DLRTOptimizer) -> None:
    """Pad the K- and L-states that :func:`augment` left in old coordinates to the layers' current ones."""
    for layer, (r_u, r_v) in list(opt.deferred_kl_state.items()):
        a, b = layer.S.shape[0] - r_u, layer.S.shape[1] - r_v
        transport(opt, layer, "K", None, None, pad=(0, b))
        transport(opt, layer, "L", None, None, pad=(0, a))
    opt.deferred_kl_state.clear()


def grow_from_gradient(opt: DLRTOptimizer, layer: LowRankLayer, gK: Tensor, gL: Tensor) -> None:
    """Bases from the gradient for a fresh adapter (``pending_growth``, core zero, docs/algorithms.md §3).

    At ``S₀ = 0`` the tangent space at the random starting bases holds only
    about ``r/n + r/m`` of the gradient, so a parallel step would barely move
    the layer. ``G V₀`` and ``Gᵀ U₀`` are a two-sided randomized sketch of ``G``
    (Halko et al. 2011): ``U₁ = orth(G V₀)`` and ``V₁ = orth(Gᵀ U₀)`` span
    (approximately) its dominant column and row spaces. The core stays zero,
    so the layer's function is unchanged by this step, and the layer starts
    afresh: state left from before a ``reset_adapter`` is dropped. Sets
    ``just_grown`` (the end of this cycle keeps the rank) and clears
    ``pending_growth``.
    """
    U1, V1 = linalg.orth(gK), linalg.orth(gL)
    drop_state(opt, layer)
    layer.set_factors(U1, U1.new_zeros(U1.shape[1], V1.shape[1]), V1)
    layer.pending_growth = False
    layer.just_grown = True


def S_steps(opt: DLRTOptimizer, layers: list[LowRankLayer], grads: list[Tensor]) -> None:
    """``S ← S − λ ∇_S`` on every layer with the inner optimizer (the Galerkin/coefficient step), fused.

    The cores are then no longer freshly grown zero cores (``just_grown`` is cleared).
    """
    S0s = [layer.core.detach() for layer in layers]
    deltas = factor_steps(opt, [(layer, "S", S0, g) for layer, S0, g in zip(layers, S0s, grads)])
    keep_trend = opt.lowrank_group["tau_mode"] == "gradient"  # only the gradient rule reads it
    for layer, S0, delta, g in zip(layers, S0s, deltas, grads):
        layer.set_core(S0 + delta)
        layer.just_grown = False
        if keep_trend:
            opt.trends[layer] = opt.rule.trend(g, factor_state(opt, layer, "S"))


#: What a global truncation's ``budget`` counts: ``"rank"`` (the sum of all ranks) or ``"params"`` (the
#: parameters the low-rank factors hold; :func:`rank_costs`).
BUDGET_UNITS = ("rank", "params")


def check_budget_unit(budget_unit: Any, budget: Any, budget_order: Any = "sigma") -> str:
    """``budget_unit`` and ``budget_order`` checked (one of :data:`BUDGET_UNITS`, of
    :data:`~dlrt.linalg.BUDGET_ORDERS`, and other than the defaults only with a ``budget``); a clear
    ``ValueError`` otherwise. Returns ``budget_unit``."""
    if not isinstance(budget_unit, str) or budget_unit not in BUDGET_UNITS:
        raise ValueError(
            f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}: 'rank' counts the budget as the sum "
            "of all ranks, 'params' as the parameters the factors U, S, V hold"
        )
    if budget_unit == "params" and budget is None:
        raise ValueError(
            "budget_unit='params' prices the ranks against a budget in parameters: give budget= "
            "(with truncation='global'), or leave budget_unit='rank'"
        )
    orders = linalg.BUDGET_ORDERS
    if not isinstance(budget_order, str) or budget_order not in orders:
        raise ValueError(
            f"budget_order must be one of {orders}, got {budget_order!r}: 'sigma' keeps the largest singular "
            "values first (GeoLoRA), 'energy' the largest σ² per unit of the budget they cost"
        )
    if budget_order != "sigma" and budget is None:
        raise ValueError(
            f"budget_order={budget_order!r} orders what a budget keeps: give budget= (with truncation='global'), "
            "or leave budget_order='sigma'"
        )
    return budget_unit


def budget_cost(layer: FactorizedLayer, unit: str) -> int:
    """What ``layer`` takes of a global budget now: its rank (``unit="rank"``), or the parameters of its
    factors ``U``, ``S``, ``V`` (``unit="params"``; the bias, never truncated, does not count)."""
    if unit == "params":
        return sum(p.numel() for p in layer.factor_parameters())
    return layer.rank


def rank_costs(layer: FactorizedLayer, unit: str, count: int) -> Tensor | None:
    """The price of each of ``layer``'s first ``count`` ranks in a global budget's ``unit``; None for ``"rank"``.

    With ``"params"`` the ``k``-th rank of an ``n×m`` matrix layer costs the
    parameters it adds: a column of ``U`` and of ``V`` and the core's growth from
    ``(k−1)²`` to ``k²``, ``n + m + 2k − 1``; so ``r`` ranks cost
    ``r(n + m) + r²``, what the layer stores at rank ``r`` (a LoRA pair ``B A``
    of rank ``r`` stores ``r(n + m)``).
    """
    if unit == "rank":
        return None
    if isinstance(layer, TuckerConv2d):
        # Refused when the optimizer is built (core.py); a group edited since then gets here.
        raise ValueError("budget_unit='params' prices matrix layers' ranks only, not Tucker layers' modes")
    n, m = layer.shape
    k = torch.arange(1, count + 1, dtype=torch.float64)
    return n + m + 2 * k - 1


def truncate(
    opt: DLRTOptimizer,
    layers: list[FactorizedLayer],
    group: dict[str, Any],
    held: int = 0,
    cores: dict[LowRankLayer, Tensor] | None = None,
) -> None:
    """docs/algorithms.md §1 on every layer of one truncation event (each layer exactly once).

    Per layer with the group's ``tau``, or jointly over all layers with
    ``truncation="global"`` (and an optional ``budget``, a total rank or with
    ``budget_unit="params"`` a total of parameters (:func:`rank_costs`), of which
    ``held`` is already taken by layers not truncated now; the layers here
    keep at least their ``min_rank`` s even when that exceeds the rest).

    ``cores``: for a layer whose new weight is ``U C`` with an ``r×m`` matrix ``C``
    not yet split into a core and a basis (``abc``: ``C = L¹ᵀ``), the SVD of ``C``
    itself gives the truncation, ``V₁`` directly its right singular vectors: the QR
    ``Cᵀ = V̂R`` that would come first is folded into the SVD.
    """
    if not layers:
        return
    cores = cores or {}
    # One truncation entry per rank decided: a matrix layer's core (one SVD gives both sides), or one
    # adapted mode of a Tucker layer (the SVD of that unfolding of the core, the same τ rule).
    entries: list[tuple[FactorizedLayer, int | None, Any, Tensor, int, int]] = []
    for layer in layers:
        if isinstance(layer, TuckerConv2d):
            C = layer.C.detach()
            for mode in layer.tucker_modes:
                P, sigma = linalg.mode_svd(C, mode)
                entries.append((layer, mode, P, sigma, *layer.mode_bounds(mode)))
        else:
            C = cores.get(layer, layer.S).detach()
            t = linalg.svd_truncate(C, rank=min(C.shape))
            entries.append((layer, None, t, t.sigma, layer.min_rank, layer.max_rank))
    absolute = group["tau_mode"] == "absolute"
    budget = None
    costs: list[Tensor] | None = None
    if group["truncation"] == "global":
        budget = group["budget"]
        if budget is not None:
            unit = group.get("budget_unit", "rank")  # a group saved before budget_unit existed counts ranks
            his = [sigma.numel() if hi is None else min(hi, sigma.numel()) for *_, sigma, _, hi in entries]
            if unit != "rank":  # priced up to max_rank: the gradient rule may grow a layer beyond its σ's count
                costs = [rank_costs(e[0], unit, max(h, e[5] or 0)) for e, h in zip(entries, his)]
            floor = sum(
                min(lo, h) if costs is None else float(c[: min(lo, h)].sum())
                for (*_, lo, _), h, c in zip(entries, his, costs or [None] * len(entries))
            )
            budget = max(budget - held, floor)
        ranks = linalg.global_truncation_ranks(
            [e[3] for e in entries],
            tau=group["tau"],
            budget=budget,
            absolute=absolute,
            min_ranks=[e[4] for e in entries],
            max_ranks=[e[5] for e in entries],
            costs=costs,
            order=group.get("budget_order", "sigma"),
        )
    else:
        ranks = [
            linalg.truncation_rank(sigma, group["tau"], absolute=absolute, min_rank=lo, max_rank=hi)
            for *_, sigma, lo, hi in entries
        ]
    kept = _normal_bases(opt, entries, ranks, group, budget, cores, costs)
    tucker: dict[TuckerConv2d, dict[int, Tensor]] = {}
    for (layer, mode, t, *_), (P, Q), r in zip(entries, kept, ranks):
        if mode is not None:
            tucker.setdefault(layer, {})[mode] = P  # a Tucker mode keeps left factors only
            continue
        if P.shape[1] == r:
            S1 = torch.diag(t.sigma[:r])  # the weight's singular directions alone: the core is diagonal
        else:  # with the trend's directions: block diagonal, diag(σ) and their part of the core
            S1 = P.mT @ cores.get(layer, layer.S).detach().to(P.dtype) @ Q
        U1 = layer.U.detach() @ P
        if layer in cores:  # W = Û C = (Û P) S1 Qᵀ: the right factors are V₁
            change_basis(opt, layer, U1, Q, S1=S1, A=P.mT)
            continue
        V1 = layer.V.detach() @ Q
        # U1ᵀÛ = Pᵀ and V̂ᵀV1 = Q since Û, V̂ are orthonormal.
        change_basis(opt, layer, U1, V1, S1=S1, A=P.mT, B=Q)
    for layer, P in tucker.items():
        # Each adapted mode keeps the leading left singular vectors of its unfolding (a truncated HOSVD of the
        # core), and with the gradient rule the trend's normal directions of that mode.
        tucker_change_basis(opt, layer, [None if i not in P else P[i].mT for i in range(len(layer.bases))])


def _normal_bases(
    opt: DLRTOptimizer,
    entries: list[tuple[Any, ...]],
    ranks: list[int],
    group: dict[str, Any],
    budget: float | None,
    cores: dict[LowRankLayer, Tensor],
    costs: list[Tensor] | None = None,
) -> list[tuple[Tensor, Tensor | None]]:
    """The kept factors of every truncation entry: ``(P, Q)`` of a matrix core, ``(P, None)`` of a Tucker mode.

    The weight keeps its leading ``ranks`` singular vectors. With the gradient
    rule (``tau_mode="gradient"``, docs/algorithms.md §1.2) each entry whose layer
    took an S-step in this cycle adds the directions of its gradient trend that
    the kept bases cannot represent (:func:`~dlrt.linalg.normal_directions`),
    within the layer's ``max_rank``; with a ``budget`` (what is left of it after
    the weights' ranks) the largest of them over all layers, relative to each
    trend's norm (or, with ``budget_order="energy"``, the largest squared share
    per unit of cost), while the next one's cost fits (``costs``: the price of each
    rank of each entry, as for :func:`~dlrt.linalg.global_truncation_ranks`;
    default 1 a rank).
    """
    out: list[tuple[Tensor, Tensor | None]] = []
    extra: list[tuple[Tensor, Tensor | None, Tensor]] = []
    for (layer, mode, t, _, _, hi), r in zip(entries, ranks):
        P, Q = (t[:, :r], None) if mode is not None else (t.P[:, :r], t.Q[:, :r])
        out.append((P, Q))
        trend = opt.trends.get(layer) if group["tau_mode"] == "gradient" else None
        if trend is None:
            extra.append((P[:, :0], None if Q is None else Q[:, :0], P.new_zeros(0)))
            continue
        tol = group["tau"] if group.get("tau_grad") is None else group["tau_grad"]
        if mode is not None:
            # A rotation of the mode's basis represents Mat(M)'s part in the row space of Mat(C) kept; the
            # rest of it outside the kept basis is what that mode's rank must grow for (as Q for a matrix).
            C = linalg.unfold(layer.C.detach(), mode)
            W = P.mT @ C
            Qc = linalg.orth(W.mT) if W.numel() and bool(W.any()) else W.mT[:, :0]
            extra.append(linalg.normal_directions(P, Qc, linalg.unfold(trend, mode), tol, hi - r, C))
        else:
            C = cores.get(layer, layer.S).detach()
            extra.append(linalg.normal_directions(P, Q, trend, tol, hi - r, C))
    counts = [e[2].numel() for e in extra]
    if budget is not None:
        shares = torch.cat([e[2].double().cpu() for e in extra]) if extra else torch.zeros(0)
        if costs is None:  # each rank costs 1
            costs = [torch.ones(r + c, dtype=torch.float64) for r, c in zip(ranks, counts)]
        room = max(budget - sum(float(p[:r].sum()) for p, r in zip(costs, ranks)), 0)
        owners = [i for i, c in enumerate(counts) for _ in range(c)]
        # The a-th new direction of entry i is its (ranks[i] + a)-th rank.
        price = torch.cat([p[r : r + c] for p, r, c in zip(costs, ranks, counts)]) if extra else torch.zeros(0)
        score = shares.double()
        if group.get("budget_order", "sigma") == "energy":
            score = score.square() / price.double()
        order = torch.argsort(score, descending=True, stable=True)
        order = order[: linalg.affordable(price.double()[order], room)].tolist()
        counts = [0] * len(extra)
        for j in order:
            counts[owners[j]] += 1  # each layer's directions are sorted, so it keeps a leading block
    result = []
    for (P, Q), (A, B, _), a in zip(out, extra, counts):
        if a:
            P = torch.cat([P, A[:, :a]], dim=1)
            Q = None if Q is None else torch.cat([Q, B[:, :a]], dim=1)
        result.append((P, Q))
    return result


# --------------------------------------------------------------------------- Tucker layers
def split_layers(layers: list[FactorizedLayer]) -> tuple[list[LowRankLayer], list[TuckerConv2d]]:
    """The matrix layers and the Tucker layers of ``layers``, each in their order."""
    return [m for m in layers if isinstance(m, LowRankLayer)], [m for m in layers if isinstance(m, TuckerConv2d)]


# The same operations for a Tucker layer, mode by mode: a matrix layer is the 2-mode case
# (basis U, core S, basis V), written above with its two sides named K and L.
def transport_core(opt: DLRTOptimizer, layer: TuckerConv2d, mats: list[Tensor | None]) -> None:
    """Move the core's optimizer state (if any) by ``state ×ᵢ mats[i]`` (``None``: mode unchanged).

    First moments linearly, as a matrix S-state by ``left @ m @ right``; second
    moments by the squared matrices (:func:`~dlrt.optim.inner.transport_state`, ``modes=``).
    """
    state = factor_state(opt, layer, "S")
    if state:
        set_factor_state(opt, layer, "S", transport_state(state, opt.rule, modes=mats))


def tucker_change_basis(
    opt: DLRTOptimizer, layer: TuckerConv2d, mats: list[Tensor | None], bases: list[Tensor] | None = None
) -> None:
    """Move a Tucker layer to new bases: ``U_i ← U_i mats[i]ᵀ`` (or ``bases``), core ``C ×ᵢ mats[i]``.

    ``mats[i]`` is ``U_i,newᵀ U_i`` (``None``: mode unchanged): the Galerkin core of
    :func:`~dlrt.linalg.tucker_galerkin`; the core state moves with it. With ``bases``
    given they are the new bases; otherwise ``U_i mats[i]ᵀ`` (a truncation, where
    ``mats[i] = P_iᵀ`` selects singular vectors of the core's unfolding).
    """
    old = [B.detach() for B in layer.bases]
    if bases is None:
        bases = [U if M is None else U @ M.mT for U, M in zip(old, mats)]
    core = linalg.multi_mode_product(layer.C.detach(), mats)
    transport_core(opt, layer, mats)
    layer.set_factors(bases, core)


def tucker_augment(opt: DLRTOptimizer, layer: TuckerConv2d) -> None:
    """Augment every adapted mode of a Tucker layer by its K-gradient's range; Galerkin core (TDLRT).

    ``Û_i = orth([U_i, Mat_i(G ×_{j≠i} U_jᵀ) Q_i])`` with the old basis first (at
    most ``r_i`` new directions, :func:`~dlrt.linalg.augment_basis_qr`), and the core
    ``C ×ᵢ Û_iᵀU_i``, which represents the same kernel. Modes without a gradient (the
    loss did not reach the layer) or not adapted keep their basis. Clears the
    layer's recorded pass and gradients (the caller keeps ``layer.pass_inputs`` and
    the core's gradient first if it needs them).
    """
    old = [B.detach() for B in layer.bases]
    bases: list[Tensor] = []
    mats: list[Tensor | None] = []
    for mode, (U, g) in enumerate(zip(old, layer.grad_modes)):
        if mode in layer.tucker_modes and g is not None and bool(g.any()):
            U_hat, R = linalg.augment_basis_qr(U, g)
            bases.append(U_hat)
            mats.append(R[:, : U.shape[1]])  # Ûᵀ U = [R₁₁; 0]
        else:
            bases.append(U)
            mats.append(None)
    tucker_change_basis(opt, layer, mats, bases)


def tucker_galerkin_grad(
    opt: DLRTOptimizer, layer: TuckerConv2d, records: list[Any], old_core_grad: Tensor, parallel: bool = False
) -> Tensor:
    """The S-step's gradient of a Tucker layer at its current bases: ``G ×ᵢ U_iᵀ`` of the recorded passes.

    ``G`` is the kernel gradient of the pass at ``W₀`` (clipped and unscaled as the
    pass was); after an augmentation that contains the old bases, the Galerkin point
    is ``W₀``, so one pass serves the step. The block of the old bases is
    ``old_core_grad``, the core's gradient before the augmentation (``opt.S_grad``): it
    equals ``G ×ᵢ U_iᵀ`` plus whatever the loss adds on the core itself (a
    regularizer of ``C``, :mod:`dlrt.robust`), as a matrix layer's S-step takes ``S.grad``.
    With ``parallel`` the blocks in which two or more modes are new are left zero, as
    the matrix parallel integrator leaves ``Ũᵀ G Ṽ`` out.
    """
    old = tuple(slice(0, r) for r in old_core_grad.shape)
    with opt._at_pass_threads():  # a contraction over the pass's inputs: batch-sized
        g = layer.project_grad([B.detach() for B in layer.bases], records)
    if g is None:
        g = torch.zeros_like(layer.C)
    elif opt._pass_scale != 1.0:
        g = g * opt._pass_scale
    g[old] = old_core_grad.to(g.dtype)
    if parallel:
        new = torch.zeros((), dtype=torch.int64, device=g.device)
        for mode, r in enumerate(old_core_grad.shape):
            idx = torch.arange(g.shape[mode], device=g.device) >= r
            new = new + idx.reshape([-1 if j == mode else 1 for j in range(g.dim())])
        g = torch.where(new >= 2, torch.zeros_like(g), g)
    return g


def tucker_fixed_rank_bases(opt: DLRTOptimizer, layer: TuckerConv2d) -> None:
    """The fixed-rank K-steps of a Tucker layer: ``U_i ← orth(U_i R_iᵀ − λ Mat_i(G ×_{j≠i} U_jᵀ) Q_i)``.

    ``Mat_i(C)ᵀ = Q_i R_i``; the K-step is plain gradient descent with the group's
    ``lr`` (no per-mode optimizer state). The core becomes the Galerkin projection.
    """
    lr = opt.lowrank_group["lr"]
    C = layer.C.detach()
    bases: list[Tensor] = []
    mats: list[Tensor | None] = []
    for mode, (U, g) in enumerate(zip((B.detach() for B in layer.bases), layer.grad_modes)):
        if mode not in layer.tucker_modes or g is None:
            bases.append(U)
            mats.append(None)
            continue
        _, R = linalg.qr(linalg.unfold(C, mode).mT)
        U1 = linalg.orth(U @ R.mT - lr * g)
        bases.append(U1)
        mats.append(U1.mT @ U)
    tucker_change_basis(opt, layer, mats, bases)
