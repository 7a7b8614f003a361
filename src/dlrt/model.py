"""Model-level helpers: convert a dense model, inspect ranks and compression, go back to dense."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from .layers import LowRankConv2d, LowRankLayer, LowRankLinear

__all__ = ["compression", "convert", "lowrank_layers", "parameter_counts", "ranks", "to_dense"]

Selector = str | Sequence[str] | None


def _matches(name: str, selector: str | Sequence[str]) -> bool:
    """A regex (full match on the module name) or a list of names / name suffixes."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def _excluded(name: str, exclude: str | Sequence[str]) -> bool:
    # A module is excluded when it or any module above it matches.
    parts = name.split(".")
    return any(_matches(".".join(parts[: i + 1]), exclude) for i in range(len(parts)))


def lowrank_layers(model: nn.Module) -> Iterator[tuple[str, LowRankLayer]]:
    """``(name, layer)`` for every low-rank layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLayer):
            yield name, module


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(
    model: nn.Module,
    rank: int | float | None = None,
    *,
    tau: float | None = None,
    max_rank: int | None = None,
    min_rank: int = 1,
    target_modules: Selector = None,
    exclude: Selector = (),
    conv: str = "matrix",
) -> nn.Module:
    """Replace ``nn.Linear`` and ``nn.Conv2d`` layers by low-rank layers, in place.

    Each layer starts from the truncated SVD of its current weight: at ``rank``
    (an int, or a float in ``(0, 1]``: that fraction of each layer's full rank
    ``min(out, in)``, at least 1), or at the rank the truncation rule picks with
    ``tau`` (capped by ``rank`` when both are given). ``max_rank`` and ``min_rank`` bound later rank
    adaptation (``max_rank`` is capped per layer at ``min(out, in)``).

    Args:
        model: the model to convert (modified and returned).
        target_modules: which layers to convert: a regex matched against the
            full module name, or a list of names (a name also matches as the
            last components, e.g. ``"fc1"`` matches ``"encoder.fc1"``).
            Default: every ``nn.Linear`` and groups=1 ``nn.Conv2d``.
        exclude: layers to leave dense, in the same forms; excluding a module
            excludes everything inside it.
        conv: conv-kernel format; ``"matrix"`` (``out × in·kh·kw``).

    Raises:
        ValueError: bad ranks, an unknown ``conv`` format, or nothing to convert.
    """
    if conv != "matrix":
        raise ValueError(f"conv={conv!r} is not supported; use conv='matrix'")
    if rank is None and tau is None:
        raise ValueError("convert needs rank=, tau= or both")
    fraction = isinstance(rank, float)
    if fraction and not 0.0 < rank <= 1.0:
        raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
    if rank is not None and not fraction and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or a fraction in (0, 1], got {rank!r}")
    if tau is not None and tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    exclude = exclude or ()
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or isinstance(module, LowRankLayer):
            continue
        if name == "" or _excluded(name, exclude):
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            if target_modules is not None:
                raise ValueError(f"layer {name!r} is a grouped convolution (groups={module.groups}); exclude it")
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            "nothing to convert: no nn.Linear or nn.Conv2d matches "
            f"target_modules={target_modules!r} outside exclude={exclude!r}"
        )
    for name, module in chosen:
        weight = module.weight
        n, m = weight.shape[0], weight[0].numel()
        full = min(n, m)
        layer_rank = max(1, round(rank * full)) if fraction else rank
        if layer_rank is not None and layer_rank > full:
            raise ValueError(
                f"rank={rank} is too large for layer {name!r} ({n}×{m}, full rank {full}): "
                f"pass exclude=({name!r},) or a rank <= {full}"
            )
        cap = min(max_rank, full) if max_rank is not None else None
        if cap is not None and layer_rank is not None and layer_rank > cap:
            if fraction:
                layer_rank = cap
            else:
                raise ValueError(f"rank={rank} exceeds max_rank={max_rank}")
        if min_rank > full:
            raise ValueError(f"min_rank={min_rank} is too large for layer {name!r} (full rank {full})")
        factory = LowRankLinear.from_linear if isinstance(module, nn.Linear) else LowRankConv2d.from_conv
        new = factory(module, layer_rank, tau=tau, max_rank=cap, min_rank=min_rank)
        new.train(module.training)
        _set_child(model, name, new)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every low-rank layer by its dense twin, in place; returns ``model``."""
    for name, layer in list(lowrank_layers(model)):
        if name == "":
            raise ValueError("the model itself is a low-rank layer: call model.to_dense() instead")
        _set_child(model, name, layer.to_dense())
    return model


def ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of every low-rank layer, by module name."""
    return {name: layer.rank for name, layer in lowrank_layers(model)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(stored, dense)``: parameters the model stores now, and its dense twin's.

    Every stored parameter counts (U, S, V, biases, layers left dense), as
    dlrt reports compression; parameters shared between modules count once.
    """
    seen: set[int] = set()
    stored = dense = 0
    layer_params = {}
    for _, layer in lowrank_layers(model):
        for p in (layer.U, layer.S, layer.V):
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
