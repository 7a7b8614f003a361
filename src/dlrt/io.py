"""Checkpoints that survive rank changes: safetensors for tensors, JSON for the rest.

One file: the tensors of the model (and optimizer) in safetensors format, and
in its metadata a JSON document with every layer's ranks and bounds, the
optimizer's hyper-parameters and integrator state, and the caller's extras.
Nothing is unpickled. The file is written next to its destination and renamed
over it, so a crash never leaves a half-written checkpoint; the temporary file a
killed writer leaves behind is removed by the next save or load of that
destination (:func:`remove_stale_temporaries`). :func:`load` validates the whole
file against the model and optimizer before it changes either, and restores
both if applying it still fails (docs/algorithms.md §7).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conversion import lowrank_layers
from .integrators.base import LAYER_FLAGS, layer_flags, restore_layer_flags
from .layers import FactorizedLayer, TuckerConv2d

FORMAT = "dlrt-checkpoint"
VERSION = 1
#: A temporary file of :func:`atomic_write` untouched for this long belongs to a dead writer.
STALE_TMP_SECONDS = 300.0
#: Where the ``tensors=`` of :func:`save` are stored in the file.
EXTRA_PREFIX = "extra/"


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    frozen: Collection[str] = (),
) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        model: the model; its low-rank layers' ranks are recorded.
        optimizer: a :class:`~dlrt.DLRTOptimizer` (or any torch optimizer whose
            state is tensors and JSON values).
        extra: JSON-serializable values stored alongside (epoch, config, ...).
        tensors: further named tensors stored alongside (state a training task keeps
            outside the model and the optimizer); :func:`load` returns them on request.
        frozen: keys of ``model.state_dict()`` not to store (a fine-tuning run's frozen
            pretrained weights, which its model is rebuilt with); the header records a
            fingerprint of each, and :func:`load` refuses a model whose tensor differs.
    """
    from safetensors.torch import save_file

    path = Path(path)
    stored: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        # safetensors refuses tensors sharing memory (tied weights): store copies.
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        stored[key] = t.contiguous().cpu()

    state = model.state_dict()
    unknown = sorted(set(frozen) - set(state))
    if unknown:
        raise ValueError(f"frozen= names keys the model's state dict does not have: {unknown[:5]}")
    for key, t in state.items():
        if key not in frozen:
            put(f"model/{key}", t)
    for key, t in (tensors or {}).items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors= holds tensors only; {key!r} is {type(t).__name__}")
        put(f"{EXTRA_PREFIX}{key}", t)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {
            name: {
                "type": type(layer).__name__,
                "shape": list(layer.shape),
                "core": list(layer.core.shape),
                "min_rank": layer.min_rank,
                "max_rank": layer.max_rank,
                **({"tucker_modes": list(layer.tucker_modes)} if isinstance(layer, TuckerConv2d) else {}),
                # Where the layer is in a coefficient cycle (a fresh adapter, bases just grown).
                "flags": dict(zip(LAYER_FLAGS, layer_flags(layer))),
            }
            for name, layer in lowrank_layers(model)
        },
        "extra": extra or {},
        **({"frozen": {key: fingerprint(state[key]) for key in sorted(frozen)}} if frozen else {}),
    }
    if optimizer is not None:
        sd = optimizer.state_dict()
        plain_state: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            plain_state[str(idx)] = {}
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    put(f"optimizer/{idx}/{key}", val)
                else:
                    plain_state[str(idx)][key] = val
        rest = {k: v for k, v in sd.items() if k != "state"}
        meta["optimizer"] = {"state": plain_state, **rest}
    try:
        header = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint metadata must be JSON-serializable (check extra=): {err}") from err
    atomic_write(path, lambda tmp: save_file(stored, tmp, metadata={"dlrt": header}))
    return path


def fingerprint(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and a hash of (at most 65,536 evenly spaced entries of) ``t``: what tells a frozen tensor a
    checkpoint left out from another (a different pretrained model), without hashing all of it at every save."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 65536)].contiguous().cpu()
    digest = hashlib.blake2b(sample.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sample_hash": digest}


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    An exception leaves ``path`` as it was and no temporary file behind; a
    killed process leaves ``path`` as it was and its temporary file, which the
    next write (or :func:`load`) of the same ``path`` removes once it is stale
    (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike[str], *, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of ``path`` left behind; return them.

    Only files named exactly as :func:`atomic_write` names its temporaries for
    this destination (``.NAME.XXXXXXXX.tmp`` beside it) are candidates, and only
    those not modified for ``older_than`` seconds are removed. A live writer
    modifies its file as it writes it and renames it away within moments of
    finishing, so a file untouched for minutes has no writer; a younger one may
    belong to another process saving the same destination right now and is
    left alone (the next save or load removes it once it has aged).
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if (
                not entry.is_file(follow_symlinks=False)
                or now - entry.stat(follow_symlinks=False).st_mtime < older_than
            ):
                continue
            os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove
            continue
        removed.append(Path(entry.path))
    return removed


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``).

    Low-rank layers are resized to the saved ranks first, so a model built at
    any rank loads a checkpoint taken after rank adaptation. Returns the
    ``extra`` dict given to :func:`save`; a ``tensors`` dict receives the
    ``tensors=`` given to it (on the CPU), once everything else has loaded.

    Everything is validated before anything changes: the header (layer names,
    types, shapes, rank bounds ``1 <= min_rank <= max_rank <= min(n, m)`` and
    the core against them), every tensor's shape against the header and the
    model, and, with ``optimizer``, the optimizer's metadata (integrator, inner
    optimizer, coefficient steps, layers and cores), its parameter groups and
    the shape of every state tensor against the parameter it belongs to. If
    applying still fails, model and optimizer are restored: a failed load
    leaves both exactly as they were.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a dlrt checkpoint, or it does not match ``model`` or
            ``optimizer`` (the message names the layer, tensor or setting).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    remove_stale_temporaries(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("dlrt")
            # Fresh (aligned) allocations: BLAS kernels may round differently on unaligned
            # buffers, which would break bit-identical resumption.
            stored = {k: f.get_tensor(k).clone() for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a dlrt checkpoint (no 'dlrt' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: the checkpoint header is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = meta if not isinstance(meta, dict) else f"{meta.get('format')!r} v{meta.get('version')}"
        raise ValueError(f"{path}: unsupported checkpoint format {got}")

    # ---- validate: nothing below changes the model or the optimizer until "apply"
    mine = dict(lowrank_layers(model))
    saved = meta.get("layers")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the checkpoint header has no 'layers' table")
    missing = sorted(set(saved) - set(mine))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint has low-rank layers {missing} that the model does not have as low-rank "
            "layers (convert the model the same way before loading)"
        )
    unexpected = sorted(set(mine) - set(saved))
    if unexpected:
        raise ValueError(f"{path}: the model's low-rank layers {unexpected} are not in the checkpoint")
    cores: dict[str, tuple[int, ...]] = {}
    phase = _saved_phase(meta)
    for name, info in saved.items():
        cores[name] = _check_layer_header(path, name, info, mine[name], phase)

    model_sd = {k[len("model/") :]: v for k, v in stored.items() if k.startswith("model/")}
    target = model.state_dict()
    factor_shapes: dict[str, tuple[int, ...]] = {}
    for name, core in cores.items():
        prefix = f"{name}." if name else ""
        layer = mine[name]
        if isinstance(layer, TuckerConv2d):
            factor_shapes.update({f"{prefix}U{i}": (n, r) for i, (n, r) in enumerate(zip(layer.mode_sizes, core))})
            factor_shapes[f"{prefix}C"] = tuple(core)
            continue
        (r_u, r_v), (n, m) = core, saved[name]["shape"]
        factor_shapes.update({f"{prefix}U": (n, r_u), f"{prefix}S": (r_u, r_v), f"{prefix}V": (m, r_v)})
    frozen = meta.get("frozen", {})
    if not isinstance(frozen, dict):
        raise ValueError(f"{path}: the checkpoint header's 'frozen' table is not a table")
    for key, saved_print in frozen.items():
        if key in target and fingerprint(target[key]) != saved_print:
            raise ValueError(
                f"{path}: the checkpoint left out the frozen {key!r}, and the model's {key!r} is not the one it "
                "was saved with (shape, dtype or values differ): build the model from the same pretrained weights"
            )
    missing_keys = sorted(set(target) - set(model_sd) - set(frozen))
    unexpected_keys = sorted((set(model_sd) | set(frozen)) - set(target))
    if missing_keys or unexpected_keys:
        raise ValueError(
            f"{path}: parameter names do not match the model: missing {missing_keys[:10]}, "
            f"unexpected {unexpected_keys[:10]}"
        )
    for key, t in model_sd.items():
        want = factor_shapes.get(key, tuple(target[key].shape))
        if tuple(t.shape) != want:
            where = "the checkpoint's header" if key in factor_shapes else "the model"
            raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)} in the checkpoint but {want} in {where}")
        if not (t.is_floating_point() == target[key].is_floating_point()):
            raise ValueError(f"{path}: {key!r} is {t.dtype} in the checkpoint but {target[key].dtype} in the model")

    osd = None
    if optimizer is not None:
        osd = _optimizer_state_dict(path, meta, stored)
        _check_optimizer_state(path, osd, optimizer, model, cores, factor_shapes)

    # ---- apply, restoring model and optimizer if anything still fails
    undo_layers = {
        name: (
            tuple(p.data for p in layer.factor_parameters()),
            layer.min_rank,
            layer.max_rank,
            layer_flags(layer),
            getattr(layer, "tucker_modes", None),
        )
        for name, layer in mine.items()
    }
    undo_dense = {k: v.clone() for k, v in target.items() if k not in factor_shapes}
    undo_opt = _optimizer_undo(optimizer) if optimizer is not None else None
    try:
        for name, info in saved.items():
            layer: FactorizedLayer = mine[name]
            empty = layer.core.new_empty
            if isinstance(layer, TuckerConv2d):
                core = cores[name]
                layer.set_factors([empty(n, r) for n, r in zip(layer.mode_sizes, core)], empty(*core))
                layer.tucker_modes = tuple(info["tucker_modes"])
            else:
                (r_u, r_v), (n, m) = cores[name], info["shape"]
                layer.set_factors(empty(n, r_u), empty(r_u, r_v), empty(m, r_v))
            layer.min_rank, layer.max_rank = int(info["min_rank"]), int(info["max_rank"])
            restore_layer_flags(layer, tuple(bool(info.get("flags", {}).get(f, False)) for f in LAYER_FLAGS))
        model.load_state_dict(model_sd, strict=not frozen)  # the keys were checked above, frozen ones aside
        if optimizer is not None:
            optimizer.load_state_dict(osd)
    except BaseException:
        for name, (data, lo, hi, flags, modes) in undo_layers.items():
            if isinstance(mine[name], TuckerConv2d):
                mine[name].set_factors(data[:-1], data[-1])
                mine[name].tucker_modes = modes
            else:
                mine[name].set_factors(*data)
            mine[name].min_rank, mine[name].max_rank = lo, hi
            restore_layer_flags(mine[name], flags)
        model.load_state_dict(undo_dense, strict=False)
        if optimizer is not None:
            _optimizer_redo(optimizer, undo_opt)
        raise
    if tensors is not None:
        tensors.update({k[len(EXTRA_PREFIX) :]: v for k, v in stored.items() if k.startswith(EXTRA_PREFIX)})
    return meta.get("extra", {})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _saved_phase(meta: dict[str, Any]) -> int | None:
    """The integrator phase the checkpoint was taken in, when it holds a DLRTOptimizer's state."""
    info = meta.get("optimizer")
    dl = info.get("dlrt") if isinstance(info, dict) else None
    phase = dl.get("phase") if isinstance(dl, dict) else None
    return phase if _is_int(phase) else None


def _check_layer_header(path: Path, name: str, info: Any, layer: FactorizedLayer, phase: int | None) -> tuple[int, ...]:
    """Validate one layer's header entry against the model's layer; return its core shape."""
    where = f"{path}: layer {name!r}"
    if not isinstance(info, dict) or not {"type", "shape", "core", "min_rank", "max_rank"} <= set(info):
        raise ValueError(f"{where}: the header entry must have type, shape, core, min_rank and max_rank, got {info!r}")
    if type(layer).__name__ != info["type"] or list(layer.shape) != info["shape"]:
        raise ValueError(
            f"{where} is a {type(layer).__name__} of shape {list(layer.shape)} in the model "
            f"but a {info['type']} of shape {info['shape']} in the checkpoint"
        )
    if isinstance(layer, TuckerConv2d):
        return _check_tucker_header(where, info, layer)
    n, m = layer.shape
    full = min(n, m)
    lo, hi, core = info["min_rank"], info["max_rank"], info["core"]
    if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi <= full):
        raise ValueError(
            f"{where}: rank bounds min_rank={lo!r}, max_rank={hi!r} in the checkpoint must be ints with "
            f"1 <= min_rank <= max_rank <= {full} (min(n, m)); the file is damaged or was not written by dlrt.save"
        )
    if not (isinstance(core, list) and len(core) == 2 and all(_is_int(r) for r in core)):
        raise ValueError(f"{where}: core must be [r_u, r_v], got {core!r}")
    flags = info.get("flags", {})
    known = isinstance(flags, dict) and set(flags) <= set(LAYER_FLAGS)
    if not known or not all(type(v) is bool for v in flags.values()):
        raise ValueError(f"{where}: flags must map some of {list(LAYER_FLAGS)} to true/false, got {flags!r}")
    r_u, r_v = core
    # At phase 0 a layer sits on its square rank-r core within its bounds; mid-cycle on an
    # augmented basis (at most r new directions per side, so at most 2·max_rank).
    cap_u, cap_v = (hi, hi) if phase == 0 else (min(n, 2 * hi), min(m, 2 * hi))
    square = phase != 0 or r_u == r_v
    if not (1 <= r_u <= cap_u and 1 <= r_v <= cap_v and square):
        state = "at phase 0 (square, within [1, max_rank])" if phase == 0 else f"(r_u <= {cap_u}, r_v <= {cap_v})"
        raise ValueError(f"{where}: core {core} is outside its bounds {state}, max_rank={hi}")
    return int(r_u), int(r_v)


def _check_tucker_header(where: str, info: dict[str, Any], layer: TuckerConv2d) -> tuple[int, ...]:
    """The Tucker part of :func:`_check_layer_header`: bounds, adapted modes and one rank per mode."""
    from .layers.tucker import check_tucker_modes

    full = max(layer.full_ranks)
    lo, hi, core = info["min_rank"], info["max_rank"], info["core"]
    if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi <= full):
        raise ValueError(
            f"{where}: rank bounds min_rank={lo!r}, max_rank={hi!r} in the checkpoint must be ints with "
            f"1 <= min_rank <= max_rank <= {full}; the file is damaged or was not written by dlrt.save"
        )
    try:
        check_tucker_modes(info.get("tucker_modes"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    sizes = layer.mode_sizes
    if not (
        isinstance(core, list)
        and len(core) == len(sizes)
        and all(_is_int(r) and 1 <= r <= n for r, n in zip(core, sizes))
    ):
        raise ValueError(f"{where}: core must hold one rank per mode within the mode sizes {list(sizes)}, got {core!r}")
    return tuple(int(r) for r in core)


def _optimizer_state_dict(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state (it was saved without optimizer=)")
    osd = dict(meta["optimizer"])
    if not isinstance(osd.get("state"), dict) or not isinstance(osd.get("param_groups"), list):
        raise ValueError(f"{path}: the optimizer entry of the header has no 'state' table or 'param_groups' list")
    try:
        state: dict[int, dict[str, Any]] = {int(i): dict(st) for i, st in osd.pop("state").items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the optimizer state of the header is malformed: {err}") from err
    for key, t in tensors.items():
        if key.startswith("optimizer/"):
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise ValueError(f"{path}: unexpected tensor {key!r} in the checkpoint")
            state.setdefault(int(parts[1]), {})[parts[2]] = t
    return {"state": state, **osd}


def _check_optimizer_state(
    path: Path,
    osd: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    cores: dict[str, tuple[int, ...]],
    factor_shapes: dict[str, tuple[int, ...]],
) -> None:
    """Check the optimizer state against ``optimizer`` and the shapes the parameters will have."""
    from .optimizer import DLRTOptimizer

    if isinstance(optimizer, DLRTOptimizer):
        try:
            optimizer.check_state_dict(osd, cores=cores)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        return
    # Any other torch optimizer: the groups must match, and a state tensor is a scalar or has its parameter's shape.
    groups, saved_groups = optimizer.param_groups, osd["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved_groups]
    if sizes != [len(g["params"]) for g in groups]:
        raise ValueError(
            f"{path}: the optimizer state has parameter groups of sizes {sizes}, the optimizer "
            f"{[len(g['params']) for g in groups]}: it belongs to another model or optimizer"
        )
    flat = [p for g in groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    for idx, st in osd["state"].items():
        if not 0 <= idx < len(flat):
            raise ValueError(f"{path}: optimizer state for parameter #{idx}, the optimizer has {len(flat)}")
        name = names.get(id(flat[idx]), f"#{idx}")
        want = factor_shapes.get(name, tuple(flat[idx].shape))
        for key, val in st.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0 and tuple(val.shape) != want:
                raise ValueError(
                    f"{path}: optimizer state {key!r} of parameter {name!r} has shape {tuple(val.shape)}, "
                    f"expected {want}"
                )


def _optimizer_undo(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    # load_state_dict replaces state and param_groups with new objects: keeping the old ones is enough.
    undo = {"state": optimizer.state, "param_groups": optimizer.param_groups}
    for attr in ("phase", "steps"):
        if hasattr(optimizer, attr):
            undo[attr] = getattr(optimizer, attr)
    return undo


def _optimizer_redo(optimizer: torch.optim.Optimizer, undo: dict[str, Any]) -> None:
    optimizer.state = undo["state"]
    optimizer.param_groups = undo["param_groups"]
    for attr in ("phase", "steps"):
        if attr in undo:
            setattr(optimizer, attr, undo[attr])
    if hasattr(optimizer, "_set_request"):
        optimizer._set_request(optimizer.integrator.request(optimizer.phase))
