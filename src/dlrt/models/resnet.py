"""ResNet-20 for 32×32 inputs (CIFAR-10/100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNet20"]


class _PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 of He et al. for CIFAR ("Deep residual learning for image recognition", CVPR 2016, §4.2).

    ``conv`` (3×3, 16) + BN + ReLU, then three stages ``layer1`` … ``layer3``
    of three basic blocks with 16, 32 and 64 channels (the first block of
    stages 2 and 3 has stride 2), global average pooling and ``head``
    (64→classes): 6·3 + 2 = 20 weight layers.

    Shortcuts are option A by default, as in the paper's CIFAR experiments:
    identity, and where the shape changes, subsampling plus zero-padded
    channels, which adds no parameters (0.27M: 269,722 with 10 classes).
    ``shortcut="B"`` uses 1×1 convolution + BN projections there instead
    (``layerK.0.shortcut.0``; 272,474 parameters); those 1×1 convolutions are
    ordinary ``nn.Conv2d`` and are converted to low rank like the others.

    Full ranks: ``conv`` 16 (min(16, 3·3·3)), the 16-channel convolutions 16,
    the option-B shortcuts 16 and 32. Any rank ≤ 16 converts with
    ``exclude=("head",)``; for larger ranks see
    :func:`dlrt.models.default_exclude`.

    Args:
        num_classes: outputs of ``head``.
        in_channels: input channels (3 for CIFAR).
        shortcut: ``"A"`` (parameter-free) or ``"B"`` (1×1 projections).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.num_classes = int(num_classes)
        self.shortcut = shortcut
        self.input_shape: tuple[int, ...] = (int(in_channels), 32, 32)
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        width = 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(width, planes, stride if j == 0 else 1, shortcut))
                width = planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.head = nn.Linear(64, self.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)
