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
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import linalg
from .io import atomic_write
from .layers import FactorizedLayer, LowRankConv2d, LowRankLinear, TuckerConv2d
from .layers.adapter import LowRankAdapter
from .layers.base import LowRankLayer
from .layers.registry import lowrank_types
from .selection import set_submodule

FORMATS = ("pt2", "aoti", "onnx", "safetensors")
RULES = ("flops", "measured", "factored", "dense")
#: Timed calls of each form per layer under ``rule="measured"`` (the median decides).
MEASURE_REPEATS = 9
#: The ONNX opset of ``format="onnx"``.
ONNX_OPSET = 18
#: onnxruntime's and a compiled package's outputs must match the model's to this, relative to the output's
#: largest entry (plus one).
ONNX_TOLERANCE = 1e-5
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


def factored_is_cheaper(layer: LowRankLayer | TuckerConv2d) -> bool:
    """Whether ``layer``'s factors cost fewer multiply-adds than its dense weight.

    Per output position (a row of a linear layer, a pixel of a convolution) the
    factors ``Vᵀ`` (``r×m``) and ``U S`` (``n×r``) cost ``r (n + m)``, the dense
    ``n×m`` weight ``n m``; ``r`` is the inner dimension (the core's columns).
    A :class:`~dlrt.TuckerConv2d` with core ``r₀×r₁×kh×kw`` costs
    ``in·r₁ + r₀ r₁ kh kw + r₀·out`` against ``out·in·kh·kw``.
    """
    if isinstance(layer, TuckerConv2d):
        r0, r1 = layer.C.shape[:2]
        kernel = layer.kernel_size[0] * layer.kernel_size[1]
        out, inp = layer.out_channels, layer.in_channels
        return inp * r1 + r0 * r1 * kernel + r0 * out < out * inp * kernel
    n, m = layer.shape
    r = layer.S.shape[1]
    return r * (n + m) < n * m


@torch.no_grad()
def _factored_layer(layer: LowRankLayer | TuckerConv2d) -> nn.Module:
    """The factored plain modules of one layer (see :func:`to_plain`)."""
    has_bias = layer.bias is not None
    if isinstance(layer, TuckerConv2d):
        C, U0, U1 = layer.C, layer.U0, layer.U1
        kw = {"device": C.device, "dtype": C.dtype}
        r0, r1 = C.shape[:2]
        reduce = nn.Conv2d(layer.in_channels, r1, 1, bias=False, **kw)  # U₁ᵀ, pointwise: commutes with padding
        core = layer._dense_conv(False, kw["device"], kw["dtype"], out_channels=r0, in_channels=r1)
        expand = nn.Conv2d(r0, layer.out_channels, 1, bias=has_bias, **kw)
        reduce.weight.copy_(U1.mT[:, :, None, None])
        core.weight.copy_(linalg.multi_mode_product(C, [None, None, layer.U2, layer.U3]))
        expand.weight.copy_(U0[:, :, None, None])
        if has_bias:
            expand.bias.copy_(layer.bias)
        return nn.Sequential(reduce, core, expand)
    n, m = layer.shape
    r = layer.S.shape[1]
    kw = {"device": layer.U.device, "dtype": layer.U.dtype}
    US = layer.U @ layer.S  # n × r: S folded into the second factor
    if isinstance(layer, LowRankLinear):
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
    return nn.Sequential(first, second)


@torch.no_grad()
def _time_forms(dense: nn.Module, factored: nn.Module, x: Tensor) -> dict[str, float]:
    """Median seconds of one call of each form on ``x``: after a warm-up call, :data:`MEASURE_REPEATS` calls
    of each in alternation (the order flipped every round)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    forms = {"dense": dense, "factored": factored}
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for module in forms.values():
        module(x)
    for i in range(MEASURE_REPEATS):
        for name in ("dense", "factored") if i % 2 == 0 else ("factored", "dense"):
            sync()
            t0 = time.perf_counter()
            forms[name](x)
            sync()
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in seconds.items()}


@torch.no_grad()
def _plain_layer(
    layer: LowRankLayer | TuckerConv2d, rule: str, layer_input: Tensor | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The plain modules of one layer, and its description for the metadata.

    ``layer_input`` is the layer's input on the example (``rule="measured"``).
    """
    tucker = isinstance(layer, TuckerConv2d)
    n, m = layer.shape
    info: dict[str, Any] = {
        "kind": "tucker-conv" if tucker else ("linear" if isinstance(layer, LowRankLinear) else "conv"),
        "shape": [n, m],
        "rank": list(layer.C.shape) if tucker else layer.S.shape[1],
    }
    if rule in ("dense", "factored"):
        factored = rule == "factored"
    elif rule == "flops" or layer_input is None:  # under "measured", a layer the example did not reach is counted
        factored = factored_is_cheaper(layer)
    else:
        forms = {"dense": layer.to_dense().eval(), "factored": _factored_layer(layer).eval()}
        info["seconds"] = _time_forms(forms["dense"], forms["factored"], layer_input)
        factored = info["seconds"]["factored"] < info["seconds"]["dense"]
        return forms["factored" if factored else "dense"], {**info, "form": "factored" if factored else "dense"}
    if rule == "measured":
        info["seconds"] = None
    module = _factored_layer(layer) if factored else layer.to_dense()
    return module, {**info, "form": "factored" if factored else "dense"}


def _unsupported(name: str, module: nn.Module) -> ValueError:
    where = f"layer {name!r}" if name else "the model"
    return ValueError(
        f"{where} is a {type(module).__name__}, which to_plain does not know how to export "
        "(it handles LowRankLinear, LowRankConv2d, TuckerConv2d and LowRankAdapter); "
        "replace it by plain modules first"
    )


_EXPORTED = (LowRankLinear, LowRankConv2d, TuckerConv2d)


@torch.no_grad()
def _replacement(
    name: str, module: nn.Module, rule: str, merged: bool, layer_input: Tensor | None
) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(module, LowRankAdapter):
        if merged:
            base = module.merged()  # the base layer with scaling · U S Vᵀ added to its weight (the copy's)
            return base, {"kind": "adapter", "form": "merged", "shape": list(module.lora.shape), "rank": module.rank}
        lora = module.lora
        if not isinstance(lora, _EXPORTED):
            raise _unsupported(f"{name}.lora" if name else "lora", lora)
        update, info = _plain_layer(lora, rule, layer_input)
        return AddBranches(module.base_layer, update, module.scaling), {**info, "kind": f"adapter-{info['kind']}"}
    if isinstance(module, _EXPORTED):
        return _plain_layer(module, rule, layer_input)
    raise _unsupported(name, module)


def _dlrt_kinds() -> tuple[type, ...]:
    return (*lowrank_types(), FactorizedLayer, LowRankAdapter)


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: tuple[Any, ...]) -> dict[str, Tensor]:
    """The input of every layer of ``layers`` (its first call) when ``model`` runs on ``inputs`` in eval mode."""
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = args[0].detach()

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers]
    training = model.training
    try:
        model.eval()
        model(*inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return seen


def _unwrap(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`~dlrt.peft.GeoLoRAModel` in it replaced by its base model (whose forward
    is all it calls); ``model`` itself is changed where one is nested."""
    from .peft.model import GeoLoRAModel  # imported here: dlrt.peft imports the optimizer stack

    if isinstance(model, GeoLoRAModel):
        return _unwrap(model.base_model)
    nested = [name for name, m in model.named_modules() if isinstance(m, GeoLoRAModel)]
    for name in nested:
        if not any(name.startswith(outer + ".") for outer in nested if outer != name):
            set_submodule(model, name, model.get_submodule(name).base_model)
    return model


def _find_layers(model: nn.Module, merged: bool) -> list[tuple[str, nn.Module]]:
    """The outermost dlrt layers of ``model`` by name; raises for one :func:`to_plain` cannot export."""
    kinds = _dlrt_kinds()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(not outer or name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    for name, module in found:
        inner = module.lora if isinstance(module, LowRankAdapter) and not merged else module
        if not isinstance(inner, (*_EXPORTED, LowRankAdapter)):
            raise _unsupported(f"{name}.lora" if inner is not module else name, inner)
    return found


def plain_and_layers(
    model: nn.Module, *, rule: str = "flops", merged: bool = True, example_inputs: tuple[Any, ...] | None = None
) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """:func:`to_plain` and the description of every exported layer, by module name.

    Each description has ``kind`` (``linear``, ``conv``, ``tucker-conv``, ``adapter``,
    ``adapter-linear``, ``adapter-conv``), ``form`` (``factored``, ``dense``, ``merged``),
    ``shape`` (``[n, m]``), ``rank`` (the core's shape for a Tucker layer) and, under
    ``rule="measured"``, ``seconds``: the median time of one call of each form on the
    layer's input (``None`` for a layer the example did not reach, decided by FLOPs).
    """
    _check_rule(rule)
    if rule == "measured" and example_inputs is None:
        raise ValueError('rule="measured" times each layer on its input: pass example_inputs (a tuple of tensors)')
    plain = _unwrap(copy.deepcopy(model))
    found = _find_layers(plain, merged)
    inputs: dict[str, Tensor] = {}
    if rule == "measured":
        inputs = _layer_inputs(plain, found, example_inputs)
    infos: dict[str, dict[str, Any]] = {}
    replaced: list[tuple[str, nn.Module]] = []
    for name, module in found:
        new, info = _replacement(name, module, rule, merged, inputs.get(name))
        new.train(module.training)
        replaced.append((name, new))
        infos[name] = info
    for name, new in replaced:
        if name:
            set_submodule(plain, name, new)
        else:
            plain = new
    kinds = _dlrt_kinds()
    for name, module in plain.named_modules():
        if isinstance(module, kinds):  # not reached for the kinds handled above
            raise _unsupported(name, module)
    return plain, infos


def to_plain(
    model: nn.Module, *, rule: str = "flops", merged: bool = True, example_inputs: tuple[Any, ...] | None = None
) -> nn.Module:
    """A deep copy of ``model`` in plain torch modules computing the same function (``model`` is untouched).

    * :class:`~dlrt.LowRankLinear` → ``nn.Sequential(nn.Linear(m, r, bias=False), nn.Linear(r, n))``
      with weights ``Vᵀ`` and ``U S`` (the layer's bias on the second);
      :class:`~dlrt.LowRankConv2d` → ``nn.Sequential(nn.Conv2d(in, r, k×k, ...), nn.Conv2d(r, out, 1))``
      with the ``r`` filters ``Vᵀ`` (the layer's stride, padding, dilation and
      padding mode) and ``U S``;
      :class:`~dlrt.TuckerConv2d` → ``nn.Sequential`` of the ``1×1`` convolution by ``U₁ᵀ``
      into ``r₁`` channels, the ``k×k`` core convolution ``C ×₂ U₂ ×₃ U₃`` into ``r₀``
      channels (the layer's geometry), and the ``1×1`` convolution by ``U₀``.
    * Which layers take the factored form is ``rule``'s choice: ``"flops"`` keeps the
      factors where they cost fewer multiply-adds per output position than the dense
      weight (:func:`factored_is_cheaper`) and takes the dense ``nn.Linear`` /
      ``nn.Conv2d`` (the layer's ``to_dense()``) elsewhere; ``"measured"`` times both
      forms of each layer on its input when the model runs on ``example_inputs``, on
      this machine, and keeps the faster; ``"factored"`` and ``"dense"`` take one form everywhere.
    * :class:`~dlrt.layers.LowRankAdapter` (GeoLoRA): with ``merged=True`` its base
      layer with the update merged into the weight (as
      :meth:`~dlrt.peft.GeoLoRAModel.merge_and_unload`); with ``merged=False`` an
      :class:`AddBranches` of the frozen base layer and the update in the form
      ``rule`` picks. A :class:`~dlrt.peft.GeoLoRAModel` is unwrapped to its base model.

    The result is in ``model``'s training mode; dropout of an unmerged adapter is dropped.

    Args:
        model: a model holding low-rank layers (or one such layer).
        rule: ``"flops"``, ``"measured"``, ``"factored"`` or ``"dense"`` (see above).
        merged: merge GeoLoRA updates into their base layers.
        example_inputs: the inputs ``rule="measured"`` times the layers on (``model(*example_inputs)``).

    Raises:
        ValueError: an unknown ``rule``; ``rule="measured"`` without ``example_inputs``; any other dlrt layer type.
    """
    return plain_and_layers(model, rule=rule, merged=merged, example_inputs=example_inputs)[0]


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


def _check_target(
    example_inputs: Any, path: str | os.PathLike[str], format: str, dynamic_batch: bool
) -> tuple[tuple[Tensor, ...], Path]:
    """The checked inputs and path of a write in ``format`` (its dependencies installed)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    inputs = _check_inputs(example_inputs, dynamic_batch)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name")
    if format == "onnx":
        _require_onnx()
    return inputs, path


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
    * ``"onnx"``: the same program through ``torch.onnx.export`` (the ``torch.export``-based
      exporter, opset :data:`ONNX_OPSET`); before the file is written, onnxruntime runs it
      on ``example_inputs`` and its outputs must match the plain model's. Needs the
      ``export`` extra (``onnx``, ``onnxscript``, ``onnxruntime``).
    * ``"aoti"``: the same program compiled ahead of time by AOTInductor into a package
      (a ``.pt2`` zip holding a shared library) for the model's device and this machine's
      instruction set; ``torch._inductor.aoti_load_package(path)`` returns a callable that
      runs it without dlrt and without compiling again. Before the file is written the
      package must reproduce the plain model's outputs on ``example_inputs``. Needs a C++
      compiler where it is exported. On a CPU the fastest way to run the exported model in
      PyTorch (docs/export.md).
    * ``"safetensors"``: the plain model's ``state_dict`` and, in the metadata entry
      ``"dlrt_export"``, a JSON document with every exported layer (:func:`plain_and_layers`).
      It loads into ``to_plain(model, rule=..., merged=...)`` (which needs dlrt for an
      unmerged adapter's :class:`AddBranches`).

    ``rule="measured"`` times the forms of each layer on its input from ``example_inputs``
    (:func:`to_plain`).

    A model in the middle of a coefficient cycle (:class:`~dlrt.DLRTOptimizer` with
    ``coefficient_steps > 1`` and ``phase != 0``) sits on augmented bases: pass its
    ``optimizer`` and ``optimizer.finish_cycle()`` is called first (this changes the
    live model, as a full cycle's end would). Without it the export cannot tell,
    and writes the model's current (augmented) factors, which compute its current function.

    Everything is validated, and the plain model built and exported (and, for ONNX,
    checked), before the file is written; on an error nothing is written.

    Raises:
        ValueError: an unknown ``format`` or ``rule``, a bad batch dimension, an unsupported layer (:func:`to_plain`),
            an ONNX program whose outputs differ from the model's.
        TypeError: ``example_inputs`` is not a tuple of tensors.
        ImportError: ``format="onnx"`` without onnx, onnxscript or onnxruntime installed.
    """
    _check_rule(rule)
    inputs, path = _check_target(example_inputs, path, format, dynamic_batch)
    if optimizer is not None and getattr(optimizer, "phase", 0) != 0:
        _find_layers(model, merged)  # an unsupported layer fails here, before the live model changes
        optimizer.finish_cycle()
    plain, infos = plain_and_layers(model, rule=rule, merged=merged, example_inputs=inputs)
    return save_plain(plain, infos, inputs, path, format=format, rule=rule, merged=merged, dynamic_batch=dynamic_batch)


def save_plain(
    plain: nn.Module,
    layers: dict[str, dict[str, Any]],
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    format: str = "pt2",
    rule: str = "flops",
    merged: bool = True,
    dynamic_batch: bool = True,
) -> Path:
    """Write a plain model from :func:`plain_and_layers` as :func:`export` does (``rule`` and ``merged``
    only go into the safetensors metadata); for a caller that has already built it, e.g. to
    report ``rule="measured"``'s timings and write the very forms they picked."""
    inputs, path = _check_target(example_inputs, path, format, dynamic_batch)
    plain.eval()
    if format == "safetensors":
        return _write_safetensors(plain, layers, rule, merged, path)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    if format in ("pt2", "aoti"):
        program = torch.export.export(plain, inputs, dynamic_shapes=dynamic_shapes)
        if format == "aoti":
            data = _aoti_bytes(program, plain, inputs)
        else:
            buf = io.BytesIO()
            torch.export.save(program, buf)  # to memory first: torch.export.save wants a *.pt2 name or a buffer
            data = buf.getvalue()
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    data = _onnx_bytes(plain, inputs, dynamic_shapes)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _write_safetensors(plain: nn.Module, infos: dict[str, dict[str, Any]], rule: str, merged: bool, path: Path) -> Path:
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


_ONNX_HINT = "install the export extra: pip install 'dlrt[export]' (onnx, onnxscript, onnxruntime)"


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f'format="onnx" needs {", ".join(missing)}; {_ONNX_HINT}', name=missing[0])


def _flat_tensors(out: Any) -> list[Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, Tensor)]


def _check_outputs(what: str, got: list[Tensor], want: list[Tensor]) -> None:
    """``got`` reproduces ``want`` to :data:`ONNX_TOLERANCE` (relative to the largest output), else a ValueError."""
    if len(got) != len(want):
        raise ValueError(f"the {what} returns {len(got)} outputs, the model {len(want)}; nothing was written")
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.detach().cpu()
        g = g.detach().cpu().to(w.dtype)
        tol = ONNX_TOLERANCE * (1 + float(w.abs().max())) if w.numel() else 0.0
        if g.shape != w.shape or float((g - w).abs().max()) > tol:
            raise ValueError(
                f"the {what}'s output {i} differs from the model's (shape {tuple(g.shape)} vs {tuple(w.shape)}, "
                f"max difference {float((g - w).abs().max()) if g.shape == w.shape else float('nan'):.3g}); "
                "nothing was written"
            )


@torch.no_grad()
def _aoti_bytes(program: Any, plain: nn.Module, inputs: tuple[Tensor, ...]) -> bytes:
    """The AOTInductor package of ``program`` (``plain`` exported) as bytes, once it reproduced ``plain``'s outputs.

    Compiled ahead of time by Inductor into a shared library for the device and the
    instruction set of this machine (a C++ compiler is needed here, not where it is loaded)."""
    import tempfile

    want = _flat_tensors(plain(*inputs))
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.pt2"  # Inductor wants a *.pt2 name
        torch._inductor.aoti_compile_and_package(program, package_path=str(file))
        runner = torch._inductor.aoti_load_package(str(file))
        _check_outputs("compiled package", _flat_tensors(runner(*inputs)), want)
        return file.read_bytes()


@torch.no_grad()
def _onnx_bytes(plain: nn.Module, inputs: tuple[Tensor, ...], dynamic_shapes: Any) -> bytes:
    """The ONNX model of ``plain`` as bytes, after onnxruntime reproduced ``plain``'s outputs on ``inputs``."""
    import tempfile

    import onnxruntime

    want = _flat_tensors(plain(*inputs))
    # The exporter logs a warning per torchvision operator it cannot register when torchvision is absent.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "model.onnx"
            program = torch.onnx.export(
                plain, inputs, dynamo=True, opset_version=ONNX_OPSET, dynamic_shapes=dynamic_shapes, verbose=False
            )
            program.save(str(file), external_data=False)
            data = file.read_bytes()
    finally:
        registration.setLevel(level)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    _check_outputs("ONNX program", [torch.from_numpy(g) for g in session.run(None, feed)], want)
    return data
