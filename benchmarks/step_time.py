"""Wall time per training step: dense vs. plainly factorized vs. dlrt integrators.

For each width ``w`` the model is an MLP with input width ``w``, three hidden
``w→w`` layers (ReLU between them) and a dense ``w→10`` head, trained on one
fixed random batch (``--batch`` rows, cross-entropy loss, fixed seed). Six
variants are timed:

* ``dense``: ``nn.Linear`` hidden layers, ``torch.optim.Adam``;
* ``plain``: each hidden layer holds ``U`` (n×r), ``S`` (r×r), ``V`` (m×r) as
  ordinary parameters and computes ``x V Sᵀ Uᵀ + b`` with plain autograd,
  ``torch.optim.Adam`` (the cost floor of a factorized layer);
* ``parallel``, ``bug``, ``fixed``: ``dlrt.LowRankLinear`` hidden layers trained by
  ``dlrt.DLRTOptimizer(model, integrator=NAME, optimizer="adam", lr=1e-3)`` through
  ``opt.step(closure)``; ``parallel-s4`` with ``coefficient_steps=4`` (one
  augmentation and truncation every 4 steps, the 3 steps between them on the
  augmented rank-64 core; no target, for comparison). Its sample is a whole
  cycle of 4 steps divided by 4, the average cost of a step. The rank-adaptive integrators run with ``tau=0`` and
  ``min_rank = max_rank = rank``, so every step augments to ``2·rank`` and
  truncates back to exactly ``rank`` (all of the integrator's work, at a fixed
  rank); the final ranks are checked and printed.

After ``--warmup`` steps per variant, each of ``--repeats`` rounds times one step
of every variant, in an order rotated from round to round so that machine
noise falls on all variants alike; the reported figure is the median seconds
per step (the minimum is listed too). The table gives each variant's ratio to
``plain`` and to ``dense``, and the targets are checked: ``parallel ≤ 1.3×plain``,
``bug ≤ 2.5×plain`` (every width) and, at width 4096 and rank 32,
``parallel < 0.3×dense``. All medians, raw samples, ratios, the environment and
the load average go to a JSON file. The thread count is torch's default
(``--threads`` overrides it). Other processes on the machine skew the timings
badly, and unevenly: an oversubscribed multi-threaded op waits a scheduler
slice at its barrier, which penalizes variants that run many small ops. The
script warns when the load average is high; run it on an otherwise idle
machine.

Rerun with::

    python benchmarks/step_time.py
    python benchmarks/step_time.py --widths 1024 2048 --repeats 20 --out /tmp/step_time.json
    python benchmarks/step_time.py --device cuda --widths 4096 8192 --out /tmp/step_time_cuda.json

``--strict`` makes the exit status 1 when a target fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dlrt
from benchlib import environment, load_average, print_checks, write_results

VARIANTS = ("dense", "plain", "parallel", "bug", "fixed", "parallel-s4")
INTEGRATORS = ("parallel", "bug", "fixed", "parallel-s4")
N_CLASSES = 10
HIDDEN_LAYERS = 3
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_time.json"


class PlainFactorizedLinear(nn.Module):
    """``y = x V Sᵀ Uᵀ + b`` with ``U``, ``S``, ``V`` as ordinary parameters (plain autograd)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        dense = nn.Linear(in_features, out_features)
        U, s, V = torch.svd_lowrank(dense.weight.detach(), q=min(rank + 10, in_features, out_features), niter=3)
        self.U = nn.Parameter(U[:, :rank].contiguous())
        self.S = nn.Parameter(torch.diag(s[:rank]))
        self.V = nn.Parameter(V[:, :rank].contiguous())
        self.bias = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear((x @ self.V) @ self.S.mT, self.U, self.bias)


def make_mlp(width: int, hidden: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(HIDDEN_LAYERS):
        layers += [hidden(), nn.ReLU()]
    layers.append(nn.Linear(width, N_CLASSES))
    return nn.Sequential(*layers)


def build(
    variant: str, width: int, rank: int, seed: int, device: str = "cpu"
) -> tuple[nn.Module, Callable[[Tensor, Tensor], Tensor]]:
    """The model of ``variant`` (built on the CPU, then moved to ``device``) and a function doing one training step."""
    torch.manual_seed(seed)
    if variant in ("dense", "plain"):
        if variant == "dense":
            model = make_mlp(width, lambda: nn.Linear(width, width))
        else:
            model = make_mlp(width, lambda: PlainFactorizedLinear(width, width, rank))
        model = model.to(device)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(x: Tensor, y: Tensor) -> Tensor:
            adam.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            adam.step()
            return loss

        return model, step

    model = make_mlp(width, lambda: dlrt.LowRankLinear(width, width, rank)).to(device)
    integrator, _, cycle = variant.partition("-s")
    opt = dlrt.DLRTOptimizer(
        model,
        integrator=integrator,
        optimizer="adam",
        lr=1e-3,
        tau=0.0,
        max_rank=rank,
        min_rank=rank,
        coefficient_steps=int(cycle or 1),
    )

    def dlrt_step(x: Tensor, y: Tensor) -> Tensor:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return opt.step(closure)

    dlrt_step.optimizer = opt  # for profile_step.py
    return model, dlrt_step


def bench_width(width: int, args: argparse.Namespace) -> dict:
    """Median seconds per step of every variant at one width, interleaved across rounds."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, width, generator=gen).to(args.device)
    y = torch.randint(0, N_CLASSES, (args.batch,), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    models, steps = {}, {}
    for v in VARIANTS:
        models[v], steps[v] = build(v, width, args.rank, args.seed, args.device)
    repeats = args.repeats if width < 4096 or args.repeats_4096 is None else args.repeats_4096
    losses: dict[str, float] = {}
    for v in VARIANTS:
        for _ in range(args.warmup):
            steps[v](x, y)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(repeats):
        k = i % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            cycle = steps[v].optimizer.integrator.coefficient_steps if v in INTEGRATORS else 1
            sync()
            t0 = time.perf_counter()
            for _ in range(cycle):  # a whole cycle: its steps differ in cost
                loss = steps[v](x, y)
            sync()
            samples[v].append((time.perf_counter() - t0) / cycle)
            losses[v] = float(loss.detach())
    medians = {v: statistics.median(s) for v, s in samples.items()}
    for v in INTEGRATORS:
        steps[v].optimizer.finish_cycle()  # parallel-s4 may stop mid-cycle, on its augmented bases
    ranks = {v: dlrt.ranks(models[v]) for v in INTEGRATORS}
    return {
        "width": width,
        "repeats": repeats,
        "median_s": medians,
        "min_s": {v: min(s) for v, s in samples.items()},
        "samples_s": samples,
        "ratio_to_plain": {v: medians[v] / medians["plain"] for v in VARIANTS},
        "ratio_to_dense": {v: medians[v] / medians["dense"] for v in VARIANTS},
        "final_ranks": ranks,
        "final_loss": losses,
    }


def check_targets(results: list[dict], rank: int) -> list[dict]:
    checks = []
    for r in results:
        w, rp, rd = r["width"], r["ratio_to_plain"], r["ratio_to_dense"]
        checks.append({"name": f"w={w}: parallel <= 1.3x plain", "value": rp["parallel"], "ok": rp["parallel"] <= 1.3})
        checks.append({"name": f"w={w}: bug <= 2.5x plain", "value": rp["bug"], "ok": rp["bug"] <= 2.5})
        if w == 4096 and rank == 32:
            ok = rd["parallel"] < 0.3
            checks.append({"name": f"w={w}: parallel < 0.3x dense", "value": rd["parallel"], "ok": ok})
        bad = {v: rk for v, rk in r["final_ranks"].items() if any(k != rank for k in rk.values())}
        checks.append({"name": f"w={w}: dlrt ranks stay {rank}", "value": bad or None, "ok": not bad})
    return checks


def print_table(results: list[dict]) -> None:
    head = f"{'width':>6} {'variant':>9} {'s/step':>10} {'/plain':>8} {'/dense':>8} {'min s':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        for v in VARIANTS:
            print(
                f"{r['width']:>6} {v:>9} {r['median_s'][v]:>10.5f} "
                f"{r['ratio_to_plain'][v]:>8.3f} {r['ratio_to_dense'][v]:>8.3f} {r['min_s'][v]:>10.5f}"
            )
        ranks = {v: sorted(set(rk.values())) for v, rk in r["final_ranks"].items()}
        print(f"{'':>6} final ranks: {ranks}  (repeats={r['repeats']})")
        print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per width (one step per variant each)")
    p.add_argument("--repeats-4096", type=int, default=None, help="override --repeats at width >= 4096")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize around each step)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = args.device
    if torch.device(device).type == "cuda":
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    print(
        f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}), batch {args.batch}, rank {args.rank}"
    )
    load_start = load_average("before")
    t_start = time.perf_counter()
    results = []
    for w in args.widths:
        t0 = time.perf_counter()
        results.append(bench_width(w, args))
        print(f"width {w} done in {time.perf_counter() - t0:.1f} s", flush=True)
    total = time.perf_counter() - t_start
    print()
    print_table(results)
    checks = check_targets(results, args.rank)
    print_checks(checks)
    load_end = load_average("after")
    print(f"total wall time {total:.1f} s; load average (1 min) before {load_start[0]:.2f}, after {load_end[0]:.2f}")

    record = {
        **environment(args),
        "device": device,
        "variants": list(VARIANTS),
        "results": results,
        "checks": checks,
        "total_wall_s": total,
        "loadavg_before": load_start,
        "loadavg_after": load_end,
    }
    return write_results(args, record)


if __name__ == "__main__":
    sys.exit(main())
