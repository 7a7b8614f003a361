"""The fully connected network of the low-rank lottery tickets experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """A ReLU multilayer perceptron that flattens its input.

    With the defaults this is the 784-500-500-500-500-10 network that
    Schotthöfer et al. train on MNIST with DLRT ("Low-rank lottery tickets:
    finding efficient low-rank neural networks via matrix differential
    equations", NeurIPS 2022, arXiv:2205.13571): 1,149,010 parameters.

    The hidden layers are the modules ``fc1`` … ``fcN`` and the classifier is
    ``head``, which is usually left dense (``dlrt.convert(model, rank=r,
    exclude=("head",))``; see :func:`dlrt.models.default_exclude`).

    Args:
        in_features: size of the flattened input (784 = 1×28×28 for MNIST).
        hidden: widths of the hidden layers, one ``fc`` layer each.
        num_classes: outputs of ``head``.
    """

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (500, 500, 500, 500), num_classes: int = 10):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP sizes must be positive, got {in_features=}, {hidden=}, {num_classes=}")
        self.in_features = int(in_features)
        self.hidden = hidden
        self.num_classes = int(num_classes)
        # One example as the data pipeline delivers it (the model flattens it).
        self.input_shape: tuple[int, ...] = (1, 28, 28) if in_features == 784 else (self.in_features,)
        width = self.in_features
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, h))
            width = h
        self.head = nn.Linear(width, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        for i in range(1, len(self.hidden) + 1):
            x = torch.relu(getattr(self, f"fc{i}")(x))
        return self.head(x)
