"""``ClosureConfig``: a ``dlrt closure train`` run (YAML + ``key=value``, as ``dlrt train``'s config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training.config import (
    RunConfig,
    _check_choice,
    check_rank,
    checkpoint_every_key,
    checkpoint_minutes_key,
)
from .basis import KINDS
from .networks import MODELS

__all__ = ["ClosureConfig"]

DTYPES = ("float32", "float64")


@dataclass
class ClosureConfig(RunConfig):
    """Everything a closure training run depends on; saved resolved as ``config.yaml`` in the run directory.

    The defaults train the ICNN ("MK11": width 350, depth 3) for the 1D M2 closure
    on 100 000 samples drawn in α space, with the Sobolev loss and Adam decaying
    from 2e-3 to 8e-5.
    """

    # the closure
    kind: str = field(default="monomial", metadata={"help": "moment basis: monomial | harmonic (dim=3 only)"})
    order: int = field(default=2, metadata={"help": "moment order N (dim=3: N <= 3)"})
    dim: int = field(default=1, metadata={"help": "1 (slab, Gauss–Legendre) | 3 (sphere, product quadrature)"})
    quadrature: int | None = field(default=None, metadata={"help": "quadrature points (default: make_basis's)"})
    gamma: float = field(default=0.0, metadata={"help": "regularization γ >= 0 of the entropy closure"})
    # data
    samples: int = field(default=100_000, metadata={"help": "samples drawn in α space (training + validation)"})
    bound: float = field(default=6.0, metadata={"help": "α_r uniform in [-bound, bound]"})
    min_eig: float = field(default=1e-6, metadata={"help": "conditioning filter: smallest Hessian eigenvalue kept"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the samples held out for validation"})
    data_path: str | None = field(default=None, metadata={"help": "load this dataset (dlrt.kinetic.data) instead"})
    # network
    model: str = field(default="icnn", metadata={"help": "icnn (structure-preserving) | alpha (plain baseline)"})
    width: int = field(default=350, metadata={"help": "units per hidden layer"})
    depth: int = field(default=3, metadata={"help": "hidden layers"})
    lowrank: bool = field(default=False, metadata={"help": "model=alpha: low-rank hidden layers trained by DLRT"})
    rank: int | float = field(default=0.25, metadata={"help": "lowrank: starting rank (int or fraction)"})
    tau: float = field(default=0.05, metadata={"help": "lowrank: relative truncation tolerance"})
    integrator: str = field(default="bug", metadata={"help": "lowrank: bug | fixed | parallel | abc"})
    # loss and optimisation
    loss_h: float = field(default=1.0, metadata={"help": "weight of the MSE of h"})
    loss_alpha: float = field(default=1.0, metadata={"help": "weight of the MSE of α_r"})
    loss_u: float = field(default=1.0, metadata={"help": "weight of the MSE of the reconstructed u_r"})
    epochs: int = field(default=20, metadata={"help": "training epochs"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=10_000, metadata={"help": "validation batch size"})
    lr: float = field(default=2e-3, metadata={"help": "initial learning rate (Adam)"})
    lr_final: float = field(default=8e-5, metadata={"help": "learning rate at the last step (exponential decay)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | float64: the dtype of training"})
    # outputs (and RunConfig's)
    log_every: int = field(default=50, metadata={"help": "steps between rows of steps.csv"})
    checkpoint_every: int | None = checkpoint_every_key()
    checkpoint_minutes: float | None = checkpoint_minutes_key()

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..training.driver import check_checkpoint_interval

        check_checkpoint_interval(self.checkpoint_every, self.checkpoint_minutes)
        _check_choice("kind", self.kind, KINDS)
        _check_choice("model", self.model, tuple(MODELS))
        _check_choice("dtype", self.dtype, DTYPES)
        if self.dim not in (1, 3):
            raise ValueError(f"dim must be 1 or 3, got {self.dim}")
        for key in ("order", "samples", "width", "depth", "epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gamma", "min_eig", "loss_h", "loss_alpha", "loss_u", "tau"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("bound", "lr", "lr_final"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        for key in ("max_steps", "quadrature"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or none), got {getattr(self, key)}")
        if self.lowrank:
            if self.model != "alpha":
                raise ValueError(
                    "lowrank=true applies to model=alpha: the ICNN's z-path weights must stay non-negative, which a "
                    "factorization U S Vᵀ cannot keep, and its loss differentiates α = ∇h a second time, which the "
                    "low-rank layers' projected backward does not support; use model=alpha or lowrank=false"
                )
            from ..integrators import INTEGRATORS

            _check_choice("integrator", self.integrator, tuple(INTEGRATORS))
            check_rank(self.rank)

    @property
    def run_stem(self) -> str:
        return f"closure-m{self.order}-{self.dim}d-{self.model}"
