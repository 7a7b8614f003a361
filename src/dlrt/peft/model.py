"""``get_geolora_model`` and ``GeoLoRAModel``: PEFT's model API for rank-adaptive adapters."""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write
from ..layers import LowRankAdapter, dense_types
from ..optim import RULES
from ..optim.inner import check_real
from ..optimizer import DLRTOptimizer
from ..selection import excluded, matches, set_submodule
from .config import CONFIG_NAME, GeoLoRAConfig

WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "dlrt-geolora"
VERSION = 1

__all__ = ["LR", "MODULES_TO_SAVE_LR_RATIO", "WEIGHTS_NAME", "GeoLoRAModel", "get_geolora_model"]

#: ``make_optimizer``'s default learning rate and ``modules_to_save_lr_ratio`` (docs/geolora.md).
LR = 5e-3
MODULES_TO_SAVE_LR_RATIO = 10.0


class GeoLoRAModel(nn.Module):
    """A model whose chosen layers carry :class:`~dlrt.layers.LowRankAdapter` s.

    Build it with :func:`get_geolora_model` or :meth:`from_pretrained`. It
    calls the wrapped model (``base_model``) and forwards unknown attributes
    to it, as PEFT's ``PeftModel`` does; its ``forward`` shows the wrapped
    model's signature, so ``transformers.Trainer`` keeps the right columns.
    Train it with :meth:`make_optimizer` (a :class:`~dlrt.DLRTOptimizer`
    set up from the config), or with ``transformers.Trainer`` and
    :class:`~dlrt.peft.GeoLoRACallback`.
    """

    def __init__(self, model: nn.Module, config: GeoLoRAConfig, requires_grad: dict[str, bool]) -> None:
        super().__init__()
        self.base_model = model
        self.geolora_config = config
        # requires_grad of every base parameter before freezing, restored by unload().
        self._requires_grad = requires_grad

    _dynamic = False  # True on the per-base-class subclasses made by _wrapper_class

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle (torch.save(model), multiprocessing) finds classes by name, and the
        # per-base-class subclass has none of its own: rebuild it from the base class.
        if not type(self)._dynamic:
            return super().__reduce_ex__(protocol)
        return _new_wrapper, (type(self.base_model),), self.__getstate__()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ----------------------------------------------------------- inspection
    def adapters(self) -> dict[str, LowRankAdapter]:
        """Every adapter by the name of the module it adapts (relative to ``base_model``)."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LowRankAdapter)}

    def ranks(self) -> dict[str, int]:
        """Current rank of every adapter."""
        return {n: m.rank for n, m in self.adapters().items()}

    def num_adapter_parameters(self) -> int:
        """Parameters the adapters store now (``U``, ``S``, ``V``; changes with the ranks)."""
        return sum(m.num_parameters() for m in self.adapters().values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT reports them."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        ranks = self.ranks()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f} || adapters: {len(ranks)}, "
            f"total rank: {sum(ranks.values())}"
        )

    # -------------------------------------------------------------- training
    def make_optimizer(
        self,
        optimizer: str = "geo-adam",
        lr: float | None = LR,
        *,
        modules_to_save_lr_ratio: float = MODULES_TO_SAVE_LR_RATIO,
        **kwargs: Any,
    ) -> DLRTOptimizer:
        """A :class:`~dlrt.DLRTOptimizer` with the config's integrator, tau, truncation, budget and
        coefficient steps; ``kwargs`` go to it (``weight_decay``, ``betas``, ``max_grad_norm``, ...).

        Only the adapters and ``modules_to_save`` are trained; the bases ``U``, ``V``
        never get weight decay. The default inner optimizer is ``geo-adam``
        (docs/algorithms.md §9.3): its step follows the gradient's spectrum, so the
        truncation keeps the few directions that matter (per-entry ``adamw`` fills
        every direction of the core about equally). ``modules_to_save`` (a new
        head) learn at ``lr × modules_to_save_lr_ratio``: a head starting from
        random weights needs larger steps than adapters on pretrained weights
        (docs/geolora.md). With ``truncation="global"``
        and no ``budget`` in the config, the budget is ``r`` per adapter
        (:attr:`budget`).
        """
        c = self.geolora_config
        from_config = {
            "integrator": c.integrator,
            "tau": c.tau,
            "truncation": c.truncation,
            "budget": self.budget,
            "budget_unit": c.budget_unit,
            "budget_order": c.budget_order,
            "coefficient_steps": c.coefficient_steps,
        }
        clash = sorted(set(from_config) & set(kwargs))
        if clash:
            raise ValueError(f"{clash} come from the GeoLoRAConfig; change the config instead")
        if "dense_lr" in kwargs:
            raise ValueError("set the rate of modules_to_save with modules_to_save_lr_ratio=, not dense_lr=")
        ratio = check_real("modules_to_save_lr_ratio", modules_to_save_lr_ratio, low=0.0, low_open=True)
        base_lr = RULES[optimizer].defaults["lr"] if lr is None and optimizer in RULES else lr
        dense_lr = None if base_lr is None else check_real("lr", base_lr, low=0.0) * ratio
        return DLRTOptimizer(self, optimizer=optimizer, lr=lr, dense_lr=dense_lr, **from_config, **kwargs)

    @property
    def budget(self) -> int | None:
        """The budget the optimizer gets: the config's, else, under global truncation, ``r`` per adapter.

        With ``budget_unit="rank"`` that is a total rank, ``Σ r``; with ``"params"``
        the parameters a LoRA adapter of rank ``r`` stores, ``Σ r·(n + m)`` over the
        ``n×m`` adapters, so GeoLoRA never holds more adapter parameters
        (:meth:`num_adapter_parameters`, which counts the cores too) than LoRA of
        the same ``r``. (An adapter whose full rank is below ``r`` counts its full rank.)
        """
        c = self.geolora_config
        if c.budget is not None or c.truncation != "global":
            return c.budget
        adapters = [a.lora for a in self.adapters().values()]
        if c.budget_unit == "params":
            return sum(min(c.r, lora.max_rank) * sum(lora.shape) for lora in adapters)
        return sum(min(c.r, lora.max_rank) for lora in adapters)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapters at their
        current ranks, and ``modules_to_save``) into ``directory``; each file atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        adapters = {}
        for name, a in self.adapters().items():
            lora = a.lora
            for key, p in (("U", lora.U), ("S", lora.S), ("V", lora.V)):
                tensors[f"{name}.{key}"] = p.detach().contiguous().cpu()
            adapters[name] = {
                "kind": type(a.base_layer).__name__,
                "weight_shape": list(a.base_layer.weight.shape),
                "core": list(lora.S.shape),
                "scaling": a.scaling,
                "min_rank": lora.min_rank,
                "max_rank": lora.max_rank,
            }
        saved_modules = {}
        for name in self._modules_to_save():
            sd = self.base_model.get_submodule(name).state_dict()
            saved_modules[name] = {k: list(t.shape) for k, t in sd.items()}
            for k, t in sd.items():
                tensors[f"modules_to_save.{name}.{k}"] = t.detach().contiguous().cpu()
        meta = {"format": FORMAT, "version": VERSION, "adapters": adapters, "modules_to_save": saved_modules}
        text = json.dumps({**self.geolora_config.to_dict(), "dlrt": meta}, indent=2) + "\n"
        # Weights first: the config is written last, so a directory with a config is complete.
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        return directory

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike[str], is_trainable: bool = False
    ) -> GeoLoRAModel:
        """Put the adapters saved in ``directory`` onto ``model`` (a fresh copy of the base model).

        The adapters get the saved ranks. With ``is_trainable=False`` (PEFT's
        default) the result is in eval mode with nothing trainable.

        Everything is checked before ``model`` is touched: the config, the
        weights file, every tensor's presence, shape and finiteness, the rank
        bounds and the fit to ``model``. A load that fails for any reason
        leaves ``model`` exactly as it was (same modules, parameters, buffers
        and ``requires_grad`` flags).

        Raises:
            FileNotFoundError: ``directory`` lacks the config or the weights.
            ValueError: the directory is malformed or inconsistent, or ``model``
                is not the base the adapters were saved from (the message names
                the first mismatched module or tensor).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config = GeoLoRAConfig.from_pretrained(directory)
        meta = json.loads((directory / CONFIG_NAME).read_text()).get("dlrt")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} was not written by GeoLoRAModel.save_pretrained")
        if meta.get("version") != VERSION:
            raise ValueError(f"{directory}: unsupported adapter format version {meta.get('version')}")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
        if isinstance(model, GeoLoRAModel) or any(isinstance(m, LowRankAdapter) for m in model.modules()):
            raise ValueError("the model already carries adapters: load into a fresh copy of the base model")

        adapters, saved_modules = _check_saved(model, meta, tensors, directory)
        _modules_to_save(model, config)  # raises if an entry of the config matches no module

        def load(name: str, a: LowRankAdapter) -> None:
            U, S, V, info = adapters[name]
            lora = a.lora
            lora.set_factors(U, S, V)
            lora.min_rank, lora.max_rank = info["min_rank"], info["max_rank"]
            lora.pending_growth = False
            a.scaling = float(info["scaling"])

        geo = _inject(model, config, list(adapters), load=load, state=saved_modules)
        if not is_trainable:
            geo.eval()
            geo.requires_grad_(False)
        return geo

    # ------------------------------------------------------------- unwrapping
    def merge_and_unload(self) -> nn.Module:
        """The base model with every update merged into its layer's weight (no adapters left)."""
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        """The base model with its original layers back, updates discarded."""
        return self._unwrap(merge=False)

    def _unwrap(self, merge: bool) -> nn.Module:
        base = self.base_model
        for name, a in list(self.adapters().items()):
            set_submodule(base, name, a.merged() if merge else a.base_layer)
        for name, p in base.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        return base

    def _modules_to_save(self) -> list[str]:
        return _modules_to_save(self.base_model, self.geolora_config)


def get_geolora_model(model: nn.Module, config: GeoLoRAConfig) -> GeoLoRAModel:
    """Freeze ``model`` and put a :class:`~dlrt.layers.LowRankAdapter` on every target module.

    Targets are the ``nn.Linear`` and (groups=1) ``nn.Conv2d`` layers matching
    ``config.target_modules`` (every such layer when None), outside
    ``exclude_modules`` and ``modules_to_save``. ``modules_to_save`` stay
    trainable. ``model`` is modified in place.

    Raises:
        ValueError: nothing matches, a ``modules_to_save`` entry matches no
            module, or ``model`` already has adapters.

    A layer whose full rank ``min(out, in·kh·kw)`` is below ``r`` (or
    ``min_rank``, ``max_rank``) gets an adapter of its full rank.
    """
    if not isinstance(config, GeoLoRAConfig):
        raise TypeError(f"config must be a GeoLoRAConfig, got {type(config).__name__}")
    if isinstance(model, GeoLoRAModel) or any(isinstance(m, LowRankAdapter) for m in model.modules()):
        raise ValueError("the model already carries adapters: call unload() or merge_and_unload() first")
    return _inject(model, config, _find_targets(model, config))


def _find_targets(model: nn.Module, config: GeoLoRAConfig) -> list[str]:
    saved = _modules_to_save(model, config)
    candidates = []
    for name, m in model.named_modules():
        if name == "" or not isinstance(m, dense_types()):
            continue
        if saved and excluded(name, saved):
            continue
        if config.exclude_modules and excluded(name, config.exclude_modules):
            continue
        candidates.append(name)
    if config.target_modules is None:
        targets = candidates
    else:
        targets = [n for n in candidates if matches(n, config.target_modules)]
    grouped = [n for n in targets if getattr(model.get_submodule(n), "groups", 1) != 1]
    if grouped and config.target_modules is not None:
        raise ValueError(f"modules {grouped} are grouped convolutions, which adapters do not support; exclude them")
    targets = [n for n in targets if n not in grouped]
    if not targets:
        layers = [n for n, m in model.named_modules() if isinstance(m, dense_types())]
        shown = ", ".join(layers[:12]) + (", ..." if len(layers) > 12 else "")
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"nn.Linear or nn.Conv2d of the model; its layers are: {shown or 'none'}"
        )
    return targets


def _modules_to_save(model: nn.Module, config: GeoLoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    found = []
    for entry in config.modules_to_save:
        hits = [n for n in names if matches(n, [entry])]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        found.extend(h for h in hits if not any(h.startswith(f + ".") for f in hits if f != h))
    return sorted(set(found))


def _inject(
    model: nn.Module,
    config: GeoLoRAConfig,
    targets: list[str],
    load: Callable[[str, LowRankAdapter], None] | None = None,
    state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> GeoLoRAModel:
    """Put adapters on ``targets`` (``load`` fills each before it is attached) and load
    ``state`` into the ``modules_to_save``; all or nothing: on any error ``model`` is
    restored (modules, requires_grad flags, the saved modules' tensors) and the error raised."""
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    saved = _modules_to_save(model, config)
    originals = {name: model.get_submodule(name) for name in targets}
    backup = {
        name: {k: t.detach().clone() for k, t in model.get_submodule(name).state_dict().items()}
        for name in (state or {})
    }
    try:
        built = {}
        for name, layer in originals.items():
            # Ranks are capped at a small layer's full rank (a full-rank update is the most there is).
            full = min(layer.weight.shape[0], layer.weight[0].numel())
            built[name] = LowRankAdapter(
                layer,
                min(config.r, full),
                scaling=config.scaling,
                dropout=config.lora_dropout,
                max_rank=min(config.max_rank or full, full),
                min_rank=min(config.min_rank, full),
                init=config.init,
            )
            if load is not None:
                load(name, built[name])
        model.requires_grad_(False)
        for name, adapter in built.items():
            set_submodule(model, name, adapter)
        for name in saved:
            model.get_submodule(name).requires_grad_(True)
        with torch.no_grad():
            for name, sd in (state or {}).items():
                model.get_submodule(name).load_state_dict(sd, strict=True)
    except BaseException:
        for name, layer in originals.items():
            set_submodule(model, name, layer)
        with torch.no_grad():
            for name, sd in backup.items():
                model.get_submodule(name).load_state_dict(sd, strict=True)
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
        raise
    return _wrapper_class(type(model))(model, config, requires_grad)


def _check_saved(
    model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Validate a saved adapter directory against ``model`` without changing anything.

    Returns the factors ``(U, S, V, info)`` of every adapter and the state dict of
    every ``modules_to_save`` entry.
    """
    where = directory / CONFIG_NAME
    adapters_meta, modules_meta = meta.get("adapters"), meta.get("modules_to_save")
    if not isinstance(adapters_meta, dict) or not adapters_meta or not isinstance(modules_meta, dict):
        raise ValueError(f"{where}: the 'dlrt' entry lacks its 'adapters' / 'modules_to_save' tables")
    modules = dict(model.named_modules())
    expected: set[str] = set()
    adapters = {}
    for name, info in adapters_meta.items():
        keys = {"kind", "weight_shape", "core", "scaling", "min_rank", "max_rank"}
        if not isinstance(info, dict) or not keys <= set(info):
            raise ValueError(f"{where}: the entry of adapter {name!r} lacks some of {sorted(keys)}")
        m = modules.get(name)
        if m is None:
            raise ValueError(f"the adapter for module {name!r} does not fit this model: it has no module {name!r}")
        shape = list(m.weight.shape) if isinstance(m, dense_types()) else None
        if type(m).__name__ != info["kind"] or shape != info["weight_shape"]:
            raise ValueError(
                f"the adapter for module {name!r} does not fit this model: it was saved for a {info['kind']} "
                f"with weight {info['weight_shape']}, the model has a {type(m).__name__}"
                + (f" with weight {shape}" if shape else "")
            )
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"the adapter for module {name!r} does not fit this model: it is a grouped convolution")
        n, k = m.weight.shape[0], m.weight[0].numel()
        full = min(n, k)
        core = info["core"]
        if not (isinstance(core, list) and len(core) == 2 and all(_is_int(c) and 1 <= c for c in core)):
            raise ValueError(f"{where}: adapter {name!r} has core shape {core!r}, expected [r_u, r_v] of ints >= 1")
        lo, hi = info["min_rank"], info["max_rank"]
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi <= full):
            raise ValueError(
                f"{where}: adapter {name!r} has min_rank={lo!r}, max_rank={hi!r}; they must satisfy "
                f"1 <= min_rank <= max_rank <= {full} (the layer's full rank)"
            )
        scaling = info["scaling"]
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"{where}: adapter {name!r} has scaling={scaling!r}, expected a finite number")
        want = {"U": (n, core[0]), "S": (core[0], core[1]), "V": (k, core[1])}
        factors = []
        for key, dims in want.items():
            t = tensors.get(f"{name}.{key}")
            expected.add(f"{name}.{key}")
            if t is None:
                raise ValueError(f"{directory / WEIGHTS_NAME} has no tensor {name}.{key} for adapter {name!r}")
            if tuple(t.shape) != dims:
                raise ValueError(
                    f"{directory / WEIGHTS_NAME}: tensor {name}.{key} has shape {list(t.shape)}, adapter {name!r} "
                    f"(core {core}, weight {shape}) needs {list(dims)}"
                )
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{directory / WEIGHTS_NAME}: tensor {name}.{key} is not a finite float tensor")
            factors.append(t)
        adapters[name] = (*factors, info)
    state = {}
    for name, shapes in modules_meta.items():
        m = modules.get(name)
        if m is None:
            raise ValueError(f"modules_to_save entry {name!r} does not fit this model: it has no such module")
        mine = {k: list(t.shape) for k, t in m.state_dict().items()}
        if mine != shapes:
            raise ValueError(
                f"modules_to_save entry {name!r} does not fit this model: saved tensors {shapes}, model {mine}"
            )
        sd = {}
        for k, dims in shapes.items():
            key = f"modules_to_save.{name}.{k}"
            expected.add(key)
            t = tensors.get(key)
            if t is None or list(t.shape) != dims:
                got = "missing" if t is None else f"of shape {list(t.shape)}"
                raise ValueError(f"{directory / WEIGHTS_NAME}: tensor {key} is {got}, expected shape {dims}")
            sd[k] = t
        state[name] = sd
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds tensors {extra[:5]} that {CONFIG_NAME} does not describe: "
            "the two files come from different saves"
        )
    return adapters, state


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_CLASSES: dict[type, type[GeoLoRAModel]] = {}


def _new_wrapper(base_cls: type) -> GeoLoRAModel:
    """An empty instance of the wrapper class for ``base_cls`` (pickle then sets its state)."""
    cls = _wrapper_class(base_cls)
    return cls.__new__(cls)


def _wrapper_class(base_cls: type) -> type[GeoLoRAModel]:
    """A ``GeoLoRAModel`` subclass whose ``forward`` has the signature of ``base_cls.forward``.

    ``transformers.Trainer`` reads the model's forward signature to decide which
    dataset columns (and which label names) to pass; a bare ``*args, **kwargs``
    would make it drop every input column. One class per base class; instances
    pickle through :meth:`GeoLoRAModel.__reduce_ex__`, which names the base class.
    """
    cls = _CLASSES.get(base_cls)
    if cls is not None:
        return cls
    try:
        signature = inspect.signature(base_cls.forward)
    except (TypeError, ValueError):
        return GeoLoRAModel

    def forward(self: GeoLoRAModel, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = base_cls.forward.__doc__
    cls = type("GeoLoRAModel", (GeoLoRAModel,), {"forward": forward, "__module__": __name__, "_dynamic": True})
    _CLASSES[base_cls] = cls
    return cls
