"""LeNet-5 in the 20/50/500 variant of the low-rank lottery tickets experiments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 inputs (MNIST), with 20/50 feature maps and a 500-unit hidden layer.

    ``conv1`` (in→20, 5×5) → ReLU → max-pool 2 → ``conv2`` (20→50, 5×5) → ReLU
    → max-pool 2 → flatten (50·4·4 = 800) → ``fc1`` (800→500) → ReLU →
    ``head`` (500→classes).

    This is not the original of LeCun et al. ("Gradient-based learning applied
    to document recognition", Proc. IEEE 1998; 6/16 maps, 120/84 units, tanh)
    but the wider Caffe variant that Schotthöfer et al. use for their MNIST
    DLRT experiments ("Low-rank lottery tickets", NeurIPS 2022,
    arXiv:2205.13571). With one input channel and 10 classes it has 431,080
    parameters: 520 + 25,050 (convolutions) + 400,500 + 5,010 (linear).

    Args:
        num_classes: outputs of ``head``.
        in_channels: input channels (1 for MNIST).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = (int(in_channels), 28, 28)
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.head = nn.Linear(500, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.head(x)
