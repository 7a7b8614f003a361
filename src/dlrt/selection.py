"""Choosing modules of a model by name, and swapping one for another.

:func:`dlrt.convert` and :mod:`dlrt.peft` select the layers they act on the
same way, with these functions; use them to preview a selection::

    from dlrt.selection import select
    [name for name, _ in select(model, include=["fc1", "fc2"], exclude=("head",))]

A *selector* is either

* a string: a regular expression that must match the **whole** module name
  (``r"encoder\\..*"`` selects everything below ``encoder``), or
* a sequence of strings: module names, each also matching as the last
  components of a longer name (``"fc1"`` selects ``"encoder.fc1"``, not
  ``"encoder.xfc1"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["Selector", "check_selector", "excluded", "matches", "select", "set_submodule"]

Selector = str | Sequence[str]


def check_selector(selector: object, what: str = "selector") -> None:
    """Raise a clear error unless ``selector`` is a valid regex string or a sequence of name strings.

    Args:
        selector: the value to check.
        what: the parameter name for the message (``"target_modules"`` …).

    Raises:
        ValueError: a string that is not a valid regular expression.
        TypeError: anything else than a string or a sequence of strings.
    """
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as err:
            raise ValueError(f"{what}={selector!r} is not a valid regular expression: {err}") from None
        return
    if not isinstance(selector, Sequence) or not all(isinstance(s, str) for s in selector):
        raise TypeError(
            f"{what} must be a regex string or a list of module names, got {selector!r} ({type(selector).__name__})"
        )


def matches(name: str, selector: Selector) -> bool:
    """Whether the module called ``name`` is selected by ``selector``.

    Args:
        name: a full module name as ``model.named_modules()`` gives it.
        selector: a regex (full match) or a sequence of names / name suffixes.
    """
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def excluded(name: str, exclude: Selector) -> bool:
    """Whether ``name`` or any module above it (``"a"`` and ``"a.b"`` for ``"a.b.c"``) matches ``exclude``.

    Excluding a module thus excludes everything inside it.
    """
    parts = name.split(".")
    return any(matches(".".join(parts[: i + 1]), exclude) for i in range(len(parts)))


def select(
    model: nn.Module,
    include: Selector | None = None,
    exclude: Selector | None = (),
    types: type | tuple[type, ...] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule of ``model`` (not the model itself) that is chosen.

    A module is chosen when it matches ``include`` (every module when None),
    is not :func:`excluded` by ``exclude``, and is an instance of ``types``
    (when given), in ``model.named_modules()`` order.

    Raises:
        TypeError, ValueError: an invalid selector (see :func:`check_selector`).
    """
    if include is not None:
        check_selector(include, "include")
    exclude = exclude or ()
    check_selector(exclude, "exclude")
    for name, module in model.named_modules():
        if name == "" or (types is not None and not isinstance(module, types)):
            continue
        if excluded(name, exclude) or (include is not None and not matches(name, include)):
            continue
        yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule ``name`` (dotted, as ``named_modules()`` spells it).

    Raises:
        ValueError: ``name`` is empty (the model cannot replace itself).
        AttributeError: ``model`` has no submodule ``name``.
    """
    if not name:
        raise ValueError("set_submodule needs a submodule name; the model itself cannot be replaced in place")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}")
    setattr(parent, child, module)
