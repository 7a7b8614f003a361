"""Does the start decide the result? The same ``dlrt train`` run from a small start rank and from full rank.

Under the gradient rank rule (docs/algorithms.md §1.2) ranks grow and shrink with the task, so a run
started at rank 2 should end near the ranks and the accuracy of the same run started at full rank, and
its first epoch should cost less. Each setting runs the recipe of ``dlrt train`` (Adam 3e-3, cosine,
batch 128; 5 epochs) over several seeds, from ``--small`` and from full rank (``rank=1.0``), through
the one training pipeline; each run leaves a run directory (with ``rank_steps.png``). Checked per
setting, seed-averaged:

* every layer's (every Tucker mode's) final rank from the small start within [0.5×, 2×] of the full start's;
* final test accuracy within 0.3 points of the full start's;
* the first epoch from the small start costs less wall time than from full rank (a ratio, same machine).

Rerun (appends to the JSON lines, skipping what is there; ``--summarize`` prints the tables)::

    python benchmarks/rank_start.py                                # LeNet5, tau 0.11, seeds 0 1 2
    python benchmarks/rank_start.py --taus 0.2 --seeds 0 [--tau-grad 0.11]
    python benchmarks/rank_start.py --model mlp --small 5 --taus 0.1
    python benchmarks/rank_start.py --conv tucker --seeds 0
    python benchmarks/rank_start.py --summarize
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchlib import run_sweep

OUT = Path("benchmarks/results/rank_start.jsonl")


def one(spec: dict) -> dict:
    from dlrt.training import TrainConfig, read_metrics, train

    cfg = TrainConfig(
        dataset="mnist",
        model=spec["model"],
        conv=spec["conv"],
        rank=spec["rank"],
        tau=spec["tau"],
        tau_mode=spec["tau_mode"],
        tau_grad=spec.get("tau_grad"),
        epochs=spec["epochs"],
        seed=spec["seed"],
        threads=1,
        runs_dir=spec["runs_dir"],
        name=spec["name"],
        progress=False,
        tensorboard=False,
    )
    existing = Path(spec["runs_dir"]) / spec["name"]
    # A run directory without a result line is a run that was stopped: continue it where it stopped.
    result = train(resume_dir=existing) if (existing / "config.yaml").is_file() else train(cfg)
    rows = read_metrics(result.run_dir)
    return {
        **spec,
        "status": result.status,
        "final_acc": rows[-1]["test_acc"],
        "compression": result.summary["compression"],
        "ranks": result.summary["ranks"],
        "epoch_seconds": [r["seconds"] for r in rows],
        "run_dir": str(result.run_dir),
    }


def key(spec: dict) -> tuple:
    return (
        spec["model"],
        spec["conv"],
        spec["tau"],
        spec["tau_mode"],
        spec.get("tau_grad"),
        str(spec["rank"]),
        spec["epochs"],
        spec["seed"],
    )


def describe(r: dict) -> str:
    return (
        f"{r['model']} {r['conv']} tau {r['tau']} start {r['rank']} seed {r['seed']}: "
        f"{100 * r['final_acc']:.2f} %, compression {100 * r['compression']:.1f} %, ranks {r['ranks']}"
    )


def _flat_ranks(ranks: dict) -> dict[str, float]:
    """Per layer, or per Tucker mode (``name[i]``), the rank as a number."""
    out: dict[str, float] = {}
    for name, r in ranks.items():
        if isinstance(r, list | tuple):
            out.update({f"{name}[{i}]": float(x) for i, x in enumerate(r)})
        else:
            out[name] = float(r)
    return out


def summarize(out: Path) -> int:
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        full = str(r["rank"]) == "1.0"
        setting = (r["model"], r["conv"], r["tau"], r["tau_mode"], r.get("tau_grad"), r["epochs"])
        groups.setdefault(setting, {}).setdefault("full" if full else str(r["rank"]), []).append(r)
    failed = 0
    for (model, conv, tau, mode, tau_grad, epochs), starts in sorted(groups.items(), key=str):
        grad = "" if tau_grad is None else f", tau_grad {tau_grad}"
        print(f"\n{model} ({conv}) on MNIST, tau {tau} ({mode}{grad}), {epochs} epochs")
        for start, runs in sorted(starts.items()):
            names = _flat_ranks(runs[0]["ranks"])
            ranks = {k: statistics.mean(_flat_ranks(r["ranks"])[k] for r in runs) for k in names}
            print(
                f"  start {start:>4}: seeds {sorted(r['seed'] for r in runs)}, "
                f"acc {100 * statistics.mean(r['final_acc'] for r in runs):.2f} %, "
                f"compression {100 * statistics.mean(r['compression'] for r in runs):.1f} %, "
                f"first epoch {statistics.mean(r['epoch_seconds'][0] for r in runs):.1f} s, "
                f"ranks {', '.join(f'{k} {v:.1f}' for k, v in ranks.items())}"
            )
        if "full" not in starts or len(starts) < 2:
            continue
        full = starts["full"]
        for start, runs in starts.items():
            if start == "full":
                continue
            seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in full})
            pick = [(next(r for r in runs if r["seed"] == s), next(r for r in full if r["seed"] == s)) for s in seeds]
            if not pick:
                continue
            names = _flat_ranks(pick[0][0]["ranks"])
            ratio = {
                k: statistics.mean(_flat_ranks(a["ranks"])[k] for a, _ in pick)
                / statistics.mean(_flat_ranks(b["ranks"])[k] for _, b in pick)
                for k in names
            }
            gap = 100 * statistics.mean(a["final_acc"] - b["final_acc"] for a, b in pick)
            first = statistics.mean(a["epoch_seconds"][0] / b["epoch_seconds"][0] for a, b in pick)
            checks = [
                (f"ranks from {start} within [0.5, 2]x of full", all(0.5 <= v <= 2 for v in ratio.values()), ratio),
                (f"accuracy from {start} within 0.3 points of full", abs(gap) <= 0.3, f"{gap:+.2f} points"),
                (f"first epoch from {start} cheaper than from full", first < 1, f"{first:.2f}x"),
            ]
            for name, ok, value in checks:
                failed += not ok
                shown = {k: round(v, 2) for k, v in value.items()} if isinstance(value, dict) else value
                print(f"  {'PASS' if ok else 'FAIL'}: {name} ({shown})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", default="lenet5", choices=("lenet5", "mlp"))
    p.add_argument("--conv", default="matrix", choices=("matrix", "tucker"))
    p.add_argument("--small", type=int, default=2, help="the small start rank (an int)")
    p.add_argument("--taus", type=float, nargs="+", default=[0.11])
    p.add_argument("--tau-mode", default="gradient", choices=("gradient", "relative"))
    p.add_argument("--tau-grad", type=float, default=None, help="the gradient rule's trend tolerance (default: tau)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--runs-dir", default="runs/rank_start")
    p.add_argument("--out", type=Path, default=OUT, help="results, one JSON line per run")
    p.add_argument("--summarize", action="store_true", help="print the tables and the checks")
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return 0
    if args.summarize:
        return summarize(args.out)
    specs = []
    for tau in args.taus:
        for seed in args.seeds:
            for rank in (args.small, 1.0):
                grad = "" if args.tau_grad is None else f"-grad{args.tau_grad:g}"
                name = f"{args.model}-{args.conv}-tau{tau:g}-{args.tau_mode}{grad}-start{rank}-s{seed}"
                specs.append(
                    {
                        "model": args.model,
                        "conv": args.conv,
                        "rank": rank,
                        "tau": tau,
                        "tau_mode": args.tau_mode,
                        "tau_grad": args.tau_grad,
                        "epochs": args.epochs,
                        "seed": seed,
                        "runs_dir": args.runs_dir,
                        "name": name,
                    }
                )
    run_sweep(__file__, specs, args.out, key, describe, args.jobs)
    return summarize(args.out)


if __name__ == "__main__":
    sys.exit(main())
