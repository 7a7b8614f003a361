"""Integrators, selected by name: ``bug``, ``fixed``, ``parallel``, ``abc``."""

from .abc import ABC
from .base import Integrator
from .bug import BUG, FixedRankBUG
from .parallel import ParallelBUG

INTEGRATORS: dict[str, type[Integrator]] = {cls.name: cls for cls in (BUG, FixedRankBUG, ParallelBUG, ABC)}
"""The integrators by the name ``DLRTOptimizer(integrator=...)`` takes: ``bug``, ``fixed``, ``parallel``, ``abc``."""

__all__ = ["ABC", "BUG", "INTEGRATORS", "FixedRankBUG", "Integrator", "ParallelBUG"]
