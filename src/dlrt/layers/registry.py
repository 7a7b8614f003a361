"""Which low-rank layer replaces which dense module: the one place that maps layer types.

:func:`dlrt.convert`, :func:`dlrt.to_dense`, :class:`~dlrt.layers.LowRankAdapter`
and :mod:`dlrt.peft` look dense modules up here instead of testing for
``nn.Linear`` / ``nn.Conv2d`` themselves, so a new format plugs in with one call::

    dlrt.layers.register_lowrank(MyDense, MyLowRank)                 # MyLowRank.from_dense / .to_dense
    dlrt.layers.register_lowrank(nn.Conv2d, TuckerConv2d, format="tucker")

A dense type may have several low-rank formats (``"matrix"`` is the default;
``dlrt.convert(conv=...)`` picks another where one is registered). Lookups
follow the class hierarchy: a subclass of ``nn.Linear`` is converted like
``nn.Linear`` unless it has an entry of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .conv import LowRankConv2d
from .linear import LowRankLinear
from .tucker import TuckerConv2d

__all__ = [
    "LowRankSpec",
    "dense_types",
    "find_lowrank",
    "lowrank_formats",
    "lowrank_spec",
    "lowrank_types",
    "register_lowrank",
    "registered_lowrank",
    "unregister_lowrank",
]

DEFAULT_FORMAT = "matrix"


@dataclass(frozen=True)
class LowRankSpec:
    """How one dense module type becomes a low-rank layer of one format, and back.

    Attributes:
        dense_type: the dense module type (``nn.Linear``).
        lowrank_type: the low-rank layer type (``LowRankLinear``); its
            instances have ``to_dense()``, returning a dense module with the
            same function.
        format: the name of the format (``"matrix"``).
        from_dense: ``from_dense(module, rank=None, *, tau=None, max_rank=None,
            min_rank=1)``: a low-rank layer factorizing ``module``'s weight.
        like: ``like(module, rank, *, bias=False, max_rank=None, min_rank=1)``:
            a freshly initialised low-rank layer with ``module``'s geometry,
            device and dtype (what an adapter adds to ``module``); None when
            the format does not support adapters.
        matrix_shape: ``matrix_shape(module)``: ``(n, m)`` of the weight
            matrix whose rank the layer holds (ranks are checked against it).
        unsupported: ``unsupported(module)``: why this instance cannot be
            converted (``"a grouped convolution (groups=2)"``), or None.
    """

    dense_type: type[nn.Module]
    lowrank_type: type[nn.Module]
    format: str
    from_dense: Callable[..., nn.Module]
    like: Callable[..., nn.Module] | None
    matrix_shape: Callable[[nn.Module], tuple[int, int]]
    unsupported: Callable[[nn.Module], str | None]

    def describe(self) -> str:
        return f"{_type_name(self.dense_type)} → {_type_name(self.lowrank_type)} ({self.format})"


_REGISTRY: dict[tuple[type[nn.Module], str], LowRankSpec] = {}


def _type_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn"):
        module = "nn"
    elif module.startswith("dlrt."):
        module = "dlrt"
    return f"{module}.{cls.__qualname__}"


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in·kh·kw…)``: the weight of ``module`` flattened to a matrix by its first dimension."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() < 2:
        raise TypeError(f"{type(module).__name__} has no weight matrix; register matrix_shape= for it")
    return int(weight.shape[0]), int(weight[0].numel())


def register_lowrank(
    dense_type: type[nn.Module],
    lowrank_type: type[nn.Module],
    *,
    format: str = DEFAULT_FORMAT,
    from_dense: Callable[..., nn.Module] | None = None,
    like: Callable[..., nn.Module] | None = None,
    matrix_shape: Callable[[nn.Module], tuple[int, int]] | None = None,
    unsupported: Callable[[nn.Module], str | None] | None = None,
    replace: bool = False,
) -> LowRankSpec:
    """Register ``lowrank_type`` as the low-rank form ``format`` of ``dense_type``.

    Args:
        dense_type: the dense module type (subclasses are found through it).
        lowrank_type: the low-rank module type; it must define ``to_dense()``.
        format: the format name, for types with several (``dlrt.convert(conv=)``).
        from_dense: the constructor from a dense module (see
            :class:`LowRankSpec`); default ``lowrank_type.from_dense``.
        like: the constructor of a fresh layer with a module's geometry;
            default ``lowrank_type.like`` if it exists (needed for adapters).
        matrix_shape: the rank-bearing matrix shape of a dense module;
            default: the weight flattened by its first dimension.
        unsupported: why an instance cannot be converted, or None (default:
            every instance can).
        replace: allow replacing an existing entry for ``(dense_type, format)``.

    Returns:
        The new entry.

    Raises:
        TypeError: a type is not an ``nn.Module`` subclass, or a constructor is missing.
        ValueError: ``(dense_type, format)`` is registered already and ``replace`` is False.
    """
    for what, cls in (("dense_type", dense_type), ("lowrank_type", lowrank_type)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{what} must be an nn.Module subclass, got {cls!r}")
    if not isinstance(format, str) or not format:
        raise ValueError(f"format must be a non-empty string, got {format!r}")
    if not callable(getattr(lowrank_type, "to_dense", None)):
        raise TypeError(f"{lowrank_type.__name__} has no to_dense() method: dlrt.to_dense could not convert it back")
    if from_dense is None:
        from_dense = getattr(lowrank_type, "from_dense", None)
        if not callable(from_dense):
            raise TypeError(
                f"{lowrank_type.__name__} has no from_dense classmethod: define one or pass from_dense= "
                "(module, rank=None, *, tau=None, max_rank=None, min_rank=1) -> layer"
            )
    if like is None:
        like = getattr(lowrank_type, "like", None)
    key = (dense_type, format)
    if key in _REGISTRY and not replace:
        raise ValueError(
            f"{_type_name(dense_type)} already has a {format!r} low-rank type "
            f"({_type_name(_REGISTRY[key].lowrank_type)}); pass replace=True to replace it"
        )
    spec = LowRankSpec(
        dense_type=dense_type,
        lowrank_type=lowrank_type,
        format=format,
        from_dense=from_dense,
        like=like,
        matrix_shape=matrix_shape or weight_matrix_shape,
        unsupported=unsupported or (lambda module: None),
    )
    _REGISTRY[key] = spec
    return spec


def unregister_lowrank(dense_type: type[nn.Module], format: str = DEFAULT_FORMAT) -> LowRankSpec:
    """Remove and return the entry for ``(dense_type, format)``.

    Raises:
        KeyError: there is none.
    """
    try:
        return _REGISTRY.pop((dense_type, format))
    except KeyError:
        raise KeyError(f"no {format!r} low-rank type is registered for {_type_name(dense_type)}") from None


def registered_lowrank() -> list[LowRankSpec]:
    """Every registered entry, in registration order."""
    return list(_REGISTRY.values())


def dense_types() -> tuple[type[nn.Module], ...]:
    """The registered dense types (for ``isinstance``)."""
    return tuple(dict.fromkeys(dense for dense, _ in _REGISTRY))


def lowrank_types() -> tuple[type[nn.Module], ...]:
    """The registered low-rank types (for ``isinstance``)."""
    return tuple(dict.fromkeys(spec.lowrank_type for spec in _REGISTRY.values()))


def lowrank_formats() -> list[str]:
    """The registered format names, sorted."""
    return sorted({fmt for _, fmt in _REGISTRY})


def find_lowrank(module: nn.Module | type[nn.Module], format: str = DEFAULT_FORMAT) -> LowRankSpec | None:
    """The entry for ``module`` (an instance or a type) in ``format``, or None.

    The most specific registered class of the module's hierarchy wins.
    """
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        spec = _REGISTRY.get((base, format))
        if spec is not None:
            return spec
    return None


def lowrank_spec(module: nn.Module | type[nn.Module], format: str = DEFAULT_FORMAT) -> LowRankSpec:
    """As :func:`find_lowrank`, but a module without an entry is an error.

    Raises:
        TypeError: no low-rank type of ``format`` is registered for the
            module's type; the message lists the registered ones.
    """
    spec = find_lowrank(module, format)
    if spec is None:
        cls = module if isinstance(module, type) else type(module)
        raise TypeError(
            f"no {format!r} low-rank type is registered for {_type_name(cls)}; registered: "
            f"{', '.join(s.describe() for s in _REGISTRY.values()) or 'none'}. "
            "Register one with dlrt.layers.register_lowrank(dense_type, lowrank_type)"
        )
    return spec


# ------------------------------------------------------------------ built-ins
def _conv_unsupported(conv: Any) -> str | None:
    return f"a grouped convolution (groups={conv.groups})" if conv.groups != 1 else None


register_lowrank(nn.Linear, LowRankLinear, from_dense=LowRankLinear.from_linear, like=LowRankLinear.like)
register_lowrank(
    nn.Conv2d, LowRankConv2d, from_dense=LowRankConv2d.from_conv, like=LowRankConv2d.like, unsupported=_conv_unsupported
)


def _tucker_from_conv(conv: Any, rank: Any = None, *, tau: Any = None, **kw: Any) -> TuckerConv2d:
    return TuckerConv2d.from_conv(conv, ranks=rank, tau=tau, **kw)


register_lowrank(nn.Conv2d, TuckerConv2d, format="tucker", from_dense=_tucker_from_conv, unsupported=_conv_unsupported)
