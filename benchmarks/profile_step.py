"""Where a training step's time goes: per phase and layer, and per operator (torch.profiler).

    python benchmarks/profile_step.py                       # MLP width 2048, rank 32, batch 256: every variant
    python benchmarks/profile_step.py --model lenet5        # LeNet5 (dlrt train's defaults), batches of 128
    python benchmarks/profile_step.py --variants parallel --width 4096 --rows 30
    python benchmarks/profile_step.py --model minilm-geolora  # GeoLoRA on every linear layer of MiniLM, batch 16

For every variant it prints two tables over the same steps as ``step_time.py`` and
``lenet_step_time.py`` take:

* **phases**: wall milliseconds per step of each part of a dlrt step — the
  forward/backward pass, the K/L inner steps, each layer's augmentation, the BUG
  block contracted from the kept pass inputs, the S-steps, each layer's truncation
  (SVD, new bases, state transport), and the rest (checks, dense parameters,
  bookkeeping) — timed by wrapping dlrt's integrator operations (no profiler);
* **operators**: torch.profiler's operators by self CPU time per step (the
  profiler's own overhead included, so compare rows within one table, and wall
  times with the benchmarks).

Nothing is written; the trace is not kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dlrt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet_step_time import VARIANTS as LENET_VARIANTS
from step_time import N_CLASSES, VARIANTS, build


def lenet_step(variant: str):
    """One LeNet5 training step of ``variant``, set up as ``lenet_step_time.py`` does (``dlrt train``'s defaults)."""
    from dlrt.training import TrainConfig
    from dlrt.training.loop import build_model, build_optimizer

    cfg = TrainConfig(**LENET_VARIANTS[variant])
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)

    def step(x, y):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return opt.step(closure)

    step.optimizer = opt
    return step


def minilm_geolora_step(batch: int, seed: int, lr: float = 5e-3):
    """One GeoLoRA step on MiniLM-L6 / Rotten Tomatoes with adapters on all 36 linear layers of the encoder
    (``dlrt finetune``'s defaults otherwise), and the batches it takes."""
    from dlrt.training.config import FinetuneConfig
    from dlrt.training.finetune import apply_method, build_task, step_closure

    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    cfg = FinetuneConfig(target_modules=targets, batch_size=batch, lr=lr, seed=seed, max_steps=300)
    torch.manual_seed(seed)
    task = build_task(cfg)
    model, opt, _ = apply_method(cfg, task.model, 300)
    model.train()
    loader = torch.utils.data.DataLoader(
        task.train_set, batch_size=batch, shuffle=True, collate_fn=task.collate, generator=torch.Generator()
    )
    batches = [b for _, b in zip(range(8), loader)]

    def step(i: int) -> Any:
        return opt.step(step_closure(task, model, opt, batches[i % len(batches)]))

    step.optimizer = opt
    return step


class PhaseTimer:
    """Wall time per (phase, layer) of dlrt steps, by wrapping the integrators' operations.

    Times are summed per step; the table shows the median over steps of each entry
    (a single slow step, e.g. a page fault or another process, does not move it).
    """

    def __init__(self, by_kind: bool = False) -> None:
        #: Columns per kind of layer (the last part of its name: ``query``, ``dense``...) instead of per layer.
        self.by_kind = by_kind
        self.ms: dict[tuple[str, str], float] = defaultdict(float)
        self.steps: list[dict[tuple[str, str], float]] = []
        self.names: dict[int, str] = {}
        self.stack: list[str] = []

    def wrap(self, phase: str, fn: Callable[..., Any], layer_arg: int | None) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            layer = self.names.get(id(args[layer_arg]), "?") if layer_arg is not None else "all"
            self.stack.append(phase)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = (time.perf_counter() - t0) * 1e3
                self.stack.pop()
                self.ms[(phase, layer)] += elapsed
                if self.stack:  # report phases exclusive of the ones nested in them
                    self.ms[(self.stack[-1], "nested")] -= elapsed
                else:  # the step ended
                    self.steps.append(dict(self.ms))
                    self.ms.clear()

        return timed

    @contextmanager
    def installed(self, opt: Any) -> Iterator[None]:
        """Wrap the operations where every module that uses them looks them up."""
        import dlrt.integrators.base as base
        import dlrt.integrators.bug as bug
        import dlrt.integrators.parallel as parallel

        def kind(name: str) -> str:  # e.g. "attention.self.query" of "...encoder.layer.3.attention.self.query.lora"
            parts = [p for p in name.split(".") if p != "lora"]
            numbered = [i for i, p in enumerate(parts) if p.isdigit()]
            return ".".join(parts[numbered[-1] + 1 :] if numbered else parts[-1:])

        self.names = {id(m): kind(n) if self.by_kind else n for n, m in zip(opt.layer_names, opt.lowrank_layers)}
        # (phase, where the name is looked up, name, position of the layer argument after self)
        targets = [
            ("pass (forward/backward, checks)", type(opt), "evaluate", None),
            ("K/L inner steps", base, "K_and_L_steps", None),
            ("augment (bases, core, state)", base, "augment", 1),
            ("geometric direction and momentum", type(opt), "_set_directions", None),
            ("kept pass inputs: BUG block / parallel corner", type(opt), "pass_grad", 0),
            ("S-steps", base, "S_steps", None),
            ("truncate: SVDs, ranks", base, "truncate", None),
            ("gradient rule: trend's normal directions", base, "_normal_bases", None),
            ("new bases + state transport", base, "change_basis", 1),
            ("step total", type(opt), "step", None),
        ]
        saved = []
        for phase, owner, name, layer_arg in targets:
            layer_arg = None if layer_arg is None else layer_arg + (1 if isinstance(owner, type) else 0)
            for module in {owner, *((bug, parallel) if owner is base else ())}:
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, self.wrap(phase, getattr(module, name), layer_arg))
        try:
            yield
        finally:
            for module, name, fn in reversed(saved):
                setattr(module, name, fn)

    def table(self) -> str:
        order = list(dict.fromkeys(self.names.values()))
        per_step: list[dict[str, dict[str, float]]] = []
        for ms in self.steps:
            phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
            total = ms.get(("step total", "all"), 0.0)
            for (phase, layer), t in ms.items():
                if phase != "step total":
                    phases[phase][layer if layer in order else "all"] += t
            accounted = sum(sum(v.values()) for v in phases.values())
            phases["rest (checks, dense parameters, bookkeeping)"]["all"] = total - accounted
            phases["step"]["all"] = total
            per_step.append(phases)
        keys = {(phase, layer) for phases in per_step for phase, per in phases.items() for layer in per}
        median = {k: statistics.median(p.get(k[0], {}).get(k[1], 0.0) for p in per_step) for k in keys}
        layers = [name for name in order if any(layer == name for _, layer in keys)]
        phase_names = list(dict.fromkeys(phase for phases in per_step for phase in phases))
        phase_names.remove("step")
        w = max([13, *(len(n) + 1 for n in layers)]) if self.by_kind else 13
        head = f"{'phase':<46}" + "".join(f"{name[: w - 1]:>{w}}" for name in layers) + f"{'total':>10}"
        lines = [head, "-" * len(head)]
        for phase in phase_names:
            cells = "".join(f"{median[(phase, n)]:>{w}.3f}" if (phase, n) in median else f"{'':>{w}}" for n in layers)
            row_total = sum(v for (p, _), v in median.items() if p == phase)
            lines.append(f"{phase:<46}{cells}{row_total:>10.3f}")
        label = f"step (median of {len(per_step)})"
        lines.append(f"{label:<46}{'':>{w * len(layers)}}{median[('step', 'all')]:>10.3f}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mlp", "lenet5", "minilm-geolora"), default="mlp")
    p.add_argument("--variants", nargs="+", default=None, help=f"mlp: {VARIANTS}; lenet5: {tuple(LENET_VARIANTS)}")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="default 256 (mlp) / 128 (lenet5)")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per variant (after 5 warm-up steps)")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--one-thread-limit",
        type=int,
        default=None,
        help="dlrt.linalg.ONE_THREAD_FACTOR_ENTRIES for this run (0: the factor algebra on every thread)",
    )
    args = p.parse_args(argv)
    if args.one_thread_limit is not None:
        dlrt.linalg.ONE_THREAD_FACTOR_ENTRIES = args.one_thread_limit
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "minilm-geolora":
        return profile_minilm(args)
    variants = args.variants or list(VARIANTS if args.model == "mlp" else LENET_VARIANTS)
    gen = torch.Generator().manual_seed(args.seed)
    if args.model == "mlp":
        batch = args.batch or 256
        x = torch.randn(batch, args.width, generator=gen)
    else:
        batch = args.batch or 128
        x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, N_CLASSES, (batch,), generator=gen)
    for variant in variants:
        if args.model == "mlp":
            step = build(variant, args.width, args.rank, args.seed)[1]
        else:
            step = lenet_step(variant)
        for _ in range(5):
            step(x, y)
        opt = getattr(step, "optimizer", None)
        if isinstance(opt, dlrt.DLRTOptimizer):
            timer = PhaseTimer()
            with timer.installed(opt):
                for _ in range(args.steps):
                    step(x, y)
            print(
                f"\n== {args.model} {variant}: wall ms per step by phase and layer ({torch.get_num_threads()} threads)"
            )
            print(timer.table())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step(x, y)
        print_operators(prof, args, f"{args.model} {variant}")
    return 0


def profile_minilm(args: argparse.Namespace) -> int:
    """The phase table of GeoLoRA on MiniLM (columns per kind of adapted layer) and the operator table."""
    batch = args.batch or 16
    step = minilm_geolora_step(batch, args.seed)
    for i in range(5):
        step(i)
    timer = PhaseTimer(by_kind=True)
    with timer.installed(step.optimizer):
        for i in range(args.steps):
            step(i)
    threads = torch.get_num_threads()
    print(
        f"\n== MiniLM GeoLoRA, 36 adapters, batch {batch}: wall ms per step by phase and layer kind ({threads} threads)"
    )
    print(timer.table())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(i)
    print_operators(prof, args, "MiniLM GeoLoRA")
    return 0


def print_operators(prof: Any, args: argparse.Namespace, what: str) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    threads = torch.get_num_threads()
    print(f"\n== {what}: {total:.2f} ms self CPU per step (profiled, {threads} threads)")
    print(f"{'operator':<58} {'ms/step':>8} {'share':>7} {'calls/step':>10}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
        ms = e.self_cpu_time_total / args.steps / 1e3
        print(f"{e.key[:58]:<58} {ms:>8.3f} {ms / total:>7.1%} {e.count / args.steps:>10.1f}")


if __name__ == "__main__":
    sys.exit(main())
