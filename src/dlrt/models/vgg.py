"""VGG-11/16 for 32×32 inputs (CIFAR-10/100), and a small VGG-style network for 28×28 inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["VGG", "SmallVGG"]

# Convolution widths, "M" = 2×2 max-pool; configurations A and D of Simonyan & Zisserman (2015).
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG in its common CIFAR form: 3×3 convolution stacks, then a small classifier.

    The convolutions follow configurations A (``depth=11``) and D
    (``depth=16``) of Simonyan & Zisserman ("Very deep convolutional networks
    for large-scale image recognition", ICLR 2015, arXiv:1409.1556), each
    followed by batch normalization (Ioffe & Szegedy, ICML 2015) when
    ``batch_norm`` and by ReLU. Five max-pools take a 32×32 image to 512×1×1.

    The classifier is not the ImageNet 4096-4096 one: it is ``classifier``
    (512→512, ReLU) followed by ``head`` (512→classes), no dropout, as in the
    usual CIFAR ports. That keeps one hidden linear layer to compress besides
    the convolutions and ``head`` to leave dense. With BN and 10 classes
    ``depth=11`` has 9,491,018 parameters and ``depth=16`` 14,986,698.

    The features are ``features.<i>`` (``nn.Sequential`` indices). Every layer
    has full rank ≥ 27 (the first convolution, 3·3·3 inputs), so any rank up to
    27 converts with ``exclude=("head",)``.

    Args:
        depth: 11 or 16.
        num_classes: outputs of ``head``.
        in_channels: input channels (3 for CIFAR).
        batch_norm: add ``BatchNorm2d`` after every convolution (convolutions
            then have no bias).
    """

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = True):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth!r}")
        self.depth = depth
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = (int(in_channels), 32, 32)
        layers: list[nn.Module] = []
        width = int(in_channels)
        for v in CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(width, v, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU())
            width = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU())
        self.head = nn.Linear(512, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.head(self.classifier(x))


class SmallVGG(nn.Module):
    """A small VGG-style network for 28×28 (or larger) images: four 3×3 convolutions, BN, global pooling.

    ``conv1`` (in→16) → max-pool → ``conv2`` (16→32) → max-pool → ``conv3``
    (32→64) → ``conv4`` (64→64) → max-pool → global average pool → ``head``
    (64→classes); each convolution ``padding=1``, without bias, followed by
    ``BatchNorm2d`` and ReLU. With one input channel and 10 classes it has
    61,050 parameters, 60,048 of them in the convolutions: a network whose
    size is almost all 3×3 convolutions, cheap enough for CPU sweeps on
    MNIST-sized data (about 1.6× LeNet5's multiply-adds per image).

    Args:
        num_classes: outputs of ``head``.
        in_channels: input channels (1 for MNIST).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = (int(in_channels), 28, 28)
        widths = [(int(in_channels), 16), (16, 32), (32, 64), (64, 64)]
        for i, (a, b) in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, kernel_size=3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(b))
        self.head = nn.Linear(64, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _block(self, i: int, x: Tensor) -> Tensor:
        return torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.max_pool2d(self._block(1, x), 2)
        x = torch.max_pool2d(self._block(2, x), 2)
        x = torch.max_pool2d(self._block(4, self._block(3, x)), 2)
        return self.head(x.mean((2, 3)))
