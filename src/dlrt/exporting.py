"""The compressed model as a deployable artifact: plain torch modules, a ``torch.export`` program or safetensors.

:func:`to_plain` turns every low-rank layer into ``nn.Linear`` / ``nn.Conv2d``
modules computing the same function — the two thin factors of the layer
(``Vᵀ``, then ``U S``) where they cost less than the dense weight, the dense
weight otherwise — and every GeoLoRA adapter into its merged base layer (or the
frozen layer plus its factored update). :func:`export` writes that plain model
as a ``torch.export`` program (``.pt2``, loadable without dlrt) or as a
safetensors file of its weights with a description of every exported layer.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_write
from .layers import FactorizedLayer, LowRankConv2d, LowRankLinear, TuckerConv2d
from .layers.adapter import LowRankAdapter
from .layers.base import LowRankLayer
from .layers.registry import lowrank_types
from .selection import set_submodule

FORMATS = ("pt2", "safetensors")
RULES = ("flops", "factored", "dense")
#: The ``format`` entry of an exported safetensors file's metadata.
SAFETENSORS_FORMAT = "dlrt-export"
SAFETENSORS_VERSION = 1


class AddBranches(nn.Module):
    """``base(x) + scaling · update(x)``: an unmerged adapter as plain modules (see :func:`to_plain`)."""

    def __init__(self, base: nn.Module, update: nn.Module, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.update = update
        self.scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.update(x)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")


def factored_is_cheaper(layer: LowRankLayer) -> bool:
    """Whether ``layer``'s two thin factors cost fewer multiply-adds than its dense weight.

    Per output position (a row of a linear layer, a pixel of a convolution) the
    factors ``Vᵀ`` (``r×m``) and ``U S`` (``n×r``) cost ``r (n + m)``, the dense
    ``n×m`` weight ``n m``; ``r`` is the inner dimension (the core's columns).
    """
    n, m = layer.shape
    r = layer.S.shape[1]
    return r * (n + m) < n * m


@torch.no_grad()
def _plain_layer(layer: LowRankLayer, rule: str) -> tuple[nn.Module, dict[str, Any]]:
    """The plain modules of one matrix-format layer, and its description for the metadata."""
    n, m = layer.shape
    r = layer.S.shape[1]
    factored = rule == "factored" or (rule == "flops" and factored_is_cheaper(layer))
    linear = isinstance(layer, LowRankLinear)
    info: dict[str, Any] = {
        "kind": "linear" if linear else "conv",
        "form": "factored" if factored else "dense",
        "shape": [n, m],
        "rank": r,
    }
    if not factored:
        return layer.to_dense(), info
    kw = {"device": layer.U.device, "dtype": layer.U.dtype}
    has_bias = layer.bias is not None
    US = layer.U @ layer.S  # n × r: S folded into the second factor
    if linear:
        first: nn.Module = nn.Linear(m, r, bias=False, **kw)
        second: nn.Module = nn.Linear(r, n, bias=has_bias, **kw)
        first.weight.copy_(layer.V.mT)
        second.weight.copy_(US)
    else:
        assert isinstance(layer, LowRankConv2d)
        first = layer._dense_conv(False, kw["device"], kw["dtype"], out_channels=r)  # the k×k conv into r channels
        second = nn.Conv2d(r, n, 1, bias=has_bias, **kw)
        first.weight.copy_(layer._kernel(layer.V))  # the r filters Vᵀ, as the layer's forward applies them
        second.weight.copy_(US.reshape(n, r, 1, 1))
    if has_bias:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second), info


def _unsupported(name: str, module: nn.Module) -> ValueError:
    where = f"layer {name!r}" if name else "the model"
    if isinstance(module, TuckerConv2d):
        return ValueError(
            f"{where} is a TuckerConv2d: exporting the Tucker format in factored form is not supported yet; "
            'pass rule="dense" to export it as the dense nn.Conv2d it computes'
        )
    return ValueError(
        f"{where} is a {type(module).__name__}, which to_plain does not know how to export "
        "(it handles LowRankLinear, LowRankConv2d, TuckerConv2d with rule='dense' and LowRankAdapter); "
        "replace it by plain modules first"
    )


@torch.no_grad()
def _replacement(name: str, module: nn.Module, rule: str, merged: bool) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(module, LowRankAdapter):
        if merged:
            base = module.merged()  # the base layer with scaling · U S Vᵀ added to its weight (the copy's)
            return base, {"kind": "adapter", "form": "merged", "shape": list(module.lora.shape), "rank": module.rank}
        lora = module.lora
        if not isinstance(lora, (LowRankLinear, LowRankConv2d)):
            raise _unsupported(f"{name}.lora" if name else "lora", lora)
        update, info = _plain_layer(lora, rule)
        return AddBranches(module.base_layer, update, module.scaling), {**info, "kind": f"adapter-{info['kind']}"}
    if isinstance(module, (LowRankLinear, LowRankConv2d)):
        return _plain_layer(module, rule)
    if isinstance(module, TuckerConv2d) and rule == "dense":
        n, m = module.shape
        return module.to_dense(), {"kind": "conv", "form": "dense", "shape": [n, m], "rank": list(module.ranks)}
    raise _unsupported(name, module)


def _dlrt_kinds() -> tuple[type, ...]:
    return (*lowrank_types(), FactorizedLayer, LowRankAdapter)


def _plain_with_info(model: nn.Module, rule: str, merged: bool) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    _check_rule(rule)
    from .peft.model import GeoLoRAModel  # imported here: dlrt.peft imports the optimizer stack

    plain = copy.deepcopy(model)
    if isinstance(plain, GeoLoRAModel):
        plain = plain.base_model  # its forward only calls the base model's
    kinds = _dlrt_kinds()
    found: list[tuple[str, nn.Module]] = []
    for name, module in plain.named_modules():
        if isinstance(module, GeoLoRAModel):
            raise _unsupported(name, module)
        if isinstance(module, kinds) and not any(not outer or name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    infos: dict[str, dict[str, Any]] = {}
    replaced: list[tuple[str, nn.Module]] = []
    for name, module in found:
        new, info = _replacement(name, module, rule, merged)
        new.train(module.training)
        replaced.append((name, new))
        infos[name] = info
    for name, new in replaced:
        if name:
            set_submodule(plain, name, new)
        else:
            plain = new
    for name, module in plain.named_modules():
        if isinstance(module, kinds):  # not reached for the kinds handled above
            raise _unsupported(name, module)
    return plain, infos


def to_plain(model: nn.Module, *, rule: str = "flops", merged: bool = True) -> nn.Module:
    """A deep copy of ``model`` in plain torch modules computing the same function (``model`` is untouched).

    * :class:`~dlrt.LowRankLinear` → ``nn.Sequential(nn.Linear(m, r, bias=False), nn.Linear(r, n))``
      with weights ``Vᵀ`` and ``U S`` (the layer's bias on the second);
      :class:`~dlrt.LowRankConv2d` → ``nn.Sequential(nn.Conv2d(in, r, k×k, ...), nn.Conv2d(r, out, 1))``
      with the ``r`` filters ``Vᵀ`` (the layer's stride, padding, dilation and
      padding mode) and ``U S``. Where those factors cost at least the dense
      weight (``r (n + m) ≥ n m`` multiply-adds per output position) the layer
      becomes the dense ``nn.Linear`` / ``nn.Conv2d`` (its ``to_dense()``) instead.
    * :class:`~dlrt.layers.LowRankAdapter` (GeoLoRA): with ``merged=True`` its base
      layer with the update merged into the weight (as
      :meth:`~dlrt.peft.GeoLoRAModel.merge_and_unload`); with ``merged=False`` an
      :class:`AddBranches` of the frozen base layer and the update in the form
      ``rule`` picks. A :class:`~dlrt.peft.GeoLoRAModel` is unwrapped to its base model.

    The result is in ``model``'s training mode; dropout of an unmerged adapter is dropped.

    Args:
        model: a model holding low-rank layers (or one such layer).
        rule: ``"flops"`` (the cheaper form per layer), ``"factored"`` or ``"dense"`` (that form everywhere).
        merged: merge GeoLoRA updates into their base layers.

    Raises:
        ValueError: an unknown ``rule``; a :class:`~dlrt.TuckerConv2d` with a rule other than ``"dense"``
            (its factored form is not supported yet); any other dlrt layer type.
    """
    return _plain_with_info(model, rule, merged)[0]


def _check_inputs(example_inputs: Any, dynamic_batch: bool) -> tuple[Tensor, ...]:
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise TypeError(f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"example_inputs[{i}] is a {type(x).__name__}, not a tensor")
        if dynamic_batch and (x.dim() == 0 or x.shape[0] < 2):
            raise ValueError(
                f"example_inputs[{i}] has shape {tuple(x.shape)}: a dynamic batch dimension needs a batch of at "
                "least 2 in the example (torch.export specializes a size-1 dimension); or pass dynamic_batch=False"
            )
    if dynamic_batch and len({x.shape[0] for x in example_inputs}) > 1:
        raise ValueError("with dynamic_batch=True every example input must have the same batch size (dim 0)")
    return example_inputs


def export(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    format: str = "pt2",
    rule: str = "flops",
    merged: bool = True,
    dynamic_batch: bool = True,
    optimizer: Any = None,
) -> Path:
    """Write ``model`` as plain torch modules (:func:`to_plain`) to ``path`` atomically; returns ``path``.

    Formats:

    * ``"pt2"``: ``torch.export.export`` of the plain model in eval mode on
      ``example_inputs``, saved by ``torch.export.save``; ``torch.export.load(path).module()``
      runs it without dlrt installed. With ``dynamic_batch`` dimension 0 of every input
      is dynamic (the example batch must be at least 2).
    * ``"safetensors"``: the plain model's ``state_dict`` and, in the metadata entry
      ``"dlrt_export"``, a JSON document with every exported layer (by module name):
      ``kind`` (``linear``, ``conv``, ``adapter``, ``adapter-linear``, ``adapter-conv``),
      ``form`` (``factored``, ``dense``, ``merged``), ``shape`` (``[n, m]``) and ``rank``.
      It loads into ``to_plain(model, rule=..., merged=...)`` (which needs dlrt for an
      unmerged adapter's :class:`AddBranches`).

    A model in the middle of a coefficient cycle (:class:`~dlrt.DLRTOptimizer` with
    ``coefficient_steps > 1`` and ``phase != 0``) sits on augmented bases: pass its
    ``optimizer`` and ``optimizer.finish_cycle()`` is called first (this changes the
    live model, as a full cycle's end would). Without it the export cannot tell,
    and writes the model's current (augmented) factors, which compute its current function.

    Everything is validated, and the plain model built and exported, before the file
    is written; on an error nothing is written.

    Raises:
        ValueError: an unknown ``format`` or ``rule``, a bad batch dimension, an unsupported layer (:func:`to_plain`).
        TypeError: ``example_inputs`` is not a tuple of tensors.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    _check_rule(rule)
    inputs = _check_inputs(example_inputs, dynamic_batch)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name")
    if optimizer is not None and getattr(optimizer, "phase", 0) != 0:
        _plain_with_info(model, rule, merged)  # an unsupported layer fails here, before the live model changes
        optimizer.finish_cycle()
    plain, infos = _plain_with_info(model, rule, merged)
    plain.eval()
    if format == "pt2":
        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch")
            dynamic_shapes = tuple({0: batch} for _ in inputs)
        program = torch.export.export(plain, inputs, dynamic_shapes=dynamic_shapes)
        buf = io.BytesIO()
        torch.export.save(program, buf)  # to memory first: torch.export.save wants a *.pt2 name or a buffer
        data = buf.getvalue()
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

    from safetensors.torch import save_file

    tensors = {key: t.detach().cpu().contiguous().clone() for key, t in plain.state_dict().items()}
    meta = {
        "format": SAFETENSORS_FORMAT,
        "version": SAFETENSORS_VERSION,
        "rule": rule,
        "merged": bool(merged),
        "layers": infos,
    }
    header = json.dumps(meta, allow_nan=False)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"dlrt_export": header}))
