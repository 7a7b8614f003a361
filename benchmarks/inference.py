"""Inference of trained low-rank models against their dense twins: latency, throughput, file size, memory.

Every model is a trained run (trained here first if ``--runs-dir`` lacks it):

* ``mlp1024``, ``mlp2048``, ``mlp4096``: ``configs/mlp_mnist.yaml`` with three hidden layers of
  that width and τ = 0.1 (two epochs; one at width 4096), at the ranks that run reaches;
* ``lenet5``: ``dlrt train`` with its defaults (the demo); ``vgg_small``: ``model=vgg_small epochs=1``;
* ``minilm``: ``dlrt finetune`` with its defaults (GeoLoRA adapters on MiniLM-L6).

Forms of each model, all plain torch modules (:func:`dlrt.exporting.plain_and_layers`):
``dense`` (every layer its dense weight: the dense model's cost), ``flops`` (the exporter's
default rule), ``measured`` (each layer's faster form, timed on its input at the batch size
being measured), ``factored`` (every layer factored). Forms that came out the same as an
earlier one are timed once and say so (``same_as``). MiniLM: ``base`` (the pretrained model,
no adapters), ``merged`` and ``unmerged`` GeoLoRA.

Backends: eager PyTorch (inference mode), ``torch.compile`` and onnxruntime (the file
``dlrt.export(format="onnx")`` writes); on request also ``compile-max``:
``torch.compile(mode="max-autotune-no-cudagraphs")`` with Inductor's freezing (the weights
folded in as constants; Inductor then times its own GEMM kernels against the library's for
every product and keeps the faster). Each (model, backend, batch) times its forms in
interleaved rounds (one call of every form per round, in a random order) and reports
medians and the ratios to ``dense`` (``base`` for MiniLM) measured in the same rounds.
File sizes are those of the ``.pt2``, ``.onnx`` and ``.safetensors`` files; memory is the
weights' bytes and the peak resident-memory growth of a fresh process that loads the
``.pt2`` and runs one batch (CPU), or CUDA's peak allocation.

    python benchmarks/inference.py --threads 2                    # every model; trains missing runs
    python benchmarks/inference.py --models mlp2048 lenet5 --backends eager onnxruntime
    python benchmarks/inference.py --device cuda --backends eager compile
    python benchmarks/inference.py --models mlp2048 --backends eager compile compile-max --block 20

Results: ``benchmarks/results/inference.json`` and ``inference.png``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchlib import environment, load_average, print_checks, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Spec:
    command: str  # train | finetune
    args: tuple[str, ...]  # the run's key=value (and --config) arguments
    batches_cpu: tuple[int, ...] = (1, 32, 256)


MLP = ("--config", "configs/mlp_mnist.yaml", "tau=0.1", "epochs=2")
SPECS = {
    "mlp1024": Spec("train", (*MLP, "hidden=[1024,1024,1024]")),
    "mlp2048": Spec("train", (*MLP, "hidden=[2048,2048,2048]")),
    # One epoch at width 4096: an epoch takes about half an hour on the project's 2-core machine.
    "mlp4096": Spec("train", ("--config", "configs/mlp_mnist.yaml", "tau=0.1", "epochs=1", "hidden=[4096,4096,4096]")),
    "lenet5": Spec("train", ()),
    "vgg_small": Spec("train", ("model=vgg_small", "epochs=1")),
    # A MiniLM forward of 256 sequences takes seconds on a CPU: batches up to 32 there.
    "minilm": Spec("finetune", (), batches_cpu=(1, 32)),
}
DEFAULT_BACKENDS = ("eager", "compile", "onnxruntime")
# compile-max autotunes every product: minutes per form; aoti compiles a package per form (tens of seconds)
BACKENDS = (*DEFAULT_BACKENDS, "compile-max", "aoti")
COMPILED = ("compile", "compile-max", "aoti")  # timed against eager in the same rounds (compile_vs_eager)


# ------------------------------------------------------------------ runs and forms
def ensure_run(name: str, runs_dir: Path) -> Path:
    """The run directory of model ``name``, trained (``dlrt train`` / ``dlrt finetune``) if it is missing."""
    run = runs_dir / name
    if (run / "summary.json").is_file():
        return run
    spec = SPECS[name]
    args = [*spec.args, f"name={name}", f"runs_dir={runs_dir}", "progress=false", "plots=false"]
    cmd = [sys.executable, "-m", "dlrt", spec.command, *args]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run


def load(name: str, run: Path, n: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The run's model (eval mode, CPU), ``n`` test inputs (repeated if the test set is smaller), its summary."""
    from dlrt.training.export_run import load_finetune_run, load_train_run

    if SPECS[name].command == "train":
        model, inputs = load_train_run(run, n)
    else:
        model, inputs = load_finetune_run(run, n, merged=True)
    return model, inputs, json.loads((run / "summary.json").read_text())


def _forms_key(layers: dict[str, dict[str, Any]]) -> tuple:
    return tuple(sorted((k, v["form"]) for k, v in layers.items()))


def build_forms(
    name: str, model: nn.Module, example: tuple[torch.Tensor, ...], built: dict[str, Any]
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The plain forms of the model (see the module docstring) and, for each, its per-layer forms or ``same_as``.

    ``built`` keeps the forms that do not depend on the batch (all but ``measured``) from one batch to the next.
    """
    from dlrt.exporting import plain_and_layers

    def plain(rule: str, **kw: Any) -> tuple[nn.Module, dict[str, Any]]:
        if rule == "measured":
            return plain_and_layers(model, rule=rule, example_inputs=example)
        if rule not in built:
            built[rule] = plain_and_layers(model, rule="flops" if name == "minilm" else rule, **kw)
        return built[rule]

    forms: dict[str, nn.Module] = {}
    info: dict[str, Any] = {}
    if name == "minilm":
        if "base" not in built:
            built["base"] = (_base_without_adapters(copy.deepcopy(model)), {})
        for form, merged in (("base", None), ("merged", True), ("unmerged", False)):
            module, layers = plain(form, merged=merged)
            forms[form], info[form] = module.eval(), {"layers": layers}
        return forms, info
    seen: dict[tuple, str] = {}
    for rule in ("dense", "flops", "measured", "factored"):
        module, layers = plain(rule)
        key = _forms_key(layers)
        if key in seen:
            info[rule] = {"same_as": seen[key], "layers": layers}
            continue
        seen[key] = rule
        forms[rule], info[rule] = module.eval(), {"layers": layers}
    return forms, info


def _base_without_adapters(model: nn.Module) -> nn.Module:
    """``model`` (changed) with every adapter replaced by its frozen layer: the model before fine-tuning."""
    from dlrt.exporting import _unwrap
    from dlrt.layers.adapter import LowRankAdapter
    from dlrt.selection import set_submodule

    model = _unwrap(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankAdapter):
            set_submodule(model, name, module.base_layer)
    return model


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls: dict[str, Any], repeats: int, device: torch.device, block: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each call over ``repeats`` rounds; each round times every one once, in a random order.

    Random (seeded), not rotated: in a rotation a call always follows the same neighbour,
    and one that follows a call on the same weights (the eager and compiled runs of one
    form) finds them in cache while its twin follows the dense model and does not.

    Each sample is ``block`` calls in a row, divided by ``block``. With ``block=1`` every
    call follows a different model and starts from caches that model has filled (a server
    that alternates models); with a larger block most calls find their own weights and
    code in cache (a server that calls one model back to back).
    """
    names = list(calls)
    for name in names:  # warm-up (compilation, onnxruntime's first run, caches)
        calls[name]()
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                calls[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / block)
    return times


def eager_call(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    def call():
        with torch.inference_mode():
            module(*inputs)

    return call


def compiled_call(module: nn.Module, inputs: tuple[torch.Tensor, ...], tuned: bool = False):
    """A call of ``torch.compile(module)``; ``tuned``: max-autotune with frozen weights, compiled here."""
    if not tuned:
        compiled = torch.compile(module)
    else:
        # Freezing is read when the graph compiles, i.e. at the first call: make that call now.
        # A copy: the eager twin timed beside it keeps its own module, whatever freezing does with this one.
        compiled = torch.compile(copy.deepcopy(module), mode="max-autotune-no-cudagraphs")
        with torch._inductor.config.patch(freezing=True), torch.inference_mode():
            compiled(*inputs)

    def call():
        with torch.inference_mode():
            compiled(*inputs)

    return call


def aoti_call(path: Path, inputs: tuple[torch.Tensor, ...]):
    """A call of the AOTInductor package at ``path`` (``dlrt.export(format="aoti")``), loaded as a user would."""
    runner = torch._inductor.aoti_load_package(str(path))

    def call():
        with torch.inference_mode():
            runner(*inputs)

    return call


def onnx_call(path: Path, inputs: tuple[torch.Tensor, ...], threads: int, device: torch.device):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}

    def call():
        session.run(None, feed)

    return call


# ------------------------------------------------------------------ files and memory
_MEMORY_PROBE = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[3]))


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


inputs = torch.load(sys.argv[2], weights_only=True)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current resident size
program = torch.export.load(sys.argv[1]).module()
with torch.inference_mode():
    program(*inputs)
print(status("VmHWM") - before)
"""


def peak_rss_growth(pt2: Path, inputs: tuple[torch.Tensor, ...], threads: int, tmp: Path) -> int:
    """Bytes the peak resident memory of a fresh process grows by to load ``pt2`` and run one batch."""
    saved = tmp / "memory_inputs.pt"
    torch.save(tuple(x.cpu() for x in inputs), saved)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(pt2), str(saved), str(threads)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(out.stdout.strip().splitlines()[-1])


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


# ------------------------------------------------------------------ one model
def _export(module: nn.Module, layers: dict[str, Any], inputs: tuple[torch.Tensor, ...], path: Path, fmt: str) -> Path:
    from dlrt.exporting import save_plain

    if inputs[0].shape[0] < 2:  # the batch dimension is dynamic: trace on two examples
        inputs = tuple(torch.cat([x, x]) for x in inputs)
    return save_plain(module, layers, inputs, path, format=fmt)


def bench_model(name: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    run = ensure_run(name, args.runs_dir)
    batches = args.batches or (SPECS[name].batches_cpu if device.type == "cpu" else (1, 32, 256))
    model, pool, summary = load(name, run, max(max(batches), 2))
    model.to(device)
    pool = tuple(x.to(device) for x in pool)
    ref = "base" if name == "minilm" else "dense"
    record: dict[str, Any] = {
        "run": str(run),
        "test_acc": summary.get("test_acc"),
        "compression": summary.get("compression"),
        "ranks": summary.get("ranks"),
        "reference": ref,
        "batches": {},
    }
    written: dict[tuple, Path] = {}
    built: dict[str, Any] = {}

    def exported(form: str, module: nn.Module, info: dict[str, Any], inputs: tuple[torch.Tensor, ...], fmt: str):
        """The form written as ``fmt`` (``onnx`` or ``aoti``), once for all batches."""
        key = (form, _forms_key(info[form]["layers"]), fmt)
        if key not in written:
            path = tmp / (f"{name}-{form}-{len(written)}" + (".onnx" if fmt == "onnx" else ".aoti.pt2"))
            written[key] = _export(module, info[form]["layers"], inputs, path, fmt)
        return written[key]

    for b in batches:
        torch._dynamo.reset()
        inputs = tuple(x[:b] for x in pool)
        forms, info = build_forms(name, model, inputs, built)
        entry: dict[str, Any] = {"forms": info, "backends": {}}
        for backend in args.backends:
            calls: dict[str, Any] = {}
            for form, module in forms.items():
                if backend == "eager":
                    calls[form] = eager_call(module, inputs)
                elif backend in COMPILED:
                    if backend == "aoti":  # one package per form: its batch dimension is dynamic
                        calls[form] = aoti_call(exported(form, module, info, inputs, "aoti"), inputs)
                    else:
                        calls[form] = compiled_call(module, inputs, tuned=backend == "compile-max")
                    calls[f"eager/{form}"] = eager_call(module, inputs)  # compile vs eager in the same rounds
                else:
                    path = exported(form, module, info, inputs, "onnx")
                    calls[form] = onnx_call(path, inputs, args.threads, device)
            times = interleaved(calls, args.repeats, device, args.block)
            med = {k: statistics.median(v) for k, v in times.items()}
            out = {
                "median_s": med,
                "speedup": {k: med[ref] / v for k, v in med.items() if "/" not in k},
                "throughput": {k: b / v for k, v in med.items()},
            }
            if backend in COMPILED:
                out["compile_vs_eager"] = {f: med[f"eager/{f}"] / med[f] for f in forms}
            entry["backends"][backend] = out
            shown = ", ".join(f"{k} {1e3 * v:.3f} ms ({med[ref] / v:.2f}×)" for k, v in med.items() if "/" not in k)
            print(f"{name} batch {b} {backend}: {shown}", flush=True)
        record["batches"][str(b)] = entry
    # Files and memory, of the forms at the largest batch.
    files: dict[str, Any] = {}
    for form, module in forms.items():
        layers = info[form]["layers"]
        pt2 = _export(module, layers, inputs, tmp / f"{name}-{form}.pt2", "pt2")
        sizes = {"pt2": pt2.stat().st_size}
        if "onnxruntime" in args.backends:
            sizes["onnx"] = written[(form, _forms_key(layers), "onnx")].stat().st_size
        sizes["safetensors"] = _export(module, layers, inputs, tmp / f"{name}-{form}.st", "safetensors").stat().st_size
        memory = {"weight_bytes": weight_bytes(module)}
        if device.type == "cpu":
            memory["peak_rss_growth_bytes"] = peak_rss_growth(pt2, inputs, args.threads, tmp)
        else:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            with torch.inference_mode():
                module(*inputs)
            memory["cuda_peak_bytes_over_weights"] = torch.cuda.max_memory_allocated(device) - before
        files[form] = {"bytes": sizes, "memory": memory, "batch": int(inputs[0].shape[0])}
        print(f"{name} {form}: files {sizes}, memory {memory}", flush=True)
    record["files"] = files
    return record


# ------------------------------------------------------------------ targets, plot
def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, at_least: float) -> None:
        out.append({"name": name, "value": value, "ok": bool(value >= at_least)})

    for model, r in results.items():
        if model.startswith("mlp") and int(model[3:]) >= 2048 and (r["compression"] or 0) >= 0.9:
            for b in ("32", "256"):
                for backend in ("eager", "onnxruntime"):
                    speed = r["batches"].get(b, {}).get("backends", {}).get(backend, {}).get("speedup", {})
                    if "flops" in speed:
                        add(
                            f"{model} batch {b} {backend}: factored ≥ 3× faster than dense",
                            speed["flops"],
                            3.0,
                        )
            f = r["files"]
            if "dense" in f and "flops" in f:
                ratio = f["dense"]["bytes"]["pt2"] / f["flops"]["bytes"]["pt2"]
                add(f"{model}: .pt2 file ≥ 8× smaller than dense", ratio, 8.0)
        if model == "lenet5" and "256" in r["batches"]:
            speed = r["batches"]["256"]["backends"].get("eager", {}).get("speedup", {})
            for rule in ("flops", "measured"):
                form = rule if rule in speed else r["batches"]["256"]["forms"].get(rule, {}).get("same_as")
                if form in speed:
                    add(f"lenet5 batch 256 eager: rule={rule} no slower than dense", speed[form], 1.0)
        if model == "minilm":
            for b, e in r["batches"].items():
                speed = e["backends"].get("eager", {}).get("speedup", {})
                if "merged" in speed:
                    add(
                        f"minilm batch {b} eager: merged within 2 % of the base model",
                        speed["merged"],
                        0.98,
                    )
        if model != "minilm":
            for b, e in r["batches"].items():
                for backend in COMPILED:
                    comp = e["backends"].get(backend, {}).get("compile_vs_eager", {})
                    if "flops" in comp and int(b) >= 32:
                        add(
                            f"{model} batch {b} {backend}: compiled low-rank model at least as fast as eager",
                            comp["flops"],
                            1.0,
                        )
    return out


def plot(results: dict[str, Any], backends: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False, sharey=True)
    for ax, backend in zip(axes[0], backends):
        labels, values = [], []
        for model, r in results.items():
            form = "merged" if model == "minilm" else "flops"
            for b, e in r["batches"].items():
                speed = e["backends"].get(backend, {}).get("speedup", {})
                if form in speed:
                    labels.append(f"{model}\\nb={b}")
                    values.append(speed[form])
        ax.bar(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{backend}: exported model vs dense")
    axes[0][0].set_ylabel("speed-up (dense time / exported time)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=BACKENDS)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 32 256 (MiniLM on a CPU: 1 32)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per (model, backend, batch)")
    p.add_argument(
        "--block", type=int, default=1, help="calls in a row per timed sample (1: each call follows another model)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "inference")
    p.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "inference.png")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches or ()):
        p.error("--batches must be positive")
    if args.block < 1:
        p.error("--block must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, limit):  # every form is its own module: let each compile rather than fall back to eager
            setattr(config, limit, 4096)
    load_before = load_average("before")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = bench_model(name, args, device, Path(tmp))
    record = {
        "environment": environment(args),
        "device": str(device),
        "load_average": {"before": load_before, "after": load_average("after")},
        "models": results,
        "checks": checks(results),
    }
    print_checks(record["checks"])
    plot(results, args.backends, args.plot)
    return write_results(args, record)


if __name__ == "__main__":
    sys.exit(main())
