"""Neural entropy closures against the batched Newton solver: speed, accuracy, solver error, memory.

Each spec (moment order N, network) trains a closure with ``dlrt closure train``'s recipe
(:func:`dlrt.kinetic.train_closure`, the one training driver), then, in the same process:

* times the closure ``u ↦ α`` of ``--cells`` held-out cells (float64 for both, batch-vectorised):
  the damped Newton solver from the isotropic start, and the network (forward, ``α = ∇h``,
  ``α₀`` by normalisation); medians over ``--repeats`` interleaved repeats;
* relative errors ``‖ŷ − y‖_F / ‖y‖_F`` of ``h``, ``α`` and ``u`` on those held-out cells
  (sampled with another seed than the training data);
* the 1D M_N solver on both test cases with either closure, and the relative L² difference
  of the network solution from the Newton one;
* the memory of the network (parameters, bytes as stored) — Newton stores nothing.

    python benchmarks/closure.py                 # train + measure every spec (results appended)
    python benchmarks/closure.py --summarize     # the table, the target checks and the PNG

Target (issue 18): for M2, network ≥ 10× faster than Newton at relative u-error ≤ 1e-3, and both
solver solutions within 1e-2 relative L² of the Newton ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import environment, load_average, run_sweep

OUT = Path(__file__).resolve().parent / "results" / "closure.jsonl"
#: per order: α bound and conditioning filter of the training data (covering the test cases' states)
DOMAIN = {2: (5.0, 1e-2), 3: (6.0, 3e-3), 4: (10.0, 1e-3)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from dlrt.kinetic import (
        CASES,
        ClosureConfig,
        NetworkClosure,
        NewtonClosure,
        closure_errors,
        load_closure,
        newton,
        predict,
        sample,
        solve,
        train_closure,
    )

    torch.set_num_threads(spec["threads"])
    order, model_kind = spec["order"], spec["model"]
    bound, min_eig = DOMAIN[order]
    run_dir = Path(spec["runs_dir"]) / spec["name"]
    if not (run_dir / "checkpoint.safetensors").is_file():
        cfg = ClosureConfig(
            order=order,
            model=model_kind,
            width=spec["width"],
            depth=spec["depth"],
            samples=spec["samples"],
            bound=bound,
            min_eig=min_eig,
            epochs=spec["epochs"],
            batch_size=spec["batch_size"],
            lr=spec["lr"],
            lr_final=spec["lr_final"],
            loss_u=spec.get("loss_u", 1.0),
            runs_dir=spec["runs_dir"],
            name=spec["name"],
            progress=False,
            threads=spec["threads"],
        )
        t0 = time.perf_counter()
        train_closure(cfg)
        train_seconds = time.perf_counter() - t0
    else:
        train_seconds = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
    model, basis, cfg = load_closure(run_dir)  # float64
    held = sample(basis, spec["cells"], bound=bound, min_eig=min_eig, seed=10_000 + spec["seed"])
    errors = closure_errors(model, held, basis, cfg.gamma)

    def run_newton() -> None:
        newton(held.u, basis)

    def run_network() -> None:
        with torch.no_grad():
            predict(model, held.u, basis, reconstruct=False)

    times: dict[str, list[float]] = {"newton": [], "network": []}
    for _ in range(spec["repeats"]):
        for name, fn in (("newton", run_newton), ("network", run_network)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    per_1e5 = {k: statistics.median(v) * 1e5 / spec["cells"] for k, v in times.items()}
    solver = {}
    for case in ("source", "periodic"):
        problem = CASES[case](basis, cells=100)
        ref = solve(problem, basis, NewtonClosure(basis, cfg.gamma))
        net = solve(problem, basis, NetworkClosure(model, basis, cfg.gamma))
        solver[case] = {
            "rel_l2": float((net.u - ref.u).norm() / ref.u.norm()),
            "newton_closure_seconds": ref.closure_seconds,
            "network_closure_seconds": net.closure_seconds,
            "steps": ref.steps,
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        **spec,
        "bound": bound,
        "min_eig": min_eig,
        "train_seconds": train_seconds,
        "val_u_err": summary.get("u_err"),
        **{f"test_{k}": v for k, v in errors.items()},
        "newton_seconds_per_1e5": per_1e5["newton"],
        "network_seconds_per_1e5": per_1e5["network"],
        "speedup": per_1e5["newton"] / per_1e5["network"],
        "times": times,
        "solver": solver,
        "parameters": summary["parameters"],
        "model_bytes_float32": summary["parameters"] * 4,
        "model_bytes_float64": summary["parameters"] * 8,
        "load_after": load_average("after"),
    }


def describe(r: dict[str, Any]) -> str:
    s = r["solver"]
    return (
        f"M{r['order']} {r['model']:<5} w{r['width']} {r['epochs']} epochs: u-err {r['test_u_err']:.2e}, "
        f"α-err {r['test_alpha_err']:.2e}, "
        f"h-err {r['test_h_err']:.2e}; Newton {r['newton_seconds_per_1e5']:.3f}s, network "
        f"{r['network_seconds_per_1e5']:.3f}s per 1e5 cells ({r['speedup']:.1f}x); solver rel. L2 source "
        f"{s['source']['rel_l2']:.2e}, periodic {s['periodic']['rel_l2']:.2e}; {r['parameters']:,d} parameters"
    )


def _order(r: dict[str, Any]) -> tuple:
    return (r["order"], r["model"], r["width"], r["epochs"], r.get("loss_u", 1.0))


def summarize(out: Path) -> int:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    header = (
        f"{'closure':<14} {'epochs':>6} {'w_u':>4} {'u err':>9} {'α err':>9} {'h err':>9} "
        f"{'Newton s/1e5':>13} {'net s/1e5':>10} "
        f"{'speedup':>8} {'solver L2 source':>17} {'periodic':>9} {'params':>8} {'KiB f32':>8}"
    )
    print(header)
    for r in sorted(rows, key=_order):
        s = r["solver"]
        print(
            f"M{r['order']} {r['model']:<5} w{r['width']:<4} {r['epochs']:>6} {r.get('loss_u', 1.0):>4g} "
            f"{r['test_u_err']:>9.2e} "
            f"{r['test_alpha_err']:>9.2e} {r['test_h_err']:>9.2e} {r['newton_seconds_per_1e5']:>13.3f} "
            f"{r['network_seconds_per_1e5']:>10.3f} "
            f"{r['speedup']:>7.1f}x {s['source']['rel_l2']:>17.2e} {s['periodic']['rel_l2']:>9.2e} "
            f"{r['parameters']:>8,d} {r['model_bytes_float32'] / 1024:>8.1f}"
        )
    checks = []
    for r in rows:
        if r["order"] == 2 and r["model"] == "icnn":
            s = r["solver"]
            which = f"M2 ICNN w{r['width']} {r['epochs']} epochs w_u {r.get('loss_u', 1.0):g}:"
            checks += [
                (f"{which} ≥ 10x faster than Newton", r["speedup"] >= 10, r["speedup"]),
                (f"{which} relative u-error ≤ 1e-3", r["test_u_err"] <= 1e-3, r["test_u_err"]),
                (f"{which} solver within 1e-2 (source)", s["source"]["rel_l2"] <= 1e-2, s["source"]["rel_l2"]),
                (f"{which} solver within 1e-2 (periodic)", s["periodic"]["rel_l2"] <= 1e-2, s["periodic"]["rel_l2"]),
            ]
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name} ({value:.3g})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no PNG")
        return 0
    rows = sorted(rows, key=_order)
    labels = [f"M{r['order']} {r['model']} w{r['width']} e{r['epochs']} u{r.get('loss_u', 1.0):g}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    x = range(len(rows))
    for k, (key, name) in enumerate((("test_u_err", "u"), ("test_alpha_err", "α"), ("test_h_err", "h"))):
        ax1.bar([i + 0.25 * (k - 1) for i in x], [r[key] for r in rows], 0.25, label=f"rel. error {name}")
    src = [r["solver"]["source"]["rel_l2"] for r in rows]
    per = [r["solver"]["periodic"]["rel_l2"] for r in rows]
    ax1.plot(list(x), src, "k^", label="solver L2 (source)")
    ax1.plot(list(x), per, "kv", label="solver L2 (periodic)")
    ax1.axhline(1e-3, color="gray", ls=":")
    ax1.set_yscale("log")
    ax1.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
    ax1.legend(fontsize=7)
    ax1.set_title("held-out errors (network vs Newton)")
    ax2.bar(list(x), [r["speedup"] for r in rows])
    ax2.axhline(10, color="gray", ls=":")
    ax2.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
    ax2.set_ylabel("Newton time / network time (1e5 cells, float64)")
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--models", nargs="+", default=["icnn"], help="icnn | alpha (the baseline) per order")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--epochs", type=int, nargs="+", default=[40], help="per order (one value: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-final", type=float, default=3e-5)
    p.add_argument("--loss-u", type=float, default=1.0, help="weight of the u term of the Sobolev loss")
    p.add_argument("--cells", type=int, default=100_000, help="held-out cells timed and scored")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--runs-dir", default="runs/closure-bench")
    p.add_argument("--out", type=Path, default=OUT, help="results, one JSON line per spec")
    p.add_argument("--summarize", action="store_true", help="print the table and targets, write the PNG")
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        record = measure(spec)
        print("RESULT " + json.dumps(record))
        return 0
    if args.summarize:
        return summarize(args.out)
    load_average("before")
    env = environment(args)
    epochs = dict(zip(args.orders, args.epochs * len(args.orders) if len(args.epochs) == 1 else args.epochs))
    specs = [
        {
            "name": f"m{order}-{model}-w{args.width}-e{epochs[order]}-u{args.loss_u:g}-s{args.seed}",
            "order": order,
            "model": model,
            "width": args.width,
            "depth": args.depth,
            "samples": args.samples,
            "epochs": epochs[order],
            "batch_size": args.batch_size,
            "lr": args.lr,
            "lr_final": args.lr_final,
            "loss_u": args.loss_u,
            "cells": args.cells,
            "repeats": args.repeats,
            "seed": args.seed,
            "threads": args.threads,
            "runs_dir": args.runs_dir,
            "command": env["command"],
            "torch_version": env["torch_version"],
        }
        for order in args.orders
        for model in args.models
    ]
    run_sweep(__file__, specs, args.out, key=lambda r: (r["name"], r["cells"]), describe=describe, jobs=args.jobs)
    return summarize(args.out)


if __name__ == "__main__":
    sys.exit(main())
