"""Datasets for the examples and benchmarks (imported on demand, not by ``import dlrt``).

:func:`get_dataset` builds a :class:`torch.utils.data.Dataset` by name (``"mnist"``,
``"fashion-mnist"``, ``"cifar10"``, ``"digits"``); :func:`dataset_info` describes one
without loading it; :func:`load_mnist` returns MNIST as a pair of tensors.
"""

from . import datasets
from .datasets import *  # noqa: F403  (the public names are datasets.__all__)
from .mnist import load_mnist

__all__ = [*datasets.__all__, "load_mnist"]
