"""Inner optimizer rules (the "−λ∇" of the integrators) and the transport of their state."""

from .inner import RULES, SGD, Adam, AdamW, InnerRule, clone_state, transport_state  # isort: skip (first: see inner.py)
from .geometric import GeoAdam, GeoHeavyBall, GeometricRule

__all__ = [
    "RULES",
    "SGD",
    "Adam",
    "AdamW",
    "GeoAdam",
    "GeoHeavyBall",
    "GeometricRule",
    "InnerRule",
    "clone_state",
    "transport_state",
]
