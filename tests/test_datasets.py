"""``dlrt.data`` datasets: Fashion-MNIST / MNIST idx files, CIFAR-10 python batches, digits, the registry."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dlrt.data import (
    CIFAR10,
    DATASETS,
    MNIST,
    Digits,
    FashionMNIST,
    dataset_info,
    get_dataset,
    random_crop_flip,
    standardized_dataset,
)
from dlrt.data import datasets as ds_mod
from dlrt.data.mnist import IDX_FILES, UnsafePickleError

FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------- helpers
def write_idx(root: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = True, seed: int = 0) -> torch.Tensor:
    """The four idx files with random pixels and labels ``i % 10``; returns the train pixels (uint8)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = None
    for split, n in (("train", n_train), ("test", n_test)):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        out = pixels if split == "train" else out
        images_name, labels_name = IDX_FILES[split]
        for name, blob in (
            (images_name, struct.pack(">4I", 0x803, n, 28, 28) + pixels.numpy().tobytes()),
            (labels_name, struct.pack(">2I", 0x801, n) + labels.numpy().tobytes()),
        ):
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(blob, compresslevel=1))
            else:
                (root / name).write_bytes(blob)
    return out


def cifar_pixels(n: int, rng: np.random.Generator, *, realistic: bool = False) -> np.ndarray:
    """``(n, 3072)`` uint8 pixels, channel-major like the real files; ``realistic``: per-channel CIFAR statistics."""
    if not realistic:
        return rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    mean = np.repeat(np.array(CIFAR10.MEAN), 1024) * 255
    std = np.repeat(np.array(CIFAR10.STD), 1024) * 255
    return np.clip(np.rint(rng.normal(mean, std, (n, 3072))), 0, 255).astype(np.uint8)


def write_cifar(
    root: Path, n: int = 6, *, seed: int = 0, realistic: bool = False, data_as_bytes: bool = False
) -> dict[str, np.ndarray]:
    """A ``cifar-10-batches-py``-like folder (protocol-2 pickles of dicts with bytes keys); returns the pixels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        data = cifar_pixels(n, rng, realistic=realistic)
        written[name] = data
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": data.tobytes() if data_as_bytes else data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in CIFAR10.CLASSES], b"num_cases_per_batch": n, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def py2_pickle(d: dict[str, object]) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle writes it (``str`` as BINSTRING), like the real CIFAR files."""

    def s(x: bytes) -> bytes:
        return b"U" + bytes([len(x)]) + x if len(x) < 256 else b"T" + struct.pack("<I", len(x)) + x

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    def obj(v: object) -> bytes:
        if isinstance(v, str):
            return s(v.encode("latin1"))
        if isinstance(v, int):
            return i(v)
        if isinstance(v, list):
            return b"](" + b"".join(obj(x) for x in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
            b"(" + i(1) + i(v.shape[0]) + i(v.shape[1]) + b"\x86"
            b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0)
            + b"tb\x89" + s(v.tobytes()) + b"tb"
        )  # fmt: skip

    return b"\x80\x02}(" + b"".join(obj(k) + obj(v) for k, v in d.items()) + b"u."


# --------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path: Path, gz: bool) -> None:
    raw = write_idx(tmp_path, n_train=12, n_test=5, gz=gz)
    ds = FashionMNIST("train", root=tmp_path, normalize=False)
    assert len(ds) == 12 and ds.data.shape == (12, 1, 28, 28) and ds.data.dtype == torch.float32
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [i % 10 for i in range(12)]
    torch.testing.assert_close(ds.data[:, 0], raw.float() / 255)
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == 3
    test = FashionMNIST("test", root=str(tmp_path))
    assert len(test) == 5 and test.classes[9] == "Ankle boot"


def test_fashion_mnist_normalisation_and_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx(tmp_path / "fashion-mnist")
    raw = FashionMNIST("train", root=tmp_path, normalize=False)  # parent of fashion-mnist/
    norm = FashionMNIST("train", root=tmp_path)
    torch.testing.assert_close(norm.data, (raw.data - 0.2860) / 0.3530)
    monkeypatch.setenv("DLRT_FASHION_MNIST_DIR", str(tmp_path / "fashion-mnist"))
    torch.testing.assert_close(FashionMNIST("train").data, norm.data)
    norm.data.add_(1.0)  # datasets own their tensors: the cache is untouched
    torch.testing.assert_close(FashionMNIST("train", root=tmp_path, normalize=False).data, raw.data)


def test_fashion_mnist_dataloader_batches(tmp_path: Path) -> None:
    write_idx(tmp_path)
    x, y = next(iter(DataLoader(get_dataset("fashion-mnist", "train", root=tmp_path), batch_size=4)))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_fashion_mnist_truncated_is_value_error(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        FashionMNIST("train", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        FashionMNIST("test", root=tmp_path)


def test_fashion_mnist_missing_is_one_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST("train", root=tmp_path)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "DLRT_FASHION_MNIST_DIR" in msg and str(tmp_path) in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    monkeypatch.setenv("DLRT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$DLRT_FASHION_MNIST_DIR.*apt-get install"):
        FashionMNIST("test")
    monkeypatch.delenv("DLRT_FASHION_MNIST_DIR")
    monkeypatch.setattr(ds_mod, "_fashion_default_dirs", lambda: [tmp_path / "share" / "datasets" / "fashion-mnist"])
    with pytest.raises(FileNotFoundError, match="default locations.*apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist")


def test_fashion_default_dirs_follow_the_debian_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_DIRS", "/opt/x/share:/usr/share/")
    assert ds_mod._fashion_default_dirs() == [
        Path("/opt/x/share/datasets/fashion-mnist"),
        Path("/usr/share/datasets/fashion-mnist"),
        Path("/usr/local/share/datasets/fashion-mnist"),
    ]


@pytest.mark.skipif(
    not (FASHION_DEB_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLRT_FASHION_MNIST_DIR", raising=False)
    ds = FashionMNIST("test")  # the 10 000 test images: fast, and their statistics match the train set's
    assert ds.data.shape == (10_000, 1, 28, 28) and ds.targets.bincount().tolist() == [1000] * 10
    assert abs(float(ds.data.mean())) < 0.01 and abs(float(ds.data.std()) - 1.0) < 0.01


# ----------------------------------------------------------------------- MNIST
def test_mnist_from_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_idx(tmp_path / "MNIST" / "raw", n_train=7, n_test=3)
    ds = MNIST("train", root=tmp_path)
    torch.testing.assert_close(ds.data[:, 0], (raw.float() / 255 - 0.1307) / 0.3081)
    assert ds[0][0].shape == (1, 28, 28) and ds.targets.dtype == torch.int64
    monkeypatch.setenv("DLRT_MNIST_DIR", str(tmp_path / "MNIST" / "raw"))
    assert len(MNIST("test")) == 3
    with pytest.raises(FileNotFoundError, match="DLRT_MNIST_DIR") as info:
        MNIST("train", root=tmp_path / "empty")
    assert info.value.__cause__ is None


# --------------------------------------------------------------------- CIFAR10
@pytest.mark.parametrize("data_as_bytes", [False, True])
def test_cifar10_shapes_dtypes_labels(tmp_path: Path, data_as_bytes: bool) -> None:
    pixels = write_cifar(tmp_path / "cifar-10-batches-py", n=6, data_as_bytes=data_as_bytes)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = CIFAR10("train", root=root, normalize=False)
        assert train.data.shape == (30, 3, 32, 32) and train.data.dtype == torch.float32
        assert train.targets.shape == (30,) and train.targets.dtype == torch.int64
        assert 0 <= int(train.targets.min()) and int(train.targets.max()) <= 9
    expected = np.concatenate([pixels[f"data_batch_{i}"] for i in range(1, 6)]).reshape(30, 3, 32, 32)
    torch.testing.assert_close(train.data, torch.from_numpy(expected).float() / 255)
    test = CIFAR10("test", root=tmp_path)
    assert len(test) == 6 and test.classes == CIFAR10.CLASSES
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar10_python2_pickles_like_the_real_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = {name: cifar_pixels(4, rng) for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")}
    for name, pixels in data.items():
        batch = {"batch_label": name, "labels": [1, 2, 3, 9], "data": pixels, "filenames": ["a", "b", "c", "d"]}
        (tmp_path / name).write_bytes(py2_pickle(batch))
    (tmp_path / "batches.meta").write_bytes(py2_pickle({"label_names": list(CIFAR10.CLASSES), "num_vis": 3072}))
    ds = CIFAR10("test", root=tmp_path, normalize=False)
    torch.testing.assert_close(ds.data, torch.from_numpy(data["test_batch"]).reshape(4, 3, 32, 32).float() / 255)
    assert ds.targets.tolist() == [1, 2, 3, 9] and ds.classes[0] == "airplane"


def test_cifar10_normalisation_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, n=64, realistic=True)
    monkeypatch.setenv("DLRT_CIFAR10_DIR", str(tmp_path))
    ds = get_dataset("cifar10", "test")
    mean, std = ds.data.mean(dim=(0, 2, 3)), ds.data.std(dim=(0, 2, 3))
    assert torch.all(mean.abs() < 0.05), mean
    assert torch.all((std - 1).abs() < 0.1), std
    raw = CIFAR10("test", root=tmp_path, normalize=False)
    torch.testing.assert_close(
        ds.data, (raw.data - torch.tensor(CIFAR10.MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10.STD).view(3, 1, 1)
    )


def test_cifar10_augmentation(tmp_path: Path) -> None:
    write_cifar(tmp_path, n=8)
    plain = CIFAR10("test", root=tmp_path)
    a = CIFAR10("test", root=tmp_path, augment=True, seed=3)
    b = CIFAR10("test", root=tmp_path, augment=True, generator=torch.Generator().manual_seed(3))
    items_a = [a[i][0] for i in range(8)]
    for i, x in enumerate(items_a):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x, b[i][0])  # deterministic under a seed
        assert a[i][1] == plain[i][1]
    assert sum(not torch.equal(x, plain[i][0]) for i, x in enumerate(items_a)) >= 6  # it changes images
    torch.testing.assert_close(a.data, plain.data)  # .data is never augmented
    # Each augmented image is a 32×32 window of the image padded with 4 black pixels, maybe mirrored.
    black = (-torch.tensor(CIFAR10.MEAN) / torch.tensor(CIFAR10.STD)).view(3, 1, 1)
    padded = black.expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = plain.data[0]
    windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(items_a[0], w) or torch.equal(items_a[0], w.flip(-1)) for w in windows)
    # Over many draws, every offset and both flips happen.
    g = torch.Generator().manual_seed(0)
    img = torch.arange(3 * 4 * 4, dtype=torch.float32).view(3, 4, 4)
    seen = {tuple(random_crop_flip(img, g, padding=1).flatten().tolist()) for _ in range(400)}
    assert len(seen) == 18


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),
        (lambda b: b[:40], "truncated or corrupt"),
        (lambda b: b"\x80\x02" + bytes(range(256)) * 4, "truncated or corrupt"),
        (lambda b: b"not a pickle at all", "truncated or corrupt"),
        (lambda b: pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        (lambda b: pickle.dumps({b"labels": [1]}, protocol=2), "no 'data'"),
        (lambda b: pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}, 2), r"\(N, 3072\)"),
        (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, 2), "uint8"),
        (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, 2), "labels"),
        (lambda b: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, 2), "outside 0..9"),
        (lambda b: pickle.dumps({b"data": b"\x00" * 3000, b"labels": [1]}, 2), "multiple of 3072"),
    ],
)
def test_cifar10_corrupt_batch_is_value_error_naming_the_file(tmp_path: Path, corrupt, pattern: str) -> None:
    write_cifar(tmp_path, n=2)
    path = tmp_path / "data_batch_3"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=pattern) as info:
        CIFAR10("train", root=tmp_path)
    assert "data_batch_3" in str(info.value)


def test_cifar10_refuses_unsafe_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path, n=2)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": os.system}, protocol=2))
    with pytest.raises(UnsafePickleError, match="test_batch.*posix.system|test_batch.*os.system"):
        CIFAR10("test", root=tmp_path)


def test_cifar10_missing_is_one_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, n=2)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10("train", root=tmp_path)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "DLRT_CIFAR10_DIR" in msg and "data_batch_5" in msg
    assert info.value.__cause__ is None
    assert len(CIFAR10("test", root=tmp_path)) == 2  # the test split is complete
    monkeypatch.setenv("DLRT_CIFAR10_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$DLRT_CIFAR10_DIR"):
        get_dataset("cifar10", "test")


# ---------------------------------------------------------------------- Digits
def test_digits_split_and_shapes() -> None:
    pytest.importorskip("sklearn")
    train, test = Digits("train"), Digits("test", seed=0)
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert train.data.shape[1:] == (1, 8, 8) and train.data.dtype == torch.float32 and test.targets.dtype == torch.int64
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert abs(float(train.data.mean())) < 1e-4 and abs(float(train.data.std()) - 1) < 1e-3
    torch.testing.assert_close(Digits("test").data, test.data)  # seeded
    assert not torch.equal(Digits("test", seed=1).indices, test.indices)
    raw = Digits("train", normalize=False, test_fraction=0.5)
    assert len(raw) == 1797 - round(1797 * 0.5) and 0.0 <= float(raw.data.min()) and float(raw.data.max()) == 1.0
    with pytest.raises(ValueError, match="test_fraction"):
        Digits("train", test_fraction=1.0)


def test_digits_without_sklearn_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        get_dataset("digits")


# -------------------------------------------------------------------- registry
def test_registry_names_and_info() -> None:
    assert list(DATASETS) == ["mnist", "fashion-mnist", "cifar10", "digits"]
    expected = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (1, 8, 8)}
    for name, shape in expected.items():
        info = dataset_info(name)
        assert info.input_shape == shape and info.num_classes == 10 and info.name == name
    assert dataset_info("CIFAR-10").input_size == 3072 and dataset_info("fashion_mnist").mean == (0.2860,)
    for bad in (lambda: get_dataset("imagenet"), lambda: dataset_info("imagenet")):
        with pytest.raises(ValueError, match="imagenet.*mnist, fashion-mnist, cifar10, digits"):
            bad()
    with pytest.raises(ValueError, match="split"):
        get_dataset("fashion-mnist", "valid")
    with pytest.raises(ValueError, match="no root"):
        get_dataset("digits", root="/tmp")


@pytest.mark.skipif(importlib.util.find_spec("dlrt") is None, reason="dlrt not importable in a subprocess")
def test_import_dlrt_does_not_import_data() -> None:
    code = "import sys, dlrt; assert 'dlrt.data' not in sys.modules, sorted(m for m in sys.modules if 'dlrt' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_standardized_dataset_uses_the_given_constants(tmp_path: Path) -> None:
    raw = write_idx(tmp_path)
    ds = standardized_dataset("fashion-mnist", "train", tmp_path, mean=(0.5,), std=(0.25,), input_shape=(1, 28, 28))
    torch.testing.assert_close(ds.data[:, 0], (raw.float() / 255 - 0.5) / 0.25)
    assert ds.normalize and (ds.MEAN, ds.STD) == ((0.5,), (0.25,))
    assert FashionMNIST.MEAN == (0.2860,)  # the class keeps its own constants
    fresh = FashionMNIST("train", root=tmp_path, normalize=False)  # the shared cache is untouched
    torch.testing.assert_close(fresh.data[:, 0], raw.float() / 255)
    for kwargs, message in [
        ({"mean": (0.5,), "std": (0.0,)}, "std positive and finite"),
        ({"mean": (float("nan"),), "std": (1.0,)}, "mean must be finite"),
        ({"mean": (0.5, 0.5), "std": (1.0,)}, "mean has 2 values; 'fashion-mnist' has 1 channel"),
        ({"mean": (0.5,), "std": (1.0,), "input_shape": (3, 32, 32)}, r"has \(1, 28, 28\) images, \(3, 32, 32\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            standardized_dataset("fashion-mnist", "train", tmp_path, **kwargs)
