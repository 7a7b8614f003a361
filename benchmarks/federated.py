"""Federated training: FeDLRT (each variance correction) against FedAvg and FedLin.

Every run goes through ``dlrt federated`` (:func:`dlrt.federated.federate`, in process):
the same model, data split, client sampling, batches and client SGD step (lr, batch,
local steps) for every method. Reported per setting (mean over seeds): the final
global test accuracy, and per client and round the floats sent and received (×4 bytes,
float32) and the client multiply-adds (docs/federated.md, "Accounting"), with their
ratios to FedAvg's.

The grid: ``--models`` (the lottery-ticket MLP 784-500-500-500-500-10, LeNet5) ×
``--datasets`` × ``--clients`` × ``--alphas`` (``iid`` or a Dirichlet α) × methods ×
``--seeds``.

Rerun::

    python benchmarks/federated.py                          # MLP on MNIST, 4 clients, IID and α 0.1
    python benchmarks/federated.py --datasets mnist fashion-mnist --clients 4 16 --models mlp lenet5
    python benchmarks/federated.py --summarize              # table, targets and PNG from the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchlib import run_sweep

RESULTS = Path("benchmarks/results/federated.jsonl")
METHODS = [
    ("fedavg", "none"),
    ("fedlin", "none"),
    ("fedlrt", "full"),
    ("fedlrt", "simplified"),
    ("fedlrt", "none"),
]


def _label(method: str, correction: str) -> str:
    return method if method != "fedlrt" else f"fedlrt-{correction}"


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    from dlrt.federated import federate
    from dlrt.training.config import FederatedConfig

    alpha = None if spec["alpha"] == "iid" else float(spec["alpha"])
    cfg = FederatedConfig(
        method=spec["method"],
        correction=spec["correction"],
        dataset=spec["dataset"],
        model=spec["model"],
        clients=spec["clients"],
        rounds=spec["rounds"],
        local_steps=spec["local_steps"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        rank=spec["rank"],
        tau=spec["tau"],
        # Results recorded before the gradient rank rule had the relative rule and the scaled start.
        tau_mode=spec.get("tau_mode", "relative"),
        dirichlet_alpha=alpha,
        eval_every=spec["eval_every"],
        grad_batches=spec.get("grad_batches", 4),
        seed=spec["seed"],
        threads=1,
        runs_dir=spec["runs_dir"],
        name=spec["name"],
        progress=False,
        plots=False,
    )
    result = federate(cfg)
    s, rows = result.summary, result.rows
    return {
        **{k: v for k, v in spec.items() if k not in ("runs_dir",)},
        "status": result.status,
        "test_acc": s["test_acc"],
        "curve": [(r["round"], r["test_acc"]) for r in rows if r["test_acc"] == r["test_acc"]],
        "bytes_client_round": statistics.fmean(r["bytes_client"] for r in rows),
        "macs_client_round": statistics.fmean(r["macs_client"] for r in rows),
        "bytes_total": s["bytes_total"],
        "ranks": s["ranks"],
        "compression": s["compression"],
        "wall_seconds": s["wall_seconds"],
    }


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for model in args.models:
        for dataset in args.datasets:
            for clients in args.clients:
                for alpha in args.alphas:
                    for seed in args.seeds:
                        for method, correction in METHODS:
                            if args.methods and _label(method, correction) not in args.methods:
                                continue
                            label = _label(method, correction)
                            anchors = "all" if args.grad_batches is None else args.grad_batches
                            name = f"{model}-{dataset}-c{clients}-{alpha}-{label}-s{seed}-r{args.rounds}-g{anchors}"
                            out.append(
                                {
                                    "model": model,
                                    "dataset": dataset,
                                    "clients": clients,
                                    "alpha": alpha,
                                    "method": method,
                                    "correction": correction,
                                    "seed": seed,
                                    "rounds": args.rounds,
                                    "local_steps": args.local_steps,
                                    "batch_size": args.batch_size,
                                    "lr": args.lr,
                                    "rank": args.rank,
                                    "tau": args.tau,
                                    "tau_mode": args.tau_mode,
                                    "eval_every": args.eval_every,
                                    "grad_batches": args.grad_batches,
                                    "runs_dir": args.runs_dir,
                                    "name": name,
                                }
                            )
    return out


def _setting(r: dict[str, Any]) -> tuple:
    anchors = r.get("grad_batches", 4)
    return (
        r["model"],
        r["dataset"],
        r["clients"],
        r["alpha"],
        r["rounds"],
        r["local_steps"],
        r["lr"],
        r["tau"],
        anchors,
        r.get("tau_mode", "relative"),
    )


def _key(r: dict[str, Any]) -> tuple:
    return (*_setting(r), r["method"], r["correction"], r["seed"])


def _describe(r: dict[str, Any]) -> str:
    return (
        f"{r['model']} {r['dataset']} {r['clients']} clients {r['alpha']} {_label(r['method'], r['correction'])} "
        f"s{r['seed']}: {100 * r['test_acc']:.2f}%, {r['bytes_client_round'] / 1e6:.3f} MB and "
        f"{r['macs_client_round'] / 1e9:.3f} GMAC per client and round, ranks {r['ranks']}"
    )


def summarize(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault(_setting(r), {}).setdefault(_label(r["method"], r["correction"]), []).append(r)
    table = []
    for setting, by_method in groups.items():
        # FedAvg computes no anchor gradients: a setting that differs only in them shares its FedAvg runs.
        base = by_method.get("fedavg") or next(
            (m["fedavg"] for s, m in groups.items() if s[:-1] == setting[:-1] and "fedavg" in m), None
        )
        base_bytes = statistics.fmean(r["bytes_client_round"] for r in base) if base else float("nan")
        base_macs = statistics.fmean(r["macs_client_round"] for r in base) if base else float("nan")
        base_acc = statistics.fmean(r["test_acc"] for r in base) if base else float("nan")
        print(
            f"\n{setting[0]} {setting[1]}, {setting[2]} clients, {setting[3]}, {setting[4]} rounds × "
            f"{setting[5]} local steps, lr {setting[6]}, τ {setting[7]}, "
            f"anchor gradients over {'all samples' if setting[8] is None else f'{setting[8]} batches'}"
        )
        header = ["method", "seeds", "final acc.", "Δ vs FedAvg", "MB / client / round", "vs FedAvg"]
        print("| " + " | ".join([*header, "GMAC / client / round", "vs FedAvg"]) + " |")
        print("|---|---|---|---|---|---|---|---|")
        for label, rs in by_method.items():
            acc = statistics.fmean(r["test_acc"] for r in rs)
            b = statistics.fmean(r["bytes_client_round"] for r in rs)
            m = statistics.fmean(r["macs_client_round"] for r in rs)
            row = {
                "setting": setting,
                "method": label,
                "seeds": len(rs),
                "acc": acc,
                "delta": acc - base_acc,
                "bytes": b,
                "bytes_ratio": base_bytes / b,
                "macs": m,
                "macs_ratio": base_macs / m,
                "curve": [
                    (rnd, statistics.fmean(c[i][1] for c in (r["curve"] for r in rs)))
                    for i, (rnd, _) in enumerate(rs[0]["curve"])
                ],
            }
            table.append(row)
            print(
                f"| {label} | {len(rs)} | {100 * acc:.2f} | {100 * (acc - base_acc):+.2f} | {b / 1e6:.3f} | "
                f"{base_bytes / b:.1f}× | {m / 1e9:.3f} | {base_macs / m:.1f}× |"
            )
    print()
    for c in targets(table):
        print(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}")
    return table


def targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for row in table:
        if row["method"] != "fedlrt-full" or row["setting"][0] != "mlp":
            continue
        anchors = "all samples" if row["setting"][8] is None else f"{row['setting'][8]} batches"
        where = (
            f"{row['setting'][1]}, {row['setting'][2]} clients, {row['setting'][3]}, lr {row['setting'][6]}, {anchors}"
        )
        checks.append(
            {
                "name": f"FeDLRT (full) within 1 point of FedAvg ({where}): {100 * row['delta']:+.2f}",
                "ok": row["delta"] >= -0.01,
            }
        )
        checks.append(
            {"name": f"≥ 5× less communication ({where}): {row['bytes_ratio']:.1f}×", "ok": row["bytes_ratio"] >= 5}
        )
        checks.append(
            {"name": f"≥ 5× fewer client MACs ({where}): {row['macs_ratio']:.1f}×", "ok": row["macs_ratio"] >= 5}
        )
    return checks


def plot(table: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in table))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for row in (r for r in table if r["setting"] == setting):
            xs = [rnd for rnd, _ in row["curve"]]
            ax.plot(xs, [100 * a for _, a in row["curve"]], marker=".", label=row["method"])
        ax.set_title(f"{setting[0]} {setting[1]}, {setting[2]} clients, {setting[3]}")
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["mlp"], choices=("mlp", "lenet5"))
    p.add_argument("--datasets", nargs="+", default=["mnist"])
    p.add_argument("--clients", type=int, nargs="+", default=[4])
    p.add_argument("--alphas", nargs="+", default=["iid", "0.1"], help="iid, or Dirichlet α values")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--tau-mode", default="gradient", choices=("gradient", "relative"), help="the server's rank rule")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument(
        "--grad-batches", type=lambda v: None if v == "all" else int(v), default=4, help="anchor batches, or all"
    )
    p.add_argument("--methods", nargs="+", help="only these (fedavg fedlin fedlrt-full fedlrt-simplified fedlrt-none)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--runs-dir", default="runs/federated")
    p.add_argument("--out", type=Path, default=RESULTS, help="results, one JSON line per run")
    p.add_argument("--summarize", action="store_true", help="print the table and targets, write the PNG")
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if not args.summarize:
        run_sweep(__file__, specs(args), args.out, _key, _describe, args.jobs)
    table = summarize(args.out)
    if table:
        plot(table, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
