"""Checkpoints that survive rank changes: safetensors for tensors, JSON for the rest.

One file: the tensors of the model (and optimizer) in safetensors format, and
in its metadata a JSON document with every layer's ranks and bounds, the
optimizer's hyper-parameters and integrator state, and the caller's extras.
Nothing is unpickled. The file is written next to its destination and renamed
over it, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import LowRankLayer
from .model import lowrank_layers

FORMAT = "dlrt-checkpoint"
VERSION = 1


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        model: the model; its low-rank layers' ranks are recorded.
        optimizer: a :class:`~dlrt.DLRTOptimizer` (or any torch optimizer whose
            state is tensors and JSON values).
        extra: JSON-serializable values stored alongside (epoch, config, ...).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        # safetensors refuses tensors sharing memory (tied weights): store copies.
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[key] = t.contiguous().cpu()

    for key, t in model.state_dict().items():
        put(f"model/{key}", t)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "layers": {
            name: {
                "type": type(layer).__name__,
                "shape": list(layer.shape),
                "core": list(layer.S.shape),
                "min_rank": layer.min_rank,
                "max_rank": layer.max_rank,
            }
            for name, layer in lowrank_layers(model)
        },
        "extra": extra or {},
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"dlrt": header}))
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or an exception leaves ``path`` as it was (and no temporary file behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``).

    Low-rank layers are resized to the saved ranks first, so a model built at
    any rank loads a checkpoint taken after rank adaptation. Returns the
    ``extra`` dict given to :func:`save`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a dlrt checkpoint, or its layer names, types or shapes
            do not match ``model`` (the message names the layer).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("dlrt")
            # Fresh (aligned) allocations: BLAS kernels may round differently on unaligned
            # buffers, which would break bit-identical resumption.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a dlrt checkpoint (no 'dlrt' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} v{meta.get('version')}")

    mine = dict(lowrank_layers(model))
    saved = meta["layers"]
    missing = sorted(set(saved) - set(mine))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint has low-rank layers {missing} that the model does not have as low-rank "
            "layers (convert the model the same way before loading)"
        )
    unexpected = sorted(set(mine) - set(saved))
    if unexpected:
        raise ValueError(f"{path}: the model's low-rank layers {unexpected} are not in the checkpoint")
    for name, info in saved.items():
        layer = mine[name]
        if type(layer).__name__ != info["type"] or list(layer.shape) != info["shape"]:
            raise ValueError(
                f"{path}: layer {name!r} is a {type(layer).__name__} of shape {list(layer.shape)} in the model "
                f"but a {info['type']} of shape {info['shape']} in the checkpoint"
            )

    model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    # Validate names and shapes of the dense part before touching anything.
    target = model.state_dict()
    factor_keys = {f"{n}.{p}" if n else p for n in saved for p in ("U", "S", "V")}
    missing_keys = sorted(set(target) - set(model_sd))
    unexpected_keys = sorted(set(model_sd) - set(target))
    if missing_keys or unexpected_keys:
        raise ValueError(
            f"{path}: parameter names do not match the model: missing {missing_keys[:10]}, "
            f"unexpected {unexpected_keys[:10]}"
        )
    for key, t in model_sd.items():
        if key not in factor_keys and tuple(target[key].shape) != tuple(t.shape):
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(t.shape)} in the checkpoint "
                f"but {tuple(target[key].shape)} in the model"
            )

    for name, info in saved.items():
        layer: LowRankLayer = mine[name]
        r_u, r_v = info["core"]
        n, m = info["shape"]
        empty = layer.U.new_empty
        layer.set_factors(empty(n, r_u), empty(r_u, r_v), empty(m, r_v))
        layer.min_rank, layer.max_rank = info["min_rank"], info["max_rank"]
    model.load_state_dict(model_sd, strict=True)

    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path} holds no optimizer state (it was saved without optimizer=)")
        osd = dict(meta["optimizer"])
        state: dict[int, dict[str, Any]] = {int(i): dict(st) for i, st in osd.pop("state").items()}
        for key, t in tensors.items():
            if key.startswith("optimizer/"):
                _, idx, name = key.split("/", 2)
                state.setdefault(int(idx), {})[name] = t
        optimizer.load_state_dict({"state": state, **osd})
    return meta.get("extra", {})
