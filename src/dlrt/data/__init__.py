"""Datasets for the examples and benchmarks (imported on demand, not by ``import dlrt``).

:func:`get_dataset` builds a :class:`torch.utils.data.Dataset` by name (``"mnist"``,
``"fashion-mnist"``, ``"cifar10"``, ``"digits"``); :func:`dataset_info` describes one
without loading it; :func:`load_mnist` returns MNIST as a pair of tensors.
"""

from .datasets import (
    CIFAR10,
    DATASETS,
    MNIST,
    DatasetInfo,
    Digits,
    FashionMNIST,
    ImageDataset,
    dataset_info,
    get_dataset,
    random_crop_flip,
)
from .mnist import load_mnist

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
    "load_mnist",
    "random_crop_flip",
]
