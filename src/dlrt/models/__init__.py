"""Model zoo: the networks of the DLRT experiments, dense and ready for :func:`dlrt.convert`.

Build one by name and convert it, leaving the classifier dense::

    from dlrt.models import default_exclude, get_model
    model = get_model("lenet5")
    dlrt.convert(model, rank=8, exclude=default_exclude(model, rank=8))

``import dlrt`` does not import this package; ``import dlrt.models`` does.

Every model names its last layer ``head`` and carries ``input_shape``, the
shape of one example (28×28 MNIST for ``mlp``, ``lenet5`` and ``vgg_small``,
32×32 CIFAR for ``vgg11``, ``vgg16`` and ``resnet20``; ``(context,)`` token
ids for the language models).

Two kinds of model are registered (:func:`list_models` takes the kind):
``"classifier"`` (image classifiers, built with ``num_classes``) and
``"language"``: the decoder-only transformers ``gpt-tiny`` (3.3 M parameters,
trains on a laptop CPU), ``gpt-small`` (25 M), ``gpt-medium`` (100 M) and
``gpt-large`` (304 M) of :mod:`dlrt.models.gpt`, whose head shares the token
embedding's weight (and which :func:`dlrt.convert` therefore leaves dense).

Pretrained networks (not in the registry) come from :mod:`dlrt.models.pretrained`:
:func:`load_pretrained_mnist_cnn` (a 99 % MNIST CNN, :class:`MnistCNN`),
:func:`load_minilm` (MiniLM-L6 with its tokenizer) and :func:`tiny_bert`
(a tiny random BERT for tests); the last two need ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..layers.registry import find_lowrank
from .gpt import GPT, GPT_SIZES, GPTConfig
from .lenet import LeNet5
from .mlp import MLP
from .pretrained import (
    MNIST_CNN_MEAN,
    MNIST_CNN_STD,
    MeanPoolClassifier,
    MnistCNN,
    load_minilm,
    load_pretrained_mnist_cnn,
    tiny_bert,
)
from .resnet import ResNet20
from .vgg import VGG, SmallVGG

__all__ = [
    "GPT",
    "GPT_SIZES",
    "MLP",
    "MNIST_CNN_MEAN",
    "MNIST_CNN_STD",
    "MODEL_KINDS",
    "VGG",
    "GPTConfig",
    "LeNet5",
    "MeanPoolClassifier",
    "MnistCNN",
    "ResNet20",
    "SmallVGG",
    "default_exclude",
    "get_model",
    "list_models",
    "load_minilm",
    "load_pretrained_mnist_cnn",
    "model_kind",
    "register_model",
    "tiny_bert",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_KINDS: dict[str, str] = {}

#: The kinds of registered model: image classifiers and (next-token) language models.
MODEL_KINDS = ("classifier", "language")


def register_model(name: str, builder: Callable[..., nn.Module], *, kind: str = "classifier") -> None:
    """Make ``builder(**kw)`` available as ``get_model(name, **kw)``.

    Args:
        name: the registry name (case-insensitive).
        builder: builds the dense model.
        kind: ``"classifier"`` (``builder`` takes ``num_classes``) or ``"language"``
            (it maps ``(batch, time)`` token ids to ``(batch, time, vocab)`` logits).

    Raises:
        ValueError: ``name`` is already registered, or an unknown ``kind``.
    """
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(MODEL_KINDS)}")
    _REGISTRY[key] = builder
    _KINDS[key] = kind


def list_models(kind: str | None = None) -> list[str]:
    """Names accepted by :func:`get_model`, sorted; with ``kind``, those of that kind only."""
    if kind is not None and kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(MODEL_KINDS)}")
    return sorted(name for name in _REGISTRY if kind is None or _KINDS.get(name, "classifier") == kind)


def model_kind(name: str) -> str:
    """The kind (``"classifier"`` or ``"language"``) of the model registered as ``name``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _KINDS.get(key, "classifier")


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the dense model registered as ``name`` (case-insensitive).

    Args:
        name: one of :func:`list_models`: ``"lenet5"``, ``"mlp"``,
            ``"resnet20"``, ``"vgg11"``, ``"vgg16"``, ``"vgg_small"``;
            ``"gpt-tiny"``, ``"gpt-small"``, ``"gpt-medium"``, ``"gpt-large"``.
        **kwargs: passed to the model's constructor (e.g. ``num_classes``;
            a :class:`GPTConfig` field such as ``context`` for the GPTs).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    builder = _REGISTRY.get(str(name).lower())
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return builder(**kwargs)


def default_exclude(model: nn.Module, rank: int | None = None, head: str = "head") -> tuple[str, ...]:
    """Names of the layers to leave dense when converting ``model`` at ``rank``.

    That is the classifier ``head`` plus, when ``rank`` is given, every
    layer of a registered type (:func:`dlrt.layers.register_lowrank`) too
    small for it (full rank ``min(out, in·kh·kw) < rank``), for which
    :func:`dlrt.convert` would raise. Pass the result as ``dlrt.convert(model, rank=rank, exclude=...)``.

    Args:
        model: a dense model.
        rank: the starting rank for :func:`dlrt.convert`, or None to exclude
            only ``head``.
        head: name of the classifier to keep dense ("", or a name the model
            lacks, keeps none).

    Returns:
        Full module names (``convert`` also matches them as name suffixes,
        so the zoo's models give their top-level layers names that are not
        suffixes of nested ones).

    Raises:
        ValueError: ``rank`` is not a positive int, or it exceeds the full
            rank of every layer (the message lists each layer's range).
    """
    modules = dict(model.named_modules())
    names = [head] if head and head in modules else []
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got rank={rank!r}")
        layers = []
        for name, m in modules.items():
            spec = find_lowrank(m)
            if spec is None or name in names or not name:
                continue
            shape = spec.matrix_shape(m)
            layers.append((name, shape))
            if min(shape) < rank:
                names.append(name)
        if layers and all(min(shape) < rank for _, shape in layers):
            # Leaving every layer dense would only move the error to convert's "nothing to convert".
            ranges = "; ".join(f"{name!r} ({n}×{m}) takes 1 <= rank <= {min(n, m)}" for name, (n, m) in layers)
            raise ValueError(
                f"rank={rank} fits no layer of {type(model).__name__}: {ranges}. "
                f"Pass a rank <= {max(min(shape) for _, shape in layers)} or a fraction such as rank=0.5"
            )
    return tuple(names)


register_model("mlp", MLP)
register_model("lenet5", LeNet5)
register_model("vgg11", lambda **kw: VGG(depth=11, **kw))
register_model("vgg16", lambda **kw: VGG(depth=16, **kw))
register_model("vgg_small", SmallVGG)
register_model("resnet20", ResNet20)
for _size, _config in GPT_SIZES.items():
    register_model(f"gpt-{_size}", lambda _config=_config, **kw: GPT(_config, **kw), kind="language")
