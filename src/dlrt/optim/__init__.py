"""Inner optimizer rules (the "−λ∇" of the integrators) and the transport of their state."""

from .inner import RULES, SGD, Adam, AdamW, InnerRule, clone_state, transport_state

__all__ = ["RULES", "SGD", "Adam", "AdamW", "InnerRule", "clone_state", "transport_state"]
