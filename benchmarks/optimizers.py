"""Optimizers for low-rank training: per-entry momentum on K, L, S against momentum on the manifold.

Compares the inner optimizers of :class:`dlrt.DLRTOptimizer` (``sgd``, ``sgd`` with
heavy-ball momentum 0.9 and ``adam``, all per entry of K, L, S; ``geo-heavyball`` and
``geo-adam``, whose momentum is one tangent vector of the low-rank manifold) with each
other and with a plain autograd factorization ``W = U S Vᵀ`` (three ``nn.Parameter`` s,
no orthonormality) trained by ``torch.optim.Adam`` / ``torch.optim.SGD(momentum=0.9)``,
always at the same parameter budget. Four parts, selectable with ``--parts``:

a. least squares with a planted rank-8 solution ``W*`` (128×128, singular values
   10 … 1) and ill-conditioned inputs ``x ~ N(0, Σ)`` (eigenvalues 1 … 1e-3 in a random
   basis), 1024 fixed samples in float64, full batch, loss ``½·mean‖W x − W* x‖²``. Every
   method starts from the same random rank-8 point; DLRT runs ``bug`` (and ``abc`` for
   two optimizers) with ``tau = 0``, ``min_rank = max_rank = 8``. Per method a small
   logarithmic lr grid; reported: steps until ``loss / loss₀ ≤ --ls-target`` at the best
   lr (fewest steps; a divergence or a miss counts as not reached) and the final
   relative loss;
b. the MLP 784-500-500-500-500-10 on MNIST, hidden layers at rank ``--mlp-rank`` (20; the
   classifier dense), minibatch 128 in one fixed shuffled order, ``--mlp-steps`` steps.
   Reported: steps until the training loss (EMA 0.98) falls below ``--mlp-target`` at the
   best of three lrs, and the final test accuracy;
c. GeoLoRA on MiniLM-L6 / Rotten Tomatoes (the setting of ``finetune_vs_peft.py``: r 8,
   tau 0.1, budget 8 × adapted modules, 300 steps of batch 16) with AdamW (today's
   default), ``geo-adam`` and ``geo-heavyball``, against PEFT AdaLoRA (12 → 8): an lr
   sweep over three seeds (each seed its own split and head), test accuracy against the
   majority class of the test split, final adapter parameters;
d. ranks from below: LeNet5 / MNIST through ``dlrt train`` (``bug``, tau 0.11, SGD setting
   of the lottery-ticket table), started at rank 2 and at full rank, for several
   optimizer / ``coefficient_steps`` configurations: the final ranks and accuracies.

Each part prints markdown tables and PASS/FAIL check lines, and is written to
``benchmarks/results/optimizers.json`` as soon as it finishes, merged into the file (the
parts not run keep their earlier results); part c also after every run, so an
interrupted sweep continues with ``--resume``. The figure
``benchmarks/results/optimizers.png`` (loss curves of a and b, accuracy against lr of c,
ranks of d) is redrawn from the whole JSON after every part. Run directories of c and d
go under ``--runs-dir``.

Rerun (on 2 CPU cores)::

    python benchmarks/optimizers.py --threads 2                         # all parts, about 2-2.5 h
    python benchmarks/optimizers.py --parts a --threads 2               # about 5-7 min (45 runs ≤ 2000 steps)
    python benchmarks/optimizers.py --parts b --threads 2               # about 5 min (18 runs of 1500 steps)
    python benchmarks/optimizers.py --parts c --threads 2 --resume      # about 1.5-2 h (48 runs of 300 steps)
    python benchmarks/optimizers.py --parts d --threads 2               # about 20 min (16 runs of 3 epochs)

Smoke runs::

    python benchmarks/optimizers.py --parts a --threads 1 --ls-steps 300 --out /tmp/opt.json --png /tmp/opt.png
    python benchmarks/optimizers.py --parts b --threads 1 --mlp-steps 60 --limit 2000 --out /tmp/opt.json \\
        --png /tmp/opt.png
    python benchmarks/optimizers.py --parts c --threads 1 --steps 5 --limit 200 --seeds 0 --lrs 1e-3 \\
        --out /tmp/opt.json --png /tmp/opt.png
    python benchmarks/optimizers.py --parts d --threads 1 --lenet-epochs 1 --limit 2000 --out /tmp/opt.json \\
        --png /tmp/opt.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dlrt
from benchlib import environment, print_checks, write_results
from dlrt.training import TrainConfig, apply_overrides, train
from finetune_vs_peft import method_config

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "optimizers.json"
DEFAULT_PNG = RESULTS / "optimizers.png"
PARTS = ("a", "b", "c", "d")

# Methods of parts a and b: (kind, integrator, inner optimizer, keyword arguments).
# kind "autograd": U, S, V as plain parameters under a torch optimizer ("adam" or "sgd", momentum 0.9);
# kind "dlrt": DLRTOptimizer with tau 0 and min_rank = max_rank = the rank (a fixed budget).
METHODS: dict[str, tuple[str, str | None, str, dict[str, Any]]] = {
    "autograd-adam": ("autograd", None, "adam", {}),
    "autograd-heavyball": ("autograd", None, "sgd", {"momentum": 0.9}),
    "sgd": ("dlrt", "bug", "sgd", {"momentum": 0.0}),
    "sgd-momentum": ("dlrt", "bug", "sgd", {"momentum": 0.9}),
    "adam": ("dlrt", "bug", "adam", {}),
    "geo-heavyball": ("dlrt", "bug", "geo-heavyball", {"momentum": 0.9}),
    "geo-adam": ("dlrt", "bug", "geo-adam", {}),
    "abc/sgd-momentum": ("dlrt", "abc", "sgd", {"momentum": 0.9}),
    "abc/geo-heavyball": ("dlrt", "abc", "geo-heavyball", {"momentum": 0.9}),
}
GEOMETRIC = ("geo-heavyball", "geo-adam", "abc/geo-heavyball")

# Learning-rate grids of part a (5 values each, logarithmic). Heavy-ball methods step ~ lr / (1 − β) = 10 lr.
# geo-adam normalises by one second moment per layer, ‖P(G)‖² / r, so its step has Frobenius norm ~ lr·√r,
# against ~ lr·√(entries) for per-entry Adam: its grid sits higher.
LS_GRIDS: dict[str, list[float]] = {
    "autograd-adam": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
    "autograd-heavyball": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
    "sgd": [0.1, 0.3, 1.0, 2.0, 3.0],
    "sgd-momentum": [0.03, 0.1, 0.3, 1.0, 2.0, 3.0],
    "adam": [3e-3, 1e-2, 3e-2, 0.1, 0.3],
    "geo-heavyball": [0.03, 0.1, 0.3, 1.0, 2.0, 3.0],
    "geo-adam": [0.1, 0.3, 1.0, 3.0, 10.0],
    "abc/sgd-momentum": [0.03, 0.1, 0.3, 1.0, 2.0, 3.0],
    "abc/geo-heavyball": [0.03, 0.1, 0.3, 1.0, 2.0, 3.0],
}
# Part b: 3 values each. The rank-20 start (truncated SVD of the dense init) sits on a plateau (loss ≈ 2.30) that
# heavy-ball at lr ≤ 0.03 does not leave within a few hundred steps; the autograd factorization diverges at 0.1 earlier.
MLP_METHODS = ("autograd-adam", "autograd-heavyball", "sgd-momentum", "adam", "geo-heavyball", "geo-adam")
MLP_GRIDS: dict[str, list[float]] = {
    "autograd-adam": [1e-3, 3e-3, 1e-2],
    "autograd-heavyball": [0.01, 0.03, 0.1],
    "sgd-momentum": [0.03, 0.1, 0.3],
    "adam": [1e-3, 3e-3, 1e-2],
    "geo-heavyball": [0.03, 0.1, 0.3],
    "geo-adam": [0.003, 0.01, 0.03],
}
# Part c: (FinetuneConfig.method, FinetuneConfig.optimizer).
C_METHODS = ("adalora:adamw", "geolora:adamw", "geolora:geo-adam", "geolora:geo-heavyball")
# Part d: each entry is a comma-separated list of TrainConfig overrides (key=value), on top of lenet5, bug, tau
# --lenet-tau, batch --lenet-batch-size, --lenet-schedule lr. SGD lr 0.05 is the lottery-ticket setting; geo-heavyball
# (β = 0.9) gets lr 0.005, the same effective step lr / (1 − β).
D_CONFIGS = (
    "optimizer=sgd,lr=0.05",
    "optimizer=geo-heavyball,lr=0.005",
    "optimizer=sgd,lr=0.05,coefficient_steps=10",
    "optimizer=geo-heavyball,lr=0.005,coefficient_steps=10",
    "optimizer=sgd,lr=0.05,coefficient_steps=50",
    "optimizer=geo-heavyball,lr=0.005,coefficient_steps=50",
    "optimizer=sgd,lr=0.05,coefficient_steps=100",
    "optimizer=geo-heavyball,lr=0.005,coefficient_steps=100",
)


# ---------------------------------------------------------------------------------------------- shared
class Factorized(nn.Module):
    """``y = x V Sᵀ Uᵀ + b`` with ``U``, ``S``, ``V`` plain parameters (no orthonormality): the autograd baseline."""

    def __init__(self, U: Tensor, S: Tensor, V: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.U = nn.Parameter(U.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        self.V = nn.Parameter(V.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def like(cls, layer: dlrt.LowRankLinear) -> Factorized:
        return cls(layer.U, layer.S, layer.V, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = (x @ self.V) @ self.S.mT @ self.U.mT
        return y if self.bias is None else y + self.bias


def factorize_autograd(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`~dlrt.LowRankLinear` replaced by a :class:`Factorized` copy."""
    model = copy.deepcopy(model)
    for name, layer in list(dlrt.lowrank_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Factorized.like(layer))
    return model


def make_optimizer(method: str, model: nn.Module, lr: float, rank: int) -> torch.optim.Optimizer:
    kind, integrator, optimizer, kw = METHODS[method]
    if kind == "autograd":
        if optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return torch.optim.SGD(model.parameters(), lr=lr, **kw)
    return dlrt.DLRTOptimizer(
        model, integrator=integrator, optimizer=optimizer, lr=lr, tau=0.0, min_rank=rank, max_rank=rank, **kw
    )


def parse_grids(items: list[str], grids: dict[str, list[float]]) -> dict[str, list[float]]:
    """``METHOD=LR,LR,...`` overrides of a grid table."""
    out = {k: list(v) for k, v in grids.items()}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"grid override {item!r} is not METHOD=LR,LR,... with METHOD one of {sorted(METHODS)}")
        out[method] = [float(v) for v in values.split(",") if v]
    return out


def stride_curve(values: list[float], points: int = 400) -> dict[str, list]:
    """At most ``points`` (step, value) pairs of a per-step curve, the last one always included."""
    if not values:
        return {"steps": [], "values": []}
    stride = max(1, math.ceil(len(values) / points))
    steps = list(range(0, len(values), stride))
    if steps[-1] != len(values) - 1:
        steps.append(len(values) - 1)
    return {"steps": steps, "values": [float(f"{values[s]:.6g}") for s in steps]}


def fmt_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_steps(s: int | None) -> str:
    return "not reached" if s is None else str(s)


def best_run(runs: list[dict[str, Any]], key_final: str) -> dict[str, Any]:
    """Fewest steps to the target; when no lr reaches it, the lowest final value (diverged runs last)."""
    reached = [r for r in runs if r["steps_to_target"] is not None]
    if reached:
        return min(reached, key=lambda r: (r["steps_to_target"], r[key_final]))
    return min(runs, key=lambda r: (r[key_final] is None, r[key_final] or 0.0))


def sweep_grids(
    methods: list[str],
    grids: dict[str, list[float]],
    run: Any,
    describe: Any,
    key_final: str,
    points: int,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``run(method, lr)`` over each method's lr grid; all runs, and the best per method (:func:`best_run`).

    Only the best run of a method keeps its curve (thinned to ``points``).
    """
    runs: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    for method in methods:
        print(f"{method}: lr grid {', '.join(f'{lr:g}' for lr in grids[method])}", flush=True)
        mine = []
        for lr in grids[method]:
            r = run(method, lr)
            print(
                f"  lr {lr:g}: {r['status']}, steps to target {fmt_steps(r['steps_to_target'])}, "
                f"{describe(r)}, {r['seconds']:.1f} s",
                flush=True,
            )
            mine.append(r)
        b = best_run(mine, key_final)
        best[method] = b
        for r in mine:
            curve = r.pop("curve")
            r["best"] = r is b
            if r is b:
                r["curve"] = stride_curve(curve, points)
        runs += mine
    return runs, best


def geometric_check(best: dict[str, dict[str, Any]], what: str) -> dict[str, Any]:
    """Whether the best geometric method reaches the target in fewer steps than every baseline."""
    geo = {m: b for m, b in best.items() if m in GEOMETRIC and b["steps_to_target"] is not None}
    base = [b["steps_to_target"] for m, b in best.items() if m not in GEOMETRIC]
    winner = min(geo, key=lambda m: geo[m]["steps_to_target"]) if geo else None
    steps = geo[winner]["steps_to_target"] if winner else None
    ok = winner is not None and all(s is None or steps < s for s in base)
    reached = [s for s in base if s is not None]
    ratio = float(steps / min(reached)) if steps is not None and reached else None
    return {
        "name": f"{what}: geometric optimizer reaches the target in fewer steps than every baseline "
        f"(best geometric: {winner or 'none reached'}; value: its steps / the best baseline's)",
        "value": ratio,
        "ok": ok,
    }


# ---------------------------------------------------------------------------------------------- part a
def planted_problem(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, Y, W*)``: ``B`` inputs ``x ~ N(0, Σ)`` (rows), targets ``W* x``, float64."""
    g = torch.Generator().manual_seed(args.seed)
    n, m, r, B = args.ls_n, args.ls_m, args.ls_rank, args.ls_samples
    dt = torch.float64
    U, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dt))
    V, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=dt))
    W_star = U @ torch.diag(torch.linspace(10.0, 1.0, r, dtype=dt)) @ V.mT
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=dt))
    eig = torch.logspace(0.0, -math.log10(args.ls_cond), m, dtype=dt)
    X = (torch.randn(B, m, generator=g, dtype=dt) * eig.sqrt()) @ Q.mT
    return X, X @ W_star.mT, W_star


def least_squares_run(
    method: str, lr: float, init: dlrt.LowRankLinear, X: Tensor, Y: Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    model = Factorized.like(init) if METHODS[method][0] == "autograd" else copy.deepcopy(init)
    opt = make_optimizer(method, model, lr, args.ls_rank)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * (model(X) - Y).square().sum(1).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss0 = float(0.5 * (model(X) - Y).square().sum(1).mean())
    curve: list[float] = []
    status, reached = "ok", None
    t0 = time.perf_counter()
    for step in range(args.ls_steps + 1):
        if step == args.ls_steps:  # the loss after the last step
            with torch.no_grad():
                loss = float(0.5 * (model(X) - Y).square().sum(1).mean())
        else:
            try:
                loss = float(opt.step(closure).detach())  # the loss at the point before this step
            except dlrt.NonFiniteError:
                status = "diverged"
                break
        if not math.isfinite(loss) or loss > 1e6 * loss0:
            status = "diverged"
            break
        curve.append(loss / loss0)
        if reached is None and loss / loss0 <= args.ls_target:
            reached = step
            if not args.ls_full:
                break
    final = curve[-1] if curve and status == "ok" else None
    return {
        "method": method,
        "lr": lr,
        "status": status,
        "steps_to_target": reached if status == "ok" else None,  # a run that diverges counts as not reached
        "final_rel_loss": final,
        "steps_run": len(curve) - 1,
        "seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    X, Y, W_star = planted_problem(args)
    torch.manual_seed(args.seed)
    init = dlrt.LowRankLinear(args.ls_m, args.ls_n, rank=args.ls_rank, bias=False, dtype=torch.float64)
    grids = parse_grids(args.ls_grid, LS_GRIDS)
    print(
        f"\n## (a) least squares, planted rank-{args.ls_rank} W* ({args.ls_n}×{args.ls_m}, σ 10…1), "
        f"inputs with condition number {args.ls_cond:g}, {args.ls_samples} samples (float64), full batch; "
        f"target loss/loss₀ ≤ {args.ls_target:g} within {args.ls_steps} steps\n",
        flush=True,
    )

    def describe(r: dict[str, Any]) -> str:
        return f"rel. loss {fmt_num(r['final_rel_loss'], '.3g')} after {r['steps_run']} steps"

    runs, best = sweep_grids(
        args.ls_methods,
        grids,
        lambda method, lr: least_squares_run(method, lr, init, X, Y, args),
        describe,
        "final_rel_loss",
        points=400,
    )

    print("\n| method | lr grid | best lr | steps to target | final rel. loss |")
    print("|---|---|---|---|---|")
    for method, b in best.items():
        grid = ", ".join(f"{lr:g}" for lr in grids[method])
        print(
            f"| {method} | {grid} | {fmt_lr(b['lr'])} | {fmt_steps(b['steps_to_target'])} | "
            f"{fmt_num(b['final_rel_loss'], '.3g')} |"
        )
    if not args.ls_full:
        print("(runs stop at the target, so a reached target's final rel. loss is the first one below it)")
    checks = [geometric_check(best, "(a) least squares")]
    print()
    print_checks(checks)
    return {
        "problem": {
            "n": args.ls_n,
            "m": args.ls_m,
            "rank": args.ls_rank,
            "samples": args.ls_samples,
            "condition": args.ls_cond,
            "steps": args.ls_steps,
            "target": args.ls_target,
            "loss0": float(0.5 * (X @ init.matrix().detach().mT - Y).square().sum(1).mean()),
            "W_star_norm": float(torch.linalg.matrix_norm(W_star)),
        },
        "grids": {m: grids[m] for m in args.ls_methods},
        "runs": runs,
        "best": {m: {k: v for k, v in b.items() if k != "curve"} for m, b in best.items()},
        "checks": checks,
    }


# ---------------------------------------------------------------------------------------------- part b
def mnist_tensors(limit: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from dlrt.data import get_dataset

    train_set, test_set = get_dataset("mnist", "train"), get_dataset("mnist", "test")
    xtr, ytr, xte, yte = train_set.data, train_set.targets, test_set.data, test_set.targets
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    return xtr, ytr, xte, yte


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[Tensor]:
    """The indices of every step's minibatch: epochs of fixed-seed permutations, the last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]
        if n < batch:
            raise SystemExit(f"{n} training samples are fewer than a batch of {batch}")
    return out[:steps]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def mlp_run(
    method: str, lr: float, init: nn.Module, data: tuple, order: list[Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    model = factorize_autograd(init) if METHODS[method][0] == "autograd" else copy.deepcopy(init)
    model.train()
    opt = make_optimizer(method, model, lr, args.mlp_rank)
    curve: list[float] = []
    ema, reached, status = None, None, "ok"
    t0 = time.perf_counter()
    for step, idx in enumerate(order):
        xb, yb = xtr[idx], ytr[idx]

        def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        try:
            loss = float(opt.step(closure).detach())
        except dlrt.NonFiniteError:
            status = "diverged"
            break
        if not math.isfinite(loss):
            status = "diverged"
            break
        ema = loss if ema is None else args.mlp_ema * ema + (1.0 - args.mlp_ema) * loss
        curve.append(ema)
        if reached is None and ema < args.mlp_target:
            reached = step + 1
    acc = accuracy(model, xte, yte) if status == "ok" else None
    return {
        "method": method,
        "lr": lr,
        "status": status,
        "steps_to_target": reached if status == "ok" else None,
        "final_ema_loss": curve[-1] if curve and status == "ok" else None,
        "test_acc": acc,
        "steps_run": len(curve),
        "seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    from dlrt.models import MLP, default_exclude

    data = mnist_tensors(args.limit)
    order = batch_order(len(data[0]), args.mlp_batch_size, args.mlp_steps, args.seed)
    torch.manual_seed(args.seed)
    init = MLP()
    dlrt.convert(init, rank=args.mlp_rank, exclude=default_exclude(init))
    grids = parse_grids(args.mlp_grid, MLP_GRIDS)
    print(
        f"\n## (b) MLP 784-500-500-500-500-10 on MNIST ({len(data[0])} train / {len(data[2])} test), hidden layers "
        f"at rank {args.mlp_rank} (head dense), batch {args.mlp_batch_size}, {args.mlp_steps} steps; target: "
        f"training-loss EMA ({args.mlp_ema}) < {args.mlp_target:g}\n",
        flush=True,
    )

    def describe(r: dict[str, Any]) -> str:
        acc = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f} %"
        return f"final EMA loss {fmt_num(r['final_ema_loss'], '.4f')}, test acc {acc}"

    runs, best = sweep_grids(
        args.mlp_methods,
        grids,
        lambda method, lr: mlp_run(method, lr, init, data, order, args),
        describe,
        "final_ema_loss",
        points=300,
    )

    print("\n| method | lr grid | best lr | steps to target | final EMA loss | test acc (end) |")
    print("|---|---|---|---|---|---|")
    for method, b in best.items():
        acc = "-" if b["test_acc"] is None else f"{100 * b['test_acc']:.2f} %"
        grid = ", ".join(f"{lr:g}" for lr in grids[method])
        print(
            f"| {method} | {grid} | {fmt_lr(b['lr'])} | {fmt_steps(b['steps_to_target'])} | "
            f"{fmt_num(b['final_ema_loss'], '.4f')} | {acc} |"
        )
    checks = [geometric_check(best, "(b) MLP")]
    print()
    print_checks(checks)
    return {
        "setting": {
            "rank": args.mlp_rank,
            "steps": args.mlp_steps,
            "batch_size": args.mlp_batch_size,
            "target": args.mlp_target,
            "ema": args.mlp_ema,
            "train_samples": len(data[0]),
            "test_samples": len(data[2]),
            "params": sum(p.numel() for p in init.parameters()),
        },
        "grids": {m: grids[m] for m in args.mlp_methods},
        "runs": runs,
        "best": {m: {k: v for k, v in b.items() if k != "curve"} for m, b in best.items()},
        "checks": checks,
    }


# ---------------------------------------------------------------------------------------------- part c
def c_label(method: str, optimizer: str) -> str:
    return f"{method}/{optimizer}"


def c_key(method: str, optimizer: str, seed: int, lr: float, args: argparse.Namespace) -> str:
    return f"{method}/{optimizer}/seed{seed}/lr{lr:g}/steps{args.steps}/limit{args.limit}"


def part_c(args: argparse.Namespace, previous: dict[str, Any] | None, save: Any) -> dict[str, Any]:
    from dlrt.training.finetune import build_task, finetune

    methods = [tuple(m.split(":", 1)) for m in args.c_methods]
    runs: list[dict[str, Any]] = list(previous.get("runs", [])) if previous and args.resume else []
    done = {r["key"] for r in runs}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(
        f"\n## (c) MiniLM-L6 / Rotten Tomatoes, {args.steps} steps of batch {args.batch_size}, r 8, tau {args.tau}, "
        f"seeds {args.seeds}, lrs {args.lrs}" + (f", limit {args.limit}" if args.limit else "") + "\n",
        flush=True,
    )
    record: dict[str, Any] = {"runs": runs, "budget": (previous or {}).get("budget") if args.resume else None}
    for seed in args.seeds:
        todo = [(m, o, lr) for m, o in methods for lr in args.lrs if c_key(m, o, seed, lr, args) not in done]
        if not todo:
            continue
        # Issue 12's settings, kept when issue 13 changed GeoLoRA's defaults (docs/geolora.md): alpha 128,
        # 10 coefficient steps, the head at the adapters' lr, query/value.
        cfg_args = argparse.Namespace(
            tau=args.tau,
            geolora_alpha=128.0,
            geolora_optimizer=None,
            targets="qv",
            warmup=0.0,
            pooling="mean",
            steps=args.steps,
            batch_size=args.batch_size,
            limit=args.limit,
            seed=seed,
        )
        base = method_config(cfg_args, "geolora", args.lrs[0])
        torch.manual_seed(seed)  # the new classifier head's initialisation, shared by every method of this seed
        task = build_task(base)
        pristine = copy.deepcopy(task.model)
        labels = task.test_set.labels
        majority = float(torch.bincount(labels).max()) / len(labels)
        for method, optimizer, lr in todo:
            key = c_key(method, optimizer, seed, lr, args)
            cfg = method_config(
                cfg_args,
                method,
                lr,
                optimizer=optimizer,
                coefficient_steps=10,
                modules_to_save_lr_ratio=1.0,
                threads=args.threads,
                runs_dir=str(Path(args.runs_dir) / "c"),
                name=f"{stamp}-{method}-{optimizer}-s{seed}-lr{lr:g}",
                progress=False,
                plots=False,
            )
            task.model = copy.deepcopy(pristine)
            print(f"== {key}", flush=True)
            result = finetune(cfg, task)
            s = result.summary
            acc = s["test_acc"]
            print(
                f"   {s['status']}: test acc {'-' if acc is None else f'{100 * acc:.2f} %'} (majority "
                f"{100 * majority:.2f} %), adapter params {s['adapter_params']:,d}, total rank {s['total_rank']}, "
                f"{s['wall_seconds']:.0f} s",
                flush=True,
            )
            runs.append(
                {
                    "key": key,
                    "method": method,
                    "optimizer": optimizer,
                    "seed": seed,
                    "lr": lr,
                    "steps": args.steps,
                    "limit": args.limit,
                    "status": s["status"],
                    "test_acc": acc,
                    "majority_acc": majority,
                    "adapter_params": s["adapter_params"],
                    "total_rank": s["total_rank"],
                    "trainable_params": s["trainable_params"],
                    "wall_seconds": s["wall_seconds"],
                    "run_dir": str(result.run_dir),
                }
            )
            record["budget"] = 8 * len(s["ranks"])
            save(record)
    record.update(summarize_c(runs, args, methods))
    return record


def summarize_c(runs: list[dict[str, Any]], args: argparse.Namespace, methods: list[tuple[str, ...]]) -> dict:
    """The tables and checks of part c from the runs of this setting (steps, limit, seeds, lrs)."""
    mine = [
        r
        for r in runs
        if r["steps"] == args.steps and r["limit"] == args.limit and r["seed"] in args.seeds and r["lr"] in args.lrs
    ]
    lrs = sorted(set(args.lrs))

    def cell(rs: list[dict[str, Any]]) -> tuple[float | None, float | None]:
        accs = [r["test_acc"] for r in rs if r["test_acc"] is not None]
        if not accs:
            return None, None
        return statistics.mean(accs), statistics.pstdev(accs) if len(accs) > 1 else 0.0

    summary: dict[str, dict[str, Any]] = {}
    print("\n| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | best-lr mean | adapter params |")
    print("|---|" + "---|" * (len(lrs) + 3))
    for method, optimizer in methods:
        label = c_label(method, optimizer)
        per_lr = {}
        cells = []
        for lr in lrs:
            rs = sorted(
                (r for r in mine if (r["method"], r["optimizer"], r["lr"]) == (method, optimizer, lr)),
                key=lambda r: r["seed"],
            )
            mean, std = cell(rs)
            per_lr[lr] = {
                "mean": mean,
                "std": std,
                "seeds": [r["seed"] for r in rs],
                "accs": [r["test_acc"] for r in rs],
                "adapter_params": statistics.mean(r["adapter_params"] for r in rs) if rs else None,
                "total_rank": statistics.mean(r["total_rank"] for r in rs) if rs else None,
            }
            if mean is None:
                cells.append("-")
            else:
                seeds = ", ".join("-" if a is None else f"{100 * a:.1f}" for a in per_lr[lr]["accs"])
                cells.append(f"{100 * mean:.2f} ± {100 * std:.2f} ({seeds})")
        scored = [lr for lr in lrs if per_lr[lr]["mean"] is not None]
        best = max(scored, key=lambda lr: per_lr[lr]["mean"]) if scored else None
        summary[label] = {"per_lr": {f"{lr:g}": v for lr, v in per_lr.items()}, "best_lr": best}
        b = per_lr[best] if best is not None else None
        best_mean = "-" if b is None else f"{100 * b['mean']:.2f} %"
        best_params = "-" if b is None else f"{b['adapter_params']:,.0f} (total rank {b['total_rank']:.1f})"
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt_lr(best)} | {best_mean} | {best_params} |")
    majority = {r["seed"]: r["majority_acc"] for r in mine}
    print(
        "\nmajority class of the test split: "
        + ", ".join(f"seed {s} {100 * a:.2f} %" for s, a in sorted(majority.items()))
        + "\n"
    )

    def best_of(label: str) -> dict[str, Any] | None:
        s = summary.get(label)
        return None if s is None or s["best_lr"] is None else s["per_lr"][f"{s['best_lr']:g}"]

    checks = []
    a = best_of("adalora/adamw")
    for optimizer in ("geo-adam", "geo-heavyball"):  # the targets, for each geometric optimizer run
        label = f"geolora/{optimizer}"
        if label not in summary:
            continue
        geo = [r for r in mine if r["method"] == "geolora" and r["optimizer"] == optimizer]
        margins = [(r["test_acc"] or 0.0) - r["majority_acc"] for r in geo]
        g = best_of(label)
        checks += [
            {
                "name": f"(c) no {optimizer} run within 5 points of the majority class (value: least margin, points)",
                "value": 100 * min(margins) if margins else None,
                "ok": bool(margins) and min(margins) > 0.05,
            },
            {
                "name": f"(c) {optimizer} best-lr 3-seed mean ≥ AdaLoRA best-lr 3-seed mean (value: difference, pt)",
                "value": 100 * (g["mean"] - a["mean"]) if g and a else None,
                "ok": bool(g and a) and g["mean"] >= a["mean"],
            },
            {
                "name": f"(c) ... {optimizer} at fewer adapter params than AdaLoRA (value: ratio at the best lrs)",
                "value": g["adapter_params"] / a["adapter_params"] if g and a and a["adapter_params"] else None,
                "ok": bool(g and a) and g["adapter_params"] < a["adapter_params"],
            },
        ]
    print_checks(checks)
    return {"summary": summary, "majority_acc": majority, "checks": checks}


# ---------------------------------------------------------------------------------------------- part d
def parse_start(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def part_d(args: argparse.Namespace) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    low, full = parse_start(args.lenet_starts[0]), parse_start(args.lenet_starts[1])
    print(
        f"\n## (d) ranks from below: LeNet5 / MNIST, bug, tau {args.lenet_tau}, {args.lenet_epochs} epochs, batch "
        f"{args.lenet_batch_size}, {args.lenet_schedule} lr, start rank {low} against {full}"
        + (f", limit {args.limit}" if args.limit else "")
        + "\n",
        flush=True,
    )
    configs = []
    for i, text in enumerate(args.lenet_configs):
        base = {
            "model": "lenet5",
            "dataset": "mnist",
            "integrator": "bug",
            "tau": args.lenet_tau,
            "epochs": args.lenet_epochs,
            "batch_size": args.lenet_batch_size,
            "schedule": args.lenet_schedule,
            "seed": args.seed,
            "limit": args.limit,
            "threads": args.threads,
            "runs_dir": str(Path(args.runs_dir) / "d"),
            "progress": False,
            "tensorboard": False,
            "plots": False,
        }
        values = apply_overrides(base, [t for t in text.split(",") if t.strip()])
        row: dict[str, Any] = {"config": text}
        for tag, rank in (("low", low), ("full", full)):
            cfg = TrainConfig(**{**values, "rank": rank, "name": f"{stamp}-c{i}-{tag}"})
            print(f"== {text}, start rank {rank}", flush=True)
            result = train(cfg)
            s = result.summary
            row[tag] = {
                "start_rank": rank,
                "status": s["status"],
                "test_acc": s["test_acc"],
                "ranks": s["ranks"],
                "total_rank": sum(s["ranks"].values()),
                "compression": s["compression"],
                "wall_seconds": s["wall_seconds"],
                "run_dir": str(result.run_dir),
            }
            acc = s["test_acc"]
            print(
                f"   {s['status']}: test acc {'-' if acc is None else f'{100 * acc:.2f} %'}, ranks {s['ranks']}, "
                f"{s['wall_seconds']:.0f} s",
                flush=True,
            )
        lo, hi = row["low"], row["full"]
        row["ratio"] = lo["total_rank"] / hi["total_rank"] if hi["total_rank"] else None
        row["acc_gap"] = (
            lo["test_acc"] - hi["test_acc"] if lo["test_acc"] is not None and hi["test_acc"] is not None else None
        )
        configs.append(row)

    names = list(configs[0]["low"]["ranks"]) if configs else []
    print(
        f"\n| config | ranks from {low} ({', '.join(names)}) | ranks from {full} | Σ ratio | test acc from {low} | "
        f"test acc from {full} |"
    )
    print("|---|---|---|---|---|---|")
    checks = []
    for row in configs:
        lo, hi = row["low"], row["full"]

        def acc(r: dict[str, Any]) -> str:
            return "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f} %"

        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(
            f"| {row['config']} | {list(lo['ranks'].values())} | {list(hi['ranks'].values())} | {ratio} | "
            f"{acc(lo)} | {acc(hi)} |"
        )
        ok = row["ratio"] is not None and row["ratio"] >= 0.8 and row["acc_gap"] is not None
        ok = ok and abs(row["acc_gap"]) <= 0.005
        checks.append(
            {
                "name": f"(d) {row['config']}: rank-{low} start reaches ≥ 80 % of the full-start ranks at equal "
                "accuracy (within 0.5 pt) (value: Σ-rank ratio)",
                "value": row["ratio"],
                "ok": ok,
            }
        )
    print()
    print_checks(checks)
    return {"configs": configs, "checks": checks}


# ---------------------------------------------------------------------------------------------- figure
def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = record.get("parts", {})
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (ax_a, ax_b), (ax_c, ax_d) = axes

    def missing(ax: Any, part: str) -> None:
        ax.text(0.5, 0.5, f"part {part} not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    for ax, part, ylabel, title in (
        (ax_a, "a", "loss / loss₀", "(a) least squares, best lr per method"),
        (ax_b, "b", "training loss (EMA)", "(b) MLP on MNIST, best lr per method"),
    ):
        res = parts.get(part)
        if not res:
            missing(ax, part)
            continue
        for r in res["runs"]:
            if r.get("best") and r.get("curve"):
                style = "-" if r["method"] in GEOMETRIC else "--"
                label = f"{r['method']} (lr {r['lr']:g})"
                ax.plot(r["curve"]["steps"], r["curve"]["values"], style, label=label, lw=1.4)
        target = res.get("problem", res.get("setting", {})).get("target")
        if target:
            ax.axhline(target, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)

    res = parts.get("c")
    if not res or not res.get("runs"):
        missing(ax_c, "c")
    else:
        groups: dict[str, dict[float, list[float]]] = {}
        for r in res["runs"]:
            if r["test_acc"] is not None:
                groups.setdefault(c_label(r["method"], r["optimizer"]), {}).setdefault(r["lr"], []).append(
                    r["test_acc"]
                )
        for label, by_lr in groups.items():
            lrs = sorted(by_lr)
            means = [100 * statistics.mean(by_lr[lr]) for lr in lrs]
            stds = [100 * statistics.pstdev(by_lr[lr]) for lr in lrs]
            ax_c.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=label)
        maj = [r["majority_acc"] for r in res["runs"]]
        ax_c.axhline(100 * statistics.mean(maj), color="k", lw=0.8, ls=":", label="majority class")
        ax_c.set_xscale("log")
        ax_c.set_xlabel("learning rate")
        ax_c.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax_c.set_title("(c) MiniLM / Rotten Tomatoes")
        ax_c.legend(fontsize=7)

    res = parts.get("d")
    if not res or not res.get("configs"):
        missing(ax_d, "d")
    else:
        cfgs = res["configs"]
        xs = range(len(cfgs))
        for off, tag in ((-0.2, "low"), (0.2, "full")):
            heights = [c[tag]["total_rank"] for c in cfgs]
            bars = ax_d.bar([x + off for x in xs], heights, width=0.4, label=f"start rank {cfgs[0][tag]['start_rank']}")
            for bar, c in zip(bars, cfgs):
                acc = c[tag]["test_acc"]
                text = "-" if acc is None else f"{100 * acc:.1f}%"
                ax_d.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7)
        ax_d.set_xticks(list(xs))
        short = {"optimizer=": "", "lr=": "lr ", "coefficient_steps=": "s "}
        labels = []
        for c in cfgs:
            text = c["config"]
            for long, brief in short.items():
                text = text.replace(long, brief)
            labels.append(text.replace(",", "\n"))
        ax_d.set_xticklabels(labels, fontsize=6)
        ax_d.set_ylabel("final Σ ranks (labels: test accuracy)")
        ax_d.set_title("(d) LeNet5 / MNIST: ranks from below")
        ax_d.legend(fontsize=7)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- main
def load_record(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path} is not valid JSON ({err}); move it away or pass another --out") from None
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--seed", type=int, default=0, help="seed of parts a, b and d")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--limit", type=int, default=None, help="parts b, c, d: only the first N train/test examples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--png", type=Path, default=DEFAULT_PNG)
    p.add_argument("--runs-dir", default="runs/optimizers", help="run directories of parts c and d")
    p.add_argument("--strict", action="store_true", help="exit 1 if a check of the JSON fails")
    a = p.add_argument_group("part a: least squares")
    a.add_argument("--ls-methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    a.add_argument("--ls-grid", nargs="*", default=[], metavar="METHOD=LR,LR", help="replace a method's lr grid")
    a.add_argument("--ls-n", type=int, default=128)
    a.add_argument("--ls-m", type=int, default=128)
    a.add_argument("--ls-rank", type=int, default=8)
    a.add_argument("--ls-samples", type=int, default=1024)
    a.add_argument("--ls-cond", type=float, default=1e3, help="condition number of the input covariance")
    a.add_argument("--ls-steps", type=int, default=2000)
    a.add_argument("--ls-target", type=float, default=1e-6)
    a.add_argument("--ls-full", action="store_true", help="run every lr all --ls-steps (default: stop at the target)")
    b = p.add_argument_group("part b: MLP on MNIST")
    b.add_argument("--mlp-methods", nargs="+", default=list(MLP_METHODS), choices=list(METHODS))
    b.add_argument("--mlp-grid", nargs="*", default=[], metavar="METHOD=LR,LR", help="replace a method's lr grid")
    b.add_argument("--mlp-rank", type=int, default=20)
    b.add_argument("--mlp-steps", type=int, default=1500)
    b.add_argument("--mlp-batch-size", type=int, default=128)
    b.add_argument("--mlp-target", type=float, default=0.15)
    b.add_argument("--mlp-ema", type=float, default=0.98)
    c = p.add_argument_group("part c: GeoLoRA on MiniLM / Rotten Tomatoes")
    c.add_argument("--c-methods", nargs="+", default=list(C_METHODS), metavar="METHOD:OPTIMIZER")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 1e-3, 5e-3])
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--tau", type=float, default=0.1)
    c.add_argument("--resume", action="store_true", help="skip the runs of part c already in --out")
    d = p.add_argument_group("part d: LeNet5 ranks from below")
    d.add_argument(
        "--lenet-configs",
        nargs="+",
        default=list(D_CONFIGS),
        metavar="KEY=VALUE,...",
        help="TrainConfig overrides per configuration (comma-separated)",
    )
    d.add_argument("--lenet-starts", nargs=2, default=["2", "1.0"], metavar=("LOW", "FULL"), help="start ranks")
    d.add_argument("--lenet-epochs", type=int, default=3)
    d.add_argument("--lenet-tau", type=float, default=0.11)
    d.add_argument("--lenet-batch-size", type=int, default=256)
    d.add_argument("--lenet-schedule", default="constant", choices=("constant", "cosine", "step"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for m in args.c_methods:
        if ":" not in m:
            p.error(f"--c-methods takes METHOD:OPTIMIZER, got {m!r}")

    def save(part: str, result: dict[str, Any], seconds: float) -> int:
        record = load_record(args.out)  # re-read: another process may have written other parts meanwhile
        record.update(environment(args))
        parts = record.setdefault("parts", {})
        parts[part] = {**result, "wall_seconds": seconds, "environment": environment(args)}
        record["checks"] = [ch for key in sorted(parts) for ch in parts[key].get("checks", [])]
        return write_results(args, record)

    status = 0
    for part in sorted(set(args.parts)):
        t0 = time.perf_counter()
        if part == "a":
            result = part_a(args)
        elif part == "b":
            result = part_b(args)
        elif part == "c":
            previous = load_record(args.out).get("parts", {}).get("c")
            result = part_c(
                args, previous, lambda rec, t0=t0: save("c", {**rec, "checks": []}, time.perf_counter() - t0)
            )
        else:
            result = part_d(args)
        seconds = time.perf_counter() - t0
        print(f"part {part}: {seconds:.0f} s", flush=True)
        status = save(part, result, seconds)
        plot(load_record(args.out), args.png)
    return status


if __name__ == "__main__":
    sys.exit(main())
