"""Low-rank layer formats, the registry that maps dense module types to them, and the adapter.

Each dense module type has its low-rank types registered in :mod:`dlrt.layers.registry`
(``nn.Linear`` → :class:`LowRankLinear`, ``nn.Conv2d`` → :class:`LowRankConv2d`, or
:class:`TuckerConv2d` in the ``"tucker"`` format);
:func:`register_lowrank` adds one. Every rank given for a layer is validated by
:func:`check_rank`.
"""

from .adapter import ADAPTER_INITS, LowRankAdapter
from .base import FactorizedLayer, LowRankLayer
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
from .tucker import TuckerConv2d

__all__ = [
    "ADAPTER_INITS",
    "FactorizedLayer",
    "LowRankAdapter",
    "LowRankConv2d",
    "LowRankLayer",
    "LowRankLinear",
    "LowRankSpec",
    "TuckerConv2d",
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
