"""Integrators, selected by name: ``bug``, ``fixed``, ``parallel``."""

from .base import Integrator
from .bug import BUG, FixedRankBUG
from .parallel import ParallelBUG

INTEGRATORS: dict[str, type[Integrator]] = {cls.name: cls for cls in (BUG, FixedRankBUG, ParallelBUG)}

__all__ = ["BUG", "INTEGRATORS", "FixedRankBUG", "Integrator", "ParallelBUG"]
