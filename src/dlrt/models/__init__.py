"""Model zoo: the networks of the DLRT experiments, dense and ready for :func:`dlrt.convert`.

Build one by name and convert it, leaving the classifier dense::

    from dlrt.models import default_exclude, get_model
    model = get_model("lenet5")
    dlrt.convert(model, rank=8, exclude=default_exclude(model, rank=8))

``import dlrt`` does not import this package; ``import dlrt.models`` does.

Every model names its last layer ``head`` and carries ``input_shape``, the
shape of one example (28×28 MNIST for ``mlp``, ``lenet5`` and ``vgg_small``,
32×32 CIFAR for ``vgg11``, ``vgg16`` and ``resnet20``).

Pretrained networks (not in the registry) come from :mod:`dlrt.models.pretrained`:
:func:`load_pretrained_mnist_cnn` (a 99 % MNIST CNN, :class:`MnistCNN`),
:func:`load_minilm` (MiniLM-L6 with its tokenizer) and :func:`tiny_bert`
(a tiny random BERT for tests); the last two need ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..layers.registry import find_lowrank
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
    "MLP",
    "MNIST_CNN_MEAN",
    "MNIST_CNN_STD",
    "VGG",
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
    "register_model",
    "tiny_bert",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(**kw)`` available as ``get_model(name, **kw)``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[key] = builder


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the dense model registered as ``name`` (case-insensitive).

    Args:
        name: one of :func:`list_models`: ``"lenet5"``, ``"mlp"``,
            ``"resnet20"``, ``"vgg11"``, ``"vgg16"``, ``"vgg_small"``.
        **kwargs: passed to the model's constructor (e.g. ``num_classes``).

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
