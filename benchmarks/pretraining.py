"""Low-rank pre-training of a small language model: DLRT against dense AdamW, a fixed-rank factorization,
GaLore, Fira and APOLLO, at the same model, tokens, steps, schedule and seeds.

Every method trains a fresh copy of the same dense start (``--model``, seeded) on the same
windows of ``--dataset`` (byte tokens, validation held out by document) for ``--steps``
steps through dlrt's one training driver (``dlrt.training.Driver``: the same batches,
schedule and evaluation for all), with a linear warm-up and cosine decay:

* ``dense``: the dense model, AdamW;
* ``dlrt-<integrator>-<optimizer>``: ``dlrt.convert`` at ``--rank`` (a small start) and
  ``dlrt.DLRTOptimizer`` with the gradient rank rule (ranks grow and shrink,
  docs/algorithms.md §1), integrators ``bug``, ``parallel``, ``abc`` × ``adam``, ``geo-adam``;
* ``factorized``: every projection replaced by a plain ``B A`` (``A`` r×in, ``B`` out×r) at a
  fixed rank, trained by AdamW through autograd; its rank (``--fixed-rank``, default
  ``match``) is the one whose stored projection parameters come closest to the first DLRT
  method's at the end (equal stored parameters);
* ``galore``, ``fira``, ``apollo``: the dense model with GaLore's, Fira's or APOLLO's AdamW on
  the projections at ``--projection-rank`` (default ``match``: the first DLRT method's mean
  final rank, "the same rank"), their documented settings otherwise, the rest with their plain
  AdamW. They need the optional packages, pinned in the extra ``pretraining`` of pyproject.toml
  (``pip install --no-deps galore-torch==1.0 fira==1.0.2 apollo-torch==1.0.3 bitsandbytes==0.50.2``;
  galore-torch and apollo-torch import bitsandbytes), and are recorded as skipped without them.

Recorded per method: validation perplexity against steps (every ``--eval-every``) and
against training seconds; stored weights, stored projection weights, optimizer-state bytes,
peak memory of a step (what model and optimizer hold plus the peak allocated during it,
:mod:`dlrt.training.memory`) and the median seconds per step, timed round-robin over all
methods after training so that every method sees the same load. Every figure is also given
as a ratio to dense from the same run. ``--device cuda --bf16`` trains under bf16 autocast.

    python benchmarks/pretraining.py --steps 300 --seeds 0          # CPU, gpt-tiny on Hamlet
    python benchmarks/pretraining.py --summarize benchmarks/results/pretraining.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import math
import shlex
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dlrt
from benchlib import environment, load_average
from dlrt.training.driver import Driver, RunWriter, Task
from dlrt.training.lm import lm_forward, perplexity
from dlrt.training.memory import peak_step_bytes, resident_bytes
from dlrt.training.schedule import lr_factor

PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj")
DLRT_METHODS = [f"dlrt-{i}-{o}" for i in ("bug", "parallel", "abc") for o in ("adam", "geo-adam")]
BASELINES = ["galore", "fira", "apollo"]
METHODS = ["dense", *DLRT_METHODS, "factorized", *BASELINES]
#: The optional packages of the projection baselines, pinned: (import name, pip requirement).
PACKAGES = {"galore": ("galore_torch", "galore-torch==1.0"), "fira": ("fira", "fira==1.0.2")}
PACKAGES["apollo"] = ("apollo_torch", "apollo-torch==1.0.3")


class Factorized(nn.Module):
    """``x ↦ B (A x) + b``: a dense layer stored as two factors of a fixed rank, trained through autograd.

    Starts from the balanced truncated SVD of the dense weight it replaces (``A = √Σ Vᵀ``,
    ``B = U √Σ``), the same start as DLRT's ``init="svd"``.
    """

    def __init__(self, dense: nn.Linear, rank: int) -> None:
        super().__init__()
        U, s, Vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
        root = s[:rank].sqrt()
        self.A = nn.Parameter((root[:, None] * Vh[:rank]).contiguous())
        self.B = nn.Parameter((U[:, :rank] * root).contiguous())
        self.bias = nn.Parameter(dense.bias.detach().clone()) if dense.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.A.T) @ self.B.T
        return y + self.bias if self.bias is not None else y


def projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith(PROJECTIONS)]


def projection_params(model: nn.Module) -> int:
    """Stored weights of the attention and MLP projections (factors of low-rank layers, no biases)."""
    total = 0
    for _, m in projections(model):
        if isinstance(m, dlrt.LowRankLinear):
            total += sum(p.numel() for p in m.factor_parameters())
        elif isinstance(m, Factorized):
            total += m.A.numel() + m.B.numel()
        else:
            total += m.weight.numel()
    return total


def factorize(model: nn.Module, rank: int) -> nn.Module:
    for name, m in projections(model):
        model.set_submodule(name, Factorized(m, min(rank, *m.weight.shape)))
    return model


def matched_rank(model: nn.Module, target: int) -> int:
    """The rank whose ``Factorized`` projections store closest to ``target`` weights (``Σ r (in + out)``)."""
    sizes = sum(sum(m.weight.shape) for _, m in projections(model))
    return max(1, round(target / sizes))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def closure_with_grad(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` whose ``step(closure)`` runs the closure with gradients enabled.

    The three baselines copy transformers' AdamW, whose ``step`` (under ``torch.no_grad``)
    calls the closure without ``torch.enable_grad()``, as torch's optimizers do; their own
    training scripts never pass a closure.
    """
    step = opt.step

    def step_with_closure(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step()
        return loss

    opt.step = types.MethodType(step_with_closure, opt)  # a bound method, as LR schedulers expect
    return opt


def projection_baseline(method: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """GaLore / Fira / APOLLO on the projections at ``--projection-rank``, their documented defaults otherwise.

    Raises ImportError (with the pip command) when the package is not installed.
    """
    module, requirement = PACKAGES[method]
    try:
        lib = __import__(module)
    except ImportError:
        raise ImportError(f"{method} needs `pip install --no-deps {requirement}`") from None
    ids = {id(m.weight) for _, m in projections(model)}
    low = [p for p in model.parameters() if id(p) in ids]
    rest = [p for p in model.parameters() if id(p) not in ids]
    r, gap = args.matched_projection_rank, args.update_proj_gap
    if method == "galore":  # GaLore's README: rank, update_proj_gap 200, scale 0.25, proj_type std
        groups = [
            {"params": rest},
            {"params": low, "rank": r, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
        ]
        return closure_with_grad(lib.GaLoreAdamW(groups, lr=method_lr(method, args), weight_decay=args.weight_decay))
    if method == "fira":  # Fira's README: the same group keys, alpha (scale) 1.0
        groups = [
            {"params": rest},
            {"params": low, "rank": r, "update_proj_gap": gap, "alpha": 1.0, "proj_type": "std"},
        ]
        return closure_with_grad(lib.FiraAdamW(groups, lr=method_lr(method, args), weight_decay=args.weight_decay))
    # APOLLO's README: random projection, channel-wise scaling, scale 1 at the projection rank
    group = {"params": low, "rank": r, "proj": "random", "scale_type": "channel", "scale": 1}
    group |= {"update_proj_gap": gap, "proj_type": "std"}
    lr = method_lr(method, args)
    return closure_with_grad(lib.APOLLOAdamW([{"params": rest}, group], lr=lr, weight_decay=args.weight_decay))


def build(method: str, pristine: nn.Module, args: argparse.Namespace, fixed_rank: int | None, device: torch.device):
    """A fresh model of ``method`` from the dense start ``pristine``, on ``device``, and its optimizer."""
    model = copy.deepcopy(pristine)
    if method.startswith("dlrt-"):
        _, integrator, optimizer = method.split("-", 2)
        dlrt.convert(model, rank=args.rank, max_rank=args.max_rank, init="svd")
        model.to(device)
        lr = method_lr(method, args)
        opt = dlrt.DLRTOptimizer(
            model,
            integrator=integrator,
            optimizer=optimizer,
            lr=lr,
            tau=args.tau,
            tau_mode=args.tau_mode,
            weight_decay=args.weight_decay,
        )
        return model, opt
    if method == "factorized":
        factorize(model, fixed_rank)
    model.to(device)
    if method in BASELINES:
        return model, projection_baseline(method, model, args)
    return model, torch.optim.AdamW(model.parameters(), lr=method_lr(method, args), weight_decay=args.weight_decay)


def method_lr(method: str, args: argparse.Namespace) -> float:
    """``method``'s peak learning rate: its ``--method-lr``, else ``--lr``."""
    return args.method_lrs.get(method, args.lr)


def parse_method_lrs(items: list[str]) -> dict[str, float]:
    """``--method-lr METHOD=LR ...`` as a dict; a bad item is an error naming it."""
    out = {}
    for item in items:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--method-lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(METHODS)}")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not (math.isfinite(lr) and lr > 0):
            raise SystemExit(f"--method-lr {item!r}: the learning rate must be a positive number")
        if method in out:
            raise SystemExit(f"--method-lr gives {method} twice: give each method one learning rate")
        out[method] = lr
    return out


def autocast_forward(device: torch.device, bf16: bool):
    """The task's forward: next-token logits against targets, under bf16 autocast when asked (loss in float32)."""
    if not bf16:
        return lm_forward

    def forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, y, _ = lm_forward(model, batch)
        logits = logits.float()
        return logits, y, nn.functional.cross_entropy(logits, y)

    return forward


def train_one(method, pristine, data, args, device, seed, fixed_rank) -> tuple[dict[str, Any], Any]:
    """Train ``method`` for ``--steps`` steps through the driver; its record and (model, opt, task)."""
    torch.manual_seed(seed)
    model, opt = build(method, pristine, args, fixed_rank, device)
    train_set, val_set = data
    task = Task(model, train_set, val_set, None, autocast_forward(device, args.bf16))
    per_epoch = math.ceil(len(train_set) / args.batch_size)
    factor = functools.partial(
        lr_factor, total=args.steps, schedule="cosine", warmup_steps=int(args.warmup * args.steps)
    )
    driver = Driver(
        task,
        opt,
        RunWriter(None, [], progress=False),
        device=device,
        epochs=math.ceil(args.steps / per_epoch),
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        seed=seed,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, factor),
        max_steps=args.steps,
        log_every=args.steps,
        eval_every=args.eval_every,
        ranks=dlrt.conversion.mode_ranks,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = driver.run()
    elapsed = [0.0, *itertools.accumulate(out.step_seconds)]
    evaluated = {r["step"]: r["test_loss"] for r in out.step_rows if r.get("test_loss") is not None}
    if out.rows:  # the last epoch's end evaluates the final model
        evaluated[out.rows[-1]["step"]] = out.rows[-1]["test_loss"]
    curve = [
        {"step": step, "seconds": elapsed[step], "val_loss": loss, "val_ppl": perplexity(loss)}
        for step, loss in sorted(evaluated.items())
    ]
    stored, dense = dlrt.parameter_counts(model)
    record = {
        "method": method,
        "seed": seed,
        "lr": method_lr(method, args),
        "tau": args.tau if method.startswith("dlrt-") else None,
        "tau_mode": args.tau_mode if method.startswith("dlrt-") else None,
        "status": out.status,
        "message": out.message,
        "curve": curve,
        "val_loss": curve[-1]["val_loss"] if curve else None,
        "val_ppl": curve[-1]["val_ppl"] if curve else None,
        "train_seconds": sum(out.step_seconds),
        "params_stored": stored,
        "params_dense": dense,
        "projection_params": projection_params(model),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "ranks": dlrt.ranks(model),
        "fixed_rank": fixed_rank if method == "factorized" else None,
        "projection_rank": args.matched_projection_rank if method in BASELINES else None,
    }
    if device.type == "cuda":
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return record, (model, opt, task)


def timing_and_memory(setups: dict[str, Any], args: argparse.Namespace, device: torch.device):
    """Median seconds per step of every trained method, timed round-robin, and its peak step memory."""
    from dlrt.training.driver import step_closure

    train_set = next(iter(setups.values()))[2].train_set
    gen = torch.Generator().manual_seed(12345)
    batches = []
    for _ in range(args.timing_steps):
        idx = torch.randint(0, len(train_set), (args.batch_size,), generator=gen)
        batches.append(tuple(t[idx].to(device) for t in train_set.tensors))
    times: dict[str, list[float]] = {m: [] for m in setups}
    for rnd in range(args.timing_rounds + 1):
        for method, (model, opt, task) in setups.items():
            for batch in batches:
                closure = step_closure(task, model, opt, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                opt.step(closure)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rnd > 0:  # round 0 warms up
                    times[method].append(time.perf_counter() - t0)
    memory = {}
    for method, (model, opt, task) in setups.items():
        closure = step_closure(task, model, opt, batches[0])
        opt.zero_grad(set_to_none=True)
        peak = peak_step_bytes(lambda opt=opt, closure=closure: opt.step(closure), device)
        memory[method] = resident_bytes(model, opt) + peak
    return {m: statistics.median(t) for m, t in times.items()}, memory


RATIO_KEYS = ("val_ppl", "params_stored", "projection_params", "optimizer_state_bytes", "peak_bytes", "s_per_step")


def reference_lr(records: list[dict[str, Any]]) -> float | None:
    """The learning rate of the dense runs that the ratios refer to, when dense ran at several: the one
    with runs for the most seeds, and of those the lowest mean final validation loss."""
    by_lr: dict[Any, list[float]] = {}
    for r in records:
        if r["method"] == "dense" and r["status"] == "completed":
            by_lr.setdefault(r.get("lr"), []).append(r["val_loss"])
    if not by_lr:
        return None
    return min(by_lr, key=lambda lr: (-len(by_lr[lr]), statistics.fmean(by_lr[lr])))


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Every record's figures over dense's of the same seed (at :func:`reference_lr`; marked ``reference``).

    Records merged from several files (``--merge``) carry the file's index as ``run``;
    seconds per step compare only within one run (the same load), so against a dense
    record of another run that ratio is ``None``.
    """
    lr = reference_lr(records)
    dense = {}
    for r in records:
        if r["method"] == "dense" and r["status"] == "completed" and r.get("lr") == lr:
            dense[r["seed"]] = r
            r["reference"] = True
    for r in records:
        base = dense.get(r["seed"])
        if base is None or r["status"] != "completed":
            continue
        same_run = r.get("run") == base.get("run")
        r["ratio_to_dense"] = {
            k: (r[k] / base[k] if r.get(k) is not None and base.get(k) and (same_run or k != "s_per_step") else None)
            for k in RATIO_KEYS
        }
        # steps to reach dense's final validation loss (None: never within the run)
        target = base["val_loss"]
        r["steps_to_dense_final_loss"] = next((c["step"] for c in r["curve"] if c["val_loss"] <= target), None)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path``, through a temporary file and a rename (a file there is replaced whole or kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """One results file of the records of ``paths`` (e.g. one run per seed), ratios recomputed across them.

    A run in two files (the same method, learning rate, tolerance, rank rule and seed) is an error:
    the merge would have to pick one.
    """
    records, sources = [], []
    for i, path in enumerate(paths):
        data = json.loads(path.read_text())
        if data.get("benchmark") != "pretraining":
            raise SystemExit(f"--merge: {path} is not a results file of benchmarks/pretraining.py")
        keys = ("environment", "load_before", "load_after", "device")
        sources.append({"file": str(path), **{k: data.get(k) for k in keys}})
        run_args = (data.get("environment") or {}).get("args") or {}
        for r in data["records"]:
            # a file written before records kept their lr and tau: the run's own arguments
            lr = r.get("lr", (run_args.get("method_lrs") or {}).get(r["method"], run_args.get("lr")))
            low_rank = r["method"].startswith("dlrt-")
            tau = r.get("tau", run_args.get("tau") if low_rank else None)
            mode = r.get("tau_mode", run_args.get("tau_mode", "gradient") if low_rank else None)
            records.append({**r, "lr": lr, "tau": tau, "tau_mode": mode, "run": i})
    seen: dict[tuple, str] = {}
    for r in records:
        key = (r["method"], r.get("lr"), r.get("tau"), r.get("tau_mode"), r["seed"])
        if key in seen:
            raise SystemExit(
                f"--merge: {r['method']} (lr {r.get('lr')}, tau {r.get('tau')} {r.get('tau_mode')}, seed {r['seed']}) "
                "is in two files"
            )
        seen[key] = r["method"]
    add_ratios(records)
    env = sources[0]["environment"] or {}
    return {
        "benchmark": "pretraining",
        "environment": {
            **env,
            "command": shlex.join(
                ["python", "benchmarks/pretraining.py", "--merge", *map(str, paths), "--out", str(out)]
            ),
            "extra_commands": [s["environment"]["command"] for s in sources if s.get("environment")],
        },
        "load_before": max((s["load_before"] for s in sources if s.get("load_before")), key=lambda x: x[0]),
        "load_after": max((s["load_after"] for s in sources if s.get("load_after")), key=lambda x: x[0]),
        "device": sources[0]["device"],
        "merged_from": sources,
        "records": records,
    }


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        f"{'method':<22} {'seed':>4} {'lr':>7} {'val ppl':>8} {'×dense':>7} {'proj params':>12} {'×dense':>7} "
        f"{'opt state':>10} {'×dense':>7} {'peak MB':>8} {'×dense':>7} {'s/step':>7} {'×dense':>7} {'steps→dense':>11}"
    ]
    for r in records:
        if r["status"] != "completed":
            lines.append(f"{r['method']:<22} {r['seed']:>4} {r['status']}: {r['message']}")
            continue
        q = r.get("ratio_to_dense") or {}

        def x(key: str, q: dict[str, Any] = q) -> str:
            return f"{q[key]:.3f}" if q.get(key) is not None else "-"

        lines.append(
            f"{r['method']:<22} {r['seed']:>4} {r.get('lr', float('nan')):>7.0e} {r['val_ppl']:>8.3f} "
            f"{x('val_ppl'):>7} {r['projection_params']:>12,d} "
            f"{x('projection_params'):>7} {r['optimizer_state_bytes'] / 1e6:>9.2f}M {x('optimizer_state_bytes'):>7} "
            f"{r['peak_bytes'] / 1e6:>8.1f} {x('peak_bytes'):>7} {r['s_per_step']:>7.3f} {x('s_per_step'):>7} "
            f"{r.get('steps_to_dense_final_loss') or '-'!s:>11}"
        )
    return "\n".join(lines)


def setting_label(r: dict[str, Any]) -> str:
    """`` lr 0.03`` / `` lr 0.003 τ 0.05 relative``: a record's learning rate, and a DLRT method's tolerance
    and rank rule (when not the gradient rule)."""
    mode = f" {r['tau_mode']}" if r.get("tau_mode") not in (None, "gradient") else ""
    return (f" lr {r['lr']:g}" if r.get("lr") else "") + (f" τ {r['tau']:g}" if r.get("tau") else "") + mode


def best_per_method(records: list[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Per method, its completed run on ``seed`` with the lowest final perplexity (dense: the reference run
    the ratios use, :func:`add_ratios`): the one curve the plot shows of a method run at several settings."""

    def preference(r: dict[str, Any]) -> tuple[bool, float]:
        return (not r.get("reference"), r["val_ppl"])

    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["status"] == "completed" and r["curve"] and r["seed"] == seed:
            if r["method"] not in best or preference(r) < preference(best[r["method"]]):
                best[r["method"]] = r
    return best


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    settings: dict[str, set] = {}  # a method run at several learning rates or tolerances is labelled with them
    for r in records:
        settings.setdefault(r["method"], set()).add((r.get("lr"), r.get("tau"), r.get("tau_mode")))
    best = best_per_method(records, records[0]["seed"])
    for r in best.values():
        steps = [c["step"] for c in r["curve"]]
        ppl = [c["val_ppl"] for c in r["curve"]]
        style = "-" if r["method"].startswith("dlrt") else "--"
        label = r["method"] + (setting_label(r) if len(settings[r["method"]]) > 1 else "")
        axes[0].plot(steps, ppl, style, label=label)
        axes[1].plot([s * r["s_per_step"] for s in steps], ppl, style, label=label)
    if best:  # a run that diverged part of the way would squash the others against the bottom
        first = [r["curve"][0]["val_ppl"] for r in best.values() if math.isfinite(r["curve"][0]["val_ppl"])]
        low = min(c["val_ppl"] for r in best.values() for c in r["curve"])
        if first and math.isfinite(low):
            for ax in axes:
                ax.set_ylim(0.9 * low, 1.5 * max(first))
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("seconds (steps × median s/step, timed round-robin)")
    for ax in axes:
        ax.set_ylabel("validation perplexity (per byte)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    several = any(len(v) > 1 for v in settings.values())
    axes[0].legend(fontsize=7, title=f"best setting per method, seed {records[0]['seed']}" if several else None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--model-kw", nargs="*", default=[], metavar="KEY=INT", help="GPTConfig overrides, e.g. n_layers=2")
    p.add_argument("--dataset", default="hamlet")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--method-lr", nargs="+", default=[], metavar="METHOD=LR", help="a method's own peak learning rate (else --lr)"
    )
    p.add_argument("--warmup", type=float, default=0.05, help="share of the steps with a linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=8, help="DLRT's start rank")
    p.add_argument("--max-rank", type=int, default=None, help="DLRT's largest rank per layer")
    p.add_argument("--tau", type=float, default=0.11, help="DLRT's truncation tolerance (gradient rule)")
    p.add_argument(
        "--tau-mode",
        default="gradient",
        choices=("gradient", "relative"),
        help="DLRT's rank rule: gradient (ranks grow and shrink) or relative (ranks only fall from --rank)",
    )
    p.add_argument("--fixed-rank", default="match", help="the factorized model's rank, or 'match' (see above)")
    p.add_argument("--projection-rank", default="match", help="GaLore / Fira / APOLLO rank, or 'match' (see above)")
    p.add_argument("--update-proj-gap", type=int, default=200, help="GaLore / Fira / APOLLO projection refresh")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--timing-steps", type=int, default=4)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every method")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training windows (smoke runs)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretraining.json"))
    p.add_argument("--summarize", type=Path, default=None, help="print the table of a results file and stop")
    p.add_argument(
        "--merge", type=Path, nargs="+", default=None, metavar="FILE", help="combine results files (e.g. one per seed)"
    )
    args = p.parse_args(argv)
    args.method_lrs = parse_method_lrs(args.method_lr)
    if args.summarize is not None:
        print(table(json.loads(args.summarize.read_text())["records"]))
        return 0
    if args.merge:
        merged = merge(args.merge, args.out)
        print(table(merged["records"]))
        write_json(args.out, merged)
        with contextlib.suppress(ImportError):
            plot(merged["records"], args.out.with_suffix(".png"))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from dlrt.data import lm_datasets
    from dlrt.models import get_model

    train_set, val_set = lm_datasets(args.dataset, args.context)
    if args.limit is not None:
        train_set = torch.utils.data.TensorDataset(*(t[: args.limit] for t in train_set.tensors))
    before = load_average("before")
    records: list[dict[str, Any]] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        kw = {k: int(v) for k, v in (item.split("=", 1) for item in args.model_kw)}
        pristine = get_model(args.model, context=args.context, **kw)
        setups: dict[str, Any] = {}
        fixed = None if args.fixed_rank == "match" else int(args.fixed_rank)
        args.matched_projection_rank = None if args.projection_rank == "match" else int(args.projection_rank)
        # DLRT first: the factorized model's and the baselines' matched ranks read its final state
        order = sorted(args.methods, key=lambda m: (not m.startswith("dlrt-"), METHODS.index(m)))
        for method in order:
            first = next((r for r in records if r["seed"] == seed and r["method"].startswith("dlrt-")), None)
            if (method == "factorized" and fixed is None) or (
                method in BASELINES and args.matched_projection_rank is None
            ):
                if first is None or first["status"] != "completed":
                    raise SystemExit(f"--fixed-rank / --projection-rank match need a completed dlrt-* method; {method}")
            if method == "factorized" and fixed is None:
                fixed = matched_rank(pristine, first["projection_params"])
            if method in BASELINES and args.matched_projection_rank is None:
                ranks = list(first["ranks"].values())
                args.matched_projection_rank = max(1, round(sum(ranks) / len(ranks)))
            print(f"== seed {seed}: {method}", flush=True)
            try:
                record, setup = train_one(method, pristine, (train_set, val_set), args, device, seed, fixed)
            except ImportError as err:
                records.append({"method": method, "seed": seed, "status": "skipped", "message": str(err)})
                print(f"skipped: {err}", flush=True)
                continue
            records.append(record)
            if record["status"] == "completed":
                setups[method] = setup
            print(f"{method}: val ppl {record['val_ppl']:.3f}, {record['train_seconds']:.1f}s", flush=True)
        seconds, memory = timing_and_memory(setups, args, device)
        for r in records:
            if r["seed"] == seed and r["method"] in setups:
                r["s_per_step"], r["peak_bytes"] = seconds[r["method"]], memory[r["method"]]
    add_ratios(records)
    print(table(records))
    record = {
        "benchmark": "pretraining",
        "environment": environment(args),
        "load_before": list(before),
        "load_after": list(load_average("after")),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "records": records,
    }
    write_json(args.out, record)
    with contextlib.suppress(ImportError):
        plot(records, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
