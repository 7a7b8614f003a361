"""``state_dict`` / ``load_state_dict`` of :class:`~dlrt.optimizer.DLRTOptimizer`, and the checks before a load.

The state dict is torch's (``state``, ``param_groups``) plus a ``"dlrt"`` entry: the
integrator, the inner optimizer, the coefficient steps, the phase and step counters and
every layer's core shape. :meth:`StateDictMixin.check_state_dict` validates all of it,
and the shape of every state tensor, before anything changes (:func:`dlrt.load` calls it
before it resizes the layers).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..integrators import Integrator
from ..integrators.base import check_budget_unit
from ..layers import FactorizedLayer, TuckerConv2d
from ..optim.inner import InnerRule


class StateDictMixin:
    """State-dict saving, validation and loading of :class:`~dlrt.optimizer.DLRTOptimizer` (a part of that class)."""

    # Set by DLRTOptimizer.__init__ (state and param_groups by torch.optim.Optimizer).
    integrator: Integrator
    rule: InnerRule
    layer_names: list[str]
    lowrank_layers: list[FactorizedLayer]
    param_groups: list[dict[str, Any]]
    state: Any
    phase: int
    steps: int
    _dense_names: dict[int, str]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dlrt"] = {
            "integrator": self.integrator.name,
            "coefficient_steps": self.integrator.coefficient_steps,
            "optimizer": self.rule.name,
            "phase": self.phase,
            "steps": self.steps,
            "layers": {n: list(m.core.shape) for n, m in zip(self.layer_names, self.lowrank_layers)},
        }
        return sd

    def check_state_dict(self, state_dict: dict[str, Any], cores: dict[str, tuple[int, int]] | None = None) -> None:
        """Raise ``ValueError`` unless ``state_dict`` can be loaded; change nothing.

        Checks the metadata (integrator, inner optimizer, coefficient steps,
        phase, low-rank layers and their cores), the parameter groups, and the
        shape of every state tensor against its parameter. ``cores`` gives the
        core shape each layer will have (:func:`dlrt.load` validates before it
        resizes the layers); default: their current shapes.
        """
        meta = state_dict.get("dlrt") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("not a DLRTOptimizer state dict (no 'dlrt' entry)")
        for key, mine in (
            ("integrator", self.integrator.name),
            ("optimizer", self.rule.name),
            ("coefficient_steps", self.integrator.coefficient_steps),
        ):
            if meta.get(key) != mine:
                raise ValueError(
                    f"the state dict was saved with {key}={meta.get(key)!r}, this optimizer has {mine!r}: "
                    f"create the optimizer with {key}={meta.get(key)!r} to resume it"
                )
        for key in ("phase", "steps"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the state dict's {key} must be an int >= 0, got {value!r}")
        if meta["phase"] >= self.integrator.coefficient_steps:
            raise ValueError(
                f"the state dict's phase {meta['phase']} is not below coefficient_steps="
                f"{self.integrator.coefficient_steps}"
            )
        saved_layers = meta.get("layers")
        if not isinstance(saved_layers, dict):
            raise ValueError("the state dict's 'dlrt' entry has no 'layers' table")
        if cores is None:
            cores = {n: tuple(m.core.shape) for n, m in zip(self.layer_names, self.lowrank_layers)}
        if list(saved_layers) != self.layer_names:
            missing = sorted(set(saved_layers) - set(self.layer_names))
            extra = sorted(set(self.layer_names) - set(saved_layers))
            raise ValueError(
                f"the state dict's low-rank layers do not match the model's: missing in the model {missing}, "
                f"not in the state dict {extra}"
            )
        for name, shape in saved_layers.items():
            if list(shape) != list(cores[name]):
                raise ValueError(
                    f"layer {name!r} has core shape {list(cores[name])} but the state dict has {list(shape)}: "
                    "load the model's factors first (dlrt.load restores both)"
                )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in self.param_groups
        ]:
            raise ValueError("the state dict's parameter groups do not match this optimizer's")
        saved = groups[0]
        # The saved group replaces this one on load; a group saved before budget_unit existed counts ranks.
        unit = saved.get("budget_unit", "rank")
        try:
            check_budget_unit(unit, saved.get("budget"), saved.get("budget_order", "sigma"))
        except ValueError as err:
            raise ValueError(f"the state dict's low-rank group: {err}") from err
        if unit == "params" and any(isinstance(m, TuckerConv2d) for m in self.lowrank_layers):
            raise ValueError(
                "the state dict's low-rank group has budget_unit='params', which does not price the ranks of this "
                "model's Tucker layers: it belongs to another model"
            )
        shapes: list[tuple[int, ...]] = []
        for name, layer in zip(self.layer_names, self.lowrank_layers):
            if isinstance(layer, TuckerConv2d):
                # No state under the bases; the core's state has the core's shape.
                shapes += [(n, r) for n, r in zip(layer.mode_sizes, cores[name])] + [tuple(cores[name])]
                continue
            (r_u, r_v), (n, m) = cores[name], layer.shape
            # K-state n×r_v under U, S-state r_u×r_v under S, L-state m×r_u under V (integrators/base.py).
            shapes += [(n, r_v), (r_u, r_v), (m, r_u)]
        for group in self.param_groups[1:]:
            shapes += [tuple(p.shape) for p in group["params"]]
        names = [
            f"{n}.{k}"
            for n, layer in zip(self.layer_names, self.lowrank_layers)
            for k in (("U0", "U1", "U2", "U3", "C") if isinstance(layer, TuckerConv2d) else ("U", "S", "V"))
        ]
        names += [self._dense_names[id(p)] for g in self.param_groups[1:] for p in g["params"]]
        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError("the state dict has no 'state' table")
        for idx, st in state.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(shapes):
                raise ValueError(f"the state dict has state for parameter #{idx!r}, this optimizer has {len(shapes)}")
            for key, val in st.items():
                if isinstance(val, Tensor) and val.dim() and tuple(val.shape) != shapes[idx]:
                    raise ValueError(
                        f"optimizer state {key!r} of {names[idx]!r} has shape {tuple(val.shape)}, "
                        f"expected {shapes[idx]}"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        sd = dict(state_dict)
        meta = sd.pop("dlrt")
        super().load_state_dict(sd)
        # torch casts floating state to its parameter's dtype; the inner rules choose their own
        # (Adam keeps float32 moments for half-precision factors), so keep the saved dtypes.
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            for key, value in sd["state"].get(idx, {}).items():
                mine = self.state[p].get(key)
                if isinstance(value, Tensor) and isinstance(mine, Tensor) and mine.dtype != value.dtype:
                    self.state[p][key] = value.to(device=mine.device, copy=True)
        self._buffer_guard.clear()
        self.phase = int(meta["phase"])
        self.steps = int(meta["steps"])
        # A group saved before these keys existed: a total rank, taken by σ.
        self.lowrank_group.setdefault("budget_unit", "rank")
        self.lowrank_group.setdefault("budget_order", "sigma")
        self.trends = {}  # a trend is not saved (core.py): a cycle ended right after a load uses the weight rule
        # The rank rule comes with the saved group (a checkpoint of the relative rule keeps it).
        self.integrator.sees_normal = self.lowrank_group["tau_mode"] == "gradient"
        self._set_request(self.integrator.request(self.phase))
