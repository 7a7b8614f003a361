"""Low-rank layer formats."""

from .base import LowRankLayer
from .conv import LowRankConv2d
from .linear import LowRankLinear

__all__ = ["LowRankLayer", "LowRankLinear", "LowRankConv2d"]
