"""Inner optimizer rules (the "−λ∇" of the integrators) and the transport of their state.

:data:`RULES` is the registry behind ``DLRTOptimizer(optimizer=...)``: the per-entry
rules of :mod:`.inner` and the geometric ones of :mod:`.geometric`, which build on them.
"""

from .geometric import GeoAdam, GeoHeavyBall, GeometricRule
from .inner import SGD, Adam, AdamW, InnerRule, clone_state, transport_state

#: The inner optimizers by name (``DLRTOptimizer(optimizer=...)``, the configs' ``optimizer`` key).
RULES: dict[str, type[InnerRule]] = {r.name: r for r in (SGD, Adam, AdamW, GeoHeavyBall, GeoAdam)}

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
