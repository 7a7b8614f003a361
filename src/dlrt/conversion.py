"""Converting a dense model to low rank and back, and inspecting its ranks and compression.

Which low-rank layer replaces which dense module is read from the registry
(:func:`dlrt.layers.register_lowrank`); which modules are converted follows
:mod:`dlrt.selection`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from .layers import FactorizedLayer, TuckerConv2d
from .layers.ranks import check_rank, rank_range
from .layers.registry import find_lowrank, lowrank_formats, lowrank_types, registered_lowrank
from .layers.tucker import check_tucker_modes
from .linalg import check_tau
from .selection import Selector, check_selector, excluded, matches, set_submodule

#: The starts of :func:`convert` (its ``init=``).
INITS = ("svd", "scaled")

__all__ = ["INITS", "compression", "convert", "lowrank_layers", "mode_ranks", "parameter_counts", "ranks", "to_dense"]


def lowrank_layers(model: nn.Module) -> Iterator[tuple[str, FactorizedLayer]]:
    """``(name, layer)`` for every low-rank layer of ``model`` (matrix and Tucker)."""
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            yield name, module


def _check_arguments(
    rank: int | float | None, tau: float | None, max_rank: int | None, min_rank: int, conv: str
) -> None:
    if not isinstance(conv, str) or conv not in lowrank_formats():
        raise ValueError(f"conv={conv!r} is not a registered low-rank format; choose one of {lowrank_formats()}")
    if rank is None and tau is None:
        raise ValueError("convert needs rank=, tau= or both")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must lie in (0, 1], got rank={rank}")
    elif rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be a positive int or a fraction in (0, 1], got rank={rank!r}")
    if tau is not None:
        check_tau(tau, "relative")
    for what, value in (("max_rank", max_rank), ("min_rank", min_rank)):
        if value is None and what == "max_rank":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {what}={value!r}")
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(f"min_rank={min_rank} is larger than max_rank={max_rank}")


def convert(
    model: nn.Module,
    rank: int | float | None = None,
    *,
    tau: float | None = None,
    max_rank: int | None = None,
    min_rank: int = 1,
    target_modules: Selector | None = None,
    exclude: Selector | None = (),
    conv: str = "matrix",
    tucker_modes: Sequence[int] | None = None,
    init: str = "svd",
) -> nn.Module:
    """Replace the dense layers of ``model`` by low-rank layers, in place.

    Every module whose type has a registered low-rank type
    (:func:`dlrt.layers.register_lowrank`; ``nn.Linear`` and groups=1
    ``nn.Conv2d`` out of the box) is converted, unless deselected. Each layer
    starts from the truncated SVD of its current weight: at ``rank`` (an int,
    or a float in ``(0, 1]``: that fraction of each layer's full rank
    ``min(out, in)``, at least 1), or at the rank the truncation rule picks with
    ``tau`` (capped by ``rank`` when both are given). ``max_rank`` and
    ``min_rank`` bound later rank adaptation (``max_rank`` is capped per layer
    at ``min(out, in)``). A layer that shares a parameter with another module
    (a language model's head tied to its token embedding) stays dense, like
    every module of a type without a low-rank twin (embeddings, norms).

    Everything is validated before the model changes: a call that raises
    leaves ``model`` as it was.

    Args:
        model: the model to convert (modified and returned).
        target_modules: which layers to convert, a selector of
            :mod:`dlrt.selection`: a regex matched against the full module
            name, or a list of names (a name also matches as the last
            components, e.g. ``"fc1"`` matches ``"encoder.fc1"``).
            Default: every convertible layer.
        exclude: layers to leave dense, in the same forms; excluding a module
            excludes everything inside it.
        conv: the low-rank format for layer types that have several (a
            registered format name; ``"matrix"``, ``out × in·kh·kw``, for
            convolutions; ``"tucker"``, one rank per kernel mode,
            :class:`~dlrt.TuckerConv2d`). Types without that format use
            ``"matrix"``. For Tucker layers an int ``rank`` caps every mode's
            rank, and ``tau`` truncates every adapted mode's unfolding.
        tucker_modes: with ``conv="tucker"``, the kernel modes whose rank
            adapts (``0`` out, ``1`` in, ``2``/``3`` spatial; default all);
            the others keep the rank they start with.
        init: how each layer starts (:data:`INITS`). ``"svd"`` (default): the
            truncated SVD of the current weight, its best approximation at that
            rank: right for a trained model. ``"scaled"``: the same, with the core
            scaled so that ``‖U S Vᵀ‖_F`` equals the dense weight's ``‖W‖_F``: right
            for training from scratch. A random initial weight spreads its energy
            over all its singular values, so at rank ``r`` of an ``n×m`` layer the
            truncated SVD keeps only about ``√(r/min(n, m))`` of its norm and of its
            output's scale; through several layers the signal (and the gradient)
            shrinks by that factor per layer, and plain SGD hardly moves. Scaled,
            every layer keeps the variance-preserving scale of the initialisation
            the model was built with, at any start rank.

    Raises:
        ValueError: a bad rank (the message names the rank and each layer's
            valid range), ``tau``, ``max_rank``, ``min_rank`` or ``conv``; an
            explicitly selected layer that cannot be converted (a grouped
            convolution, a tied layer); or nothing to convert.
        TypeError: ``target_modules`` names a module whose type has no
            registered low-rank type (the message lists the registered ones).
    """
    _check_arguments(rank, tau, max_rank, min_rank, conv)
    if init not in INITS:
        raise ValueError(f"init={init!r} is not a start of convert; choose one of {INITS}")
    options = {}
    if tucker_modes is not None:
        if conv != "tucker":
            raise ValueError(f"tucker_modes= applies to conv='tucker' only, got conv={conv!r}")
        options["tucker_modes"] = check_tucker_modes(tucker_modes)
    if target_modules is not None:
        check_selector(target_modules, "target_modules")
    exclude = exclude or ()
    check_selector(exclude, "exclude")
    skip = (*lowrank_types(), FactorizedLayer)
    tied = _tied_modules(model)
    chosen = []
    for name, module in model.named_modules():
        if name == "" or isinstance(module, skip) or excluded(name, exclude):
            continue
        if target_modules is not None and not matches(name, target_modules):
            continue
        spec = find_lowrank(module, conv)
        spec, opts = (spec, options) if spec is not None else (find_lowrank(module), {})
        if spec is None:
            if target_modules is not None and not isinstance(target_modules, str):
                raise TypeError(
                    f"target_modules selects {name!r}, a {type(module).__name__}, which has no registered low-rank "
                    f"type; registered: {', '.join(s.describe() for s in registered_lowrank())}. Select its "
                    "layers instead, or register one with dlrt.layers.register_lowrank"
                )
            continue
        reason = spec.unsupported(module)
        if reason is None and name in tied:
            reason = f"tied to {tied[name]!r} (they share a parameter)"
        if reason is not None:
            if target_modules is not None:
                raise ValueError(f"layer {name!r} is {reason}, which {spec.describe()} cannot hold; exclude it")
            continue
        chosen.append((name, module, spec, opts))
    if not chosen:
        raise ValueError(
            "nothing to convert: no layer of a registered type "
            f"({', '.join(s.describe() for s in registered_lowrank())}) matches "
            f"target_modules={target_modules!r} outside exclude={exclude!r}"
        )

    plan, misfits = [], []
    for name, module, spec, opts in chosen:
        shape = spec.matrix_shape(module)
        full = min(shape)
        cap = min(max_rank, full) if max_rank is not None else None
        layer_rank = rank
        if isinstance(rank, float):
            layer_rank = min(max(min_rank, round(rank * full)), cap or full)
        try:
            check_rank(min_rank, shape, what="min_rank", layer=name, max_rank=cap)
            if layer_rank is not None:
                layer_rank = check_rank(layer_rank, shape, layer=name, min_rank=min_rank, max_rank=cap)
        except ValueError:
            lo, hi = rank_range(shape, min_rank=min_rank, max_rank=cap)
            misfits.append((name, shape, lo, hi))
            continue
        plan.append((name, module, spec, layer_rank, cap, opts))
    if misfits:
        what = f"rank={rank}" if min_rank == 1 else f"rank={rank} with min_rank={min_rank}"
        ranges = "; ".join(
            f"{name!r} ({n}×{m}) takes " + (f"{lo} <= rank <= {hi}" if lo <= hi else f"no rank (full rank {hi})")
            for name, (n, m), lo, hi in misfits
        )
        names = tuple(name for name, *_ in misfits)
        raise ValueError(
            f"{what} does not fit {len(misfits)} layer(s): {ranges}. Pass a rank each layer can take, a fraction "
            f"of each layer's full rank (e.g. rank=0.5), or leave those layers dense with exclude={names!r}"
        )

    built = []
    for name, module, spec, layer_rank, cap, opts in plan:
        new = spec.from_dense(module, layer_rank, tau=tau, max_rank=cap, min_rank=min_rank, **opts)
        if init == "scaled":
            _scale_to(new, module.weight.detach())
        new.train(module.training)
        built.append((name, new))
    for name, new in built:
        set_submodule(model, name, new)
    return model


def _tied_modules(model: nn.Module) -> dict[str, str]:
    """Modules that hold a parameter another module holds too (a language model's head tied to its
    embedding), each mapped to the first other holder: a low-rank layer cannot share its weight."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    tied: dict[str, str] = {}
    for names in holders.values():
        for name in names:
            others = [other for other in names if other != name]
            if others:
                tied.setdefault(name, others[0])
    return tied


def _scale_to(layer: FactorizedLayer, weight: Tensor) -> None:
    """Scale ``layer``'s core so that its weight has the Frobenius norm of ``weight`` (``init="scaled"``)."""
    core = layer.core.detach()
    norm = core.norm()  # the bases are orthonormal: ‖U S Vᵀ‖_F = ‖S‖_F (Tucker: ‖C‖_F)
    if norm > 0:
        layer.set_core(core * (weight.norm().to(norm) / norm))


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every low-rank layer by its dense twin (its ``to_dense()``), in place; returns ``model``."""
    kinds = (*lowrank_types(), FactorizedLayer)
    if isinstance(model, kinds):
        raise ValueError("the model itself is a low-rank layer: call model.to_dense() instead")
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    dense = [(name, layer.to_dense()) for name, layer in found]
    for name, module in dense:
        set_submodule(model, name, module)
    return model


def ranks(model: nn.Module) -> dict[str, int | tuple[int, ...]]:
    """Current rank of every low-rank layer, by module name: an int, or a Tucker layer's ranks per mode."""
    return {
        name: layer.ranks if isinstance(layer, TuckerConv2d) else layer.rank for name, layer in lowrank_layers(model)
    }


def mode_ranks(model: nn.Module) -> dict[str, int]:
    """:func:`ranks` with one entry per adapted mode of a Tucker layer (``"conv1/out"``, ``"conv1/in"``, …).

    Every value is an int, so totals, CSV logs and plots treat both formats alike.
    """
    from .layers.tucker import MODE_NAMES

    out: dict[str, int] = {}
    for name, layer in lowrank_layers(model):
        if isinstance(layer, TuckerConv2d):
            out.update({f"{name}/{MODE_NAMES[i]}": layer.ranks[i] for i in layer.tucker_modes})
        else:
            out[name] = layer.rank
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(stored, dense)``: parameters the model stores now, and its dense twin's.

    Every stored parameter counts (U, S, V, biases, layers left dense), as
    dlrt reports compression; parameters shared between modules count once.
    """
    seen: set[int] = set()
    stored = dense = 0
    layer_params = {}
    for _, layer in lowrank_layers(model):
        for p in layer.factor_parameters():
            layer_params[id(p)] = layer
    counted_layers: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        stored += p.numel()
        layer = layer_params.get(id(p))
        if layer is None:
            dense += p.numel()
        elif id(layer) not in counted_layers:
            counted_layers.add(id(layer))
            dense += layer.out_dim * layer.in_dim
    return stored, dense


def compression(model: nn.Module) -> float:
    """``1 − stored / dense`` parameters (see :func:`parameter_counts`); negative when larger than dense."""
    stored, dense = parameter_counts(model)
    return 1.0 - stored / dense if dense else 0.0
