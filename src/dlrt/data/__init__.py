"""Datasets for the examples and benchmarks (imported on demand, not by ``import dlrt``).

:func:`get_dataset` builds a :class:`torch.utils.data.Dataset` by name (``"mnist"``,
``"fashion-mnist"``, ``"cifar10"``, ``"digits"``); :func:`dataset_info` describes one
without loading it; :func:`load_mnist` returns MNIST as a pair of tensors.

For text classification, :func:`load_rotten_tomatoes` returns review snippets
split by movie, :func:`load_convention_party` paragraphs of the 2012 US convention
speeches labelled by party and split by speaker; :class:`TextClassificationDataset`
tokenises either once and :class:`TextCollator` pads each batch (see
:mod:`dlrt.data.text`).

For language modelling, :func:`lm_datasets` cuts a text corpus (:func:`list_corpora`:
``hamlet``, ``convention-speeches``, ``rotten-tomatoes``, ``debates``) split by
document into :class:`TokenWindows` of :class:`ByteTokenizer` tokens (see
:mod:`dlrt.data.lm`).
"""

from . import datasets, lm, text
from .datasets import *  # noqa: F403  (the public names are datasets.__all__)
from .lm import *  # noqa: F403  (the public names are lm.__all__)
from .mnist import load_mnist
from .text import *  # noqa: F403  (the public names are text.__all__)

__all__ = [*datasets.__all__, *lm.__all__, *text.__all__, "load_mnist"]
