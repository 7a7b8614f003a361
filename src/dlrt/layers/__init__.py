"""Low-rank layer formats, the registry that maps dense module types to them, and the adapter.

Each dense module type has its low-rank types registered in :mod:`dlrt.layers.registry`
(``nn.Linear`` → :class:`LowRankLinear`, ``nn.Conv2d`` → :class:`LowRankConv2d`);
:func:`register_lowrank` adds one. Every rank given for a layer is validated by
:func:`check_rank`.
"""

from .adapter import LowRankAdapter
from .base import LowRankLayer
from .conv import LowRankConv2d
from .linear import LowRankLinear
from .ranks import check_rank
from .registry import (
    LowRankSpec,
    dense_types,
    find_lowrank,
    lowrank_formats,
    lowrank_spec,
    lowrank_types,
    register_lowrank,
    registered_lowrank,
    unregister_lowrank,
)

__all__ = [
    "LowRankAdapter",
    "LowRankConv2d",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankSpec",
    "check_rank",
    "dense_types",
    "find_lowrank",
    "lowrank_formats",
    "lowrank_spec",
    "lowrank_types",
    "register_lowrank",
    "registered_lowrank",
    "unregister_lowrank",
]
