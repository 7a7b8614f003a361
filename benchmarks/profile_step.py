"""Where a training step's time goes: torch.profiler over the steps of ``step_time.py`` and ``lenet_step_time.py``.

    python benchmarks/profile_step.py                       # MLP width 2048, rank 32, batch 256: every variant
    python benchmarks/profile_step.py --model lenet5        # LeNet5 (dlrt train's defaults), batches of 128
    python benchmarks/profile_step.py --variants parallel --width 4096 --rows 30

For every variant it prints the operators by self CPU time per step (the profiler's
own overhead included, so compare rows within one table, and wall times with
``step_time.py``). Nothing is written; the trace is not kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

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

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mlp", "lenet5"), default="mlp")
    p.add_argument("--variants", nargs="+", default=None, help=f"mlp: {VARIANTS}; lenet5: {tuple(LENET_VARIANTS)}")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="default 256 (mlp) / 128 (lenet5)")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per variant (after 5 warm-up steps)")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step(x, y)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        threads = torch.get_num_threads()
        print(f"\n== {args.model} {variant}: {total:.2f} ms self CPU per step (profiled, {threads} threads)")
        print(f"{'operator':<58} {'ms/step':>8} {'share':>7} {'calls/step':>10}")
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
            ms = e.self_cpu_time_total / args.steps / 1e3
            print(f"{e.key[:58]:<58} {ms:>8.3f} {ms / total:>7.1%} {e.count / args.steps:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
