"""``GeoLoRAConfig``: what to adapt and how ranks adapt, as a validated dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..integrators import INTEGRATORS

CONFIG_NAME = "adapter_config.json"
#: Default ``lora_alpha`` (docs/geolora.md).
ALPHA = 32.0


@dataclass
class GeoLoRAConfig:
    """Configuration of GeoLoRA adapters (Schotthöfer et al., ICLR 2025), shaped like PEFT's ``LoraConfig``.

    Each adapted layer computes ``y = W₀x + b + s·U S Vᵀ x`` with ``W₀, b``
    frozen, ``S`` starting at zero (the model is unchanged at first), and the
    rank of every adapter chosen by the integrator's truncation. The scaling
    ``s = lora_alpha / r`` is fixed when the adapters are created and never
    follows later rank changes, so truncation never makes the output jump.

    The defaults (with :meth:`GeoLoRAModel.make_optimizer`'s: ``geo-adam``, the
    ``modules_to_save`` at 10 × lr) were chosen on MiniLM-L6 / Rotten Tomatoes so that
    one setting works from lr 1e-4 to 5e-3 with adapters on two or on all linear
    layers; docs/geolora.md gives the dynamics and the measurements.
    """

    r: int = field(default=8, metadata={"help": "initial rank of every adapter"})
    max_rank: int | None = field(
        default=None, metadata={"help": "largest rank an adapter may reach (default: the layer's full rank)"}
    )
    min_rank: int = field(default=1, metadata={"help": "smallest rank an adapter keeps"})
    tau: float = field(
        default=0.02,
        metadata={"help": "relative truncation tolerance: drop singular values whose tail norm is ≤ tau·‖σ‖"},
    )
    budget: int | None = field(
        default=None,
        metadata={
            "help": "what all adapters may keep together: a total rank (a budget given counts ranks unless "
            "budget_unit=params); default with global truncation: the parameters LoRA of rank r stores; local "
            "truncation has no budget"
        },
    )
    budget_unit: str | None = field(
        default=None,
        metadata={
            "help": "what budget counts: rank (the sum of ranks) or params (the parameters U, S, V hold; the k-th "
            "rank of an n×m adapter costs n + m + 2k − 1; default budget: what LoRA of rank r stores, "
            "Σ r·(n + m) over the adapters). Default: params with global truncation and no budget given (never "
            "more adapter parameters than LoRA of rank r); rank for a budget given (a total rank, as it always "
            "was) and with local truncation (no budget)"
        },
    )
    budget_order: str = field(
        default="sigma",
        metadata={
            "help": "sigma: the budget keeps the largest singular values first (GeoLoRA); energy: the largest "
            "σ² per unit of the budget they cost (with budget_unit=params it favours the cheaper adapters)"
        },
    )
    truncation: str = field(
        default="global",
        metadata={"help": "global: pool σ of all adapters (GeoLoRA); local: each adapter by its own σ"},
    )
    lora_alpha: float = field(
        default=ALPHA,
        metadata={
            "help": "the update is scaled by lora_alpha / r; with geo-adam a step moves each adapter by about "
            "lr·(lora_alpha/r)·√rank in Frobenius norm, so lora_alpha and lr act together "
            "(docs/geolora.md)"
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "modules to adapt: a list of names or name suffixes, or a regex matched against the full "
            "name (default: every nn.Linear and nn.Conv2d)"
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules never adapted (same forms; a match excludes its children)"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter (e.g. a new head)"}
    )
    coefficient_steps: int = field(
        default=1,
        metadata={
            "help": "S-steps on a frozen augmented basis between truncations (1: the bases follow the gradient "
            "at every step; per-entry Adam needs 10–30, docs/geolora.md)"
        },
    )
    integrator: str = field(default="parallel", metadata={"help": "parallel (one pass per step) | bug"})
    init: str = field(
        default="gradient",
        metadata={
            "help": "how every update starts (S = 0 in all): gradient (bases grown from the first gradient), "
            "random (random orthonormal bases, LoRA-like), lora (V on the rows of LoRA's kaiming-uniform A)"
        },
    )

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        positive_int("r", self.r)
        positive_int("min_rank", self.min_rank)
        positive_int("coefficient_steps", self.coefficient_steps)
        if self.max_rank is not None:
            positive_int("max_rank", self.max_rank)
            if self.max_rank < self.min_rank:
                raise ValueError(f"max_rank={self.max_rank} is below min_rank={self.min_rank}")
            if self.max_rank < self.r:
                raise ValueError(f"r={self.r} exceeds max_rank={self.max_rank}")
        if not self.min_rank <= self.r:
            raise ValueError(f"min_rank={self.min_rank} exceeds r={self.r}")
        from ..linalg import check_tau

        self.tau = check_tau(self.tau, "relative")
        if self.truncation not in ("global", "local"):
            raise ValueError(f"truncation must be 'global' or 'local', got {self.truncation!r}")
        if self.budget is not None:
            positive_int("budget", self.budget)
            if self.truncation != "global":
                raise ValueError("budget= needs truncation='global' (a budget is shared by all adapters)")
        from ..integrators.base import check_budget_unit

        if self.budget_unit is None:
            self.budget_unit = "params" if self.truncation == "global" and self.budget is None else "rank"
        # Under global truncation a budget always exists (GeoLoRAModel.budget's default).
        check_budget_unit(self.budget_unit, self.budget if self.truncation != "global" else 0, self.budget_order)
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        self.lora_alpha = float(self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        from ..layers.adapter import check_adapter_init

        check_adapter_init(self.init)
        adaptive = sorted(name for name, cls in INTEGRATORS.items() if cls.adaptive)
        if self.integrator not in adaptive:
            raise ValueError(f"integrator must be a rank-adaptive one, one of {adaptive}; got {self.integrator!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"{name}={value!r} is not a valid regex: {err}") from err
            elif value is not None:
                setattr(self, name, _names(name, value))
        if self.modules_to_save is not None:
            self.modules_to_save = _names("modules_to_save", self.modules_to_save)

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, the fixed factor of every adapter's update."""
        return self.lora_alpha / self.r

    # -------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeoLoRAConfig:
        """Build from a dict; an unknown key is an error that lists the valid keys."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown GeoLoRAConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter_config.json`` into ``directory`` (atomically)."""
        from ..io import atomic_write

        path = Path(directory) / CONFIG_NAME
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> GeoLoRAConfig:
        """Read the config part of ``directory/adapter_config.json``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is it a directory written by save_pretrained?")
        data = json.loads(path.read_text())
        data.pop("dlrt", None)
        return cls.from_dict(data)


def _names(what: str, value: Any) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of module names, got {value!r}")
    return list(value)
