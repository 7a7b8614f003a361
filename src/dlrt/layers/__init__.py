"""Low-rank layer formats."""

from .base import LowRankLayer
from .conv import LowRankConv2d
from .linear import LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLayer", "LowRankLinear"]
