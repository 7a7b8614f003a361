"""Low-rank layer formats, and the adapter that adds one to a frozen layer."""

from .adapter import LowRankAdapter
from .base import LowRankLayer
from .conv import LowRankConv2d
from .linear import LowRankLinear

__all__ = ["LowRankAdapter", "LowRankConv2d", "LowRankLayer", "LowRankLinear"]
