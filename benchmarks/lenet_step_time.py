"""Seconds per training step of LeNet5 on MNIST batches: dense against the rank-adaptive integrators.

The question behind it: does a rank-adaptive run take fewer wall seconds per epoch
than the dense network? Per-epoch times taken in separate runs move by ±30 % on a
shared 2-core machine, so this times the variants round-robin in one process on
the same real MNIST batches (batch 128, Adam 3e-3, start rank 20, τ = 0.11 as in
``dlrt train``): after a warm-up round, each round times ``--steps`` steps of every
variant, in an order rotated per round; the figure is the median step time and its
ratio to dense. Data loading is left out (it is the same for every variant).

Variants: ``dense``; ``bug`` and ``parallel`` with every layer but the classifier
low-rank (``dlrt train``'s default); ``parallel-conv1-dense`` also leaves the first
convolution (1→20 channels, 500 weights) dense, where a factorization saves nothing.

Targets (issue 11): ``bug`` ≤ 1.5× dense and ``parallel`` ≤ 0.9× dense; each is
printed as PASS/FAIL (``--strict``: exit status 1 on a FAIL). The medians, every
sample, the ratios, the environment and the load average before and after go to
``benchmarks/results/lenet_step_time.json``.

Rerun::

    python benchmarks/lenet_step_time.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import dlrt
from benchlib import environment, load_average, print_checks, write_results
from dlrt.training import TrainConfig
from dlrt.training.loop import build_data, build_model, build_optimizer

TARGETS = {"bug": 1.5, "parallel": 0.9}  # at most this many times the dense step
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lenet_step_time.json"

VARIANTS = {
    "dense": {"dense": True},
    "bug": {"integrator": "bug"},
    "parallel": {"integrator": "parallel"},
    "parallel-conv1-dense": {"integrator": "parallel", "exclude": ["head", "conv1"]},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average("before")

    train_set, _ = build_data(TrainConfig())
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    batches = [b for _, b in zip(range(args.steps), loader)]
    setups = {}
    for name, kw in VARIANTS.items():
        cfg = TrainConfig(**kw)
        model = build_model(cfg).train()
        setups[name] = (model, build_optimizer(cfg, model))
    times: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for rnd in range(args.rounds + 1):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            model, opt = setups[name]
            for x, y in batches:

                def closure(x=x, y=y, model=model, opt=opt):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                t0 = time.perf_counter()
                opt.step(closure)
                if rnd > 0:
                    times[name].append(time.perf_counter() - t0)
    medians = {n: statistics.median(t) for n, t in times.items()}
    ratios = {n: medians[n] / medians["dense"] for n in medians}
    steps_per_epoch = -(-len(train_set) // 128)
    ranks = {name: dlrt.ranks(model) for name, (model, _) in setups.items()}
    print(f"LeNet5 / MNIST, batch 128, {torch.get_num_threads()} threads, {args.rounds}×{args.steps} steps each\n")
    print("| variant | s/step (median) | vs dense | s/epoch (steps only) | ranks |")
    print("|---|---|---|---|---|")
    for name in setups:
        print(
            f"| {name} | {medians[name]:.4f} | {ratios[name]:.2f} | "
            f"{medians[name] * steps_per_epoch:.1f} | {ranks[name] or '-'} |"
        )
    checks = [
        {"name": f"{v} <= {limit}x dense", "value": ratios[v], "ok": ratios[v] <= limit} for v, limit in TARGETS.items()
    ]
    print()
    print_checks(checks)
    load_end = load_average("after")
    print(f"load average (1 min) before {load_start[0]:.2f}, after {load_end[0]:.2f}")
    record = {
        **environment(args),
        "medians_s": medians,
        "ratio_to_dense": ratios,
        "final_ranks": ranks,
        "samples_s": times,
        "checks": checks,
        "loadavg_before": load_start,
        "loadavg_after": load_end,
    }
    return write_results(args, record)


if __name__ == "__main__":
    sys.exit(main())
