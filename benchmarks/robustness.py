"""Adversarial robustness of dense, DLRT and robust DLRT (the condition-number regularizer).

Every run goes through ``dlrt train`` and is then attacked by ``dlrt robustness``
(:func:`dlrt.training.robustness.evaluate_robustness`): FGSM and PGD-10 (L∞, random
start, step 2.5 ε / 10) at ε ∈ {0.01, 0.03, 0.05, 0.1} in pixel units, on the first
``--attack-limit`` test images. Methods, same recipe (Adam 3e-3, cosine, batch 128):

* ``dense``;
* ``dlrt``: rank-adaptive BUG from rank 20 at ``--tau`` (≥ 90 % compression for LeNet5), β = 0;
* ``robust``: the same with ``robust_beta`` = β (``β · Σ ℛ(S)`` added to the loss), per β.

Reported per method (mean over seeds): clean accuracy, FGSM and PGD accuracy per ε,
compression and the mean condition number of the cores.

Rerun (2 processes of one thread each)::

    python benchmarks/robustness.py                    # LeNet5, MNIST and Fashion-MNIST, 1 epoch
    python benchmarks/robustness.py --datasets fashion-mnist --epochs 3 --betas 0.075
    python benchmarks/robustness.py --model vgg_small --datasets fashion-mnist --tau 0.3
    python benchmarks/robustness.py --summarize      # table, targets and PNG from the results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchlib import add_sweep_arguments, run_sweep

RESULTS = Path("benchmarks/results/robustness.jsonl")
EPS = [0.01, 0.03, 0.05, 0.1]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    from dlrt.training import TrainConfig, train
    from dlrt.training.robustness import evaluate_robustness

    method = spec["method"]
    cfg = TrainConfig(
        dataset=spec["dataset"],
        model=spec["model"],
        dense=method == "dense",
        rank=20,
        tau=spec["tau"],
        robust_beta=spec["beta"] if method == "robust" else 0.0,
        optimizer="adam",
        lr=3e-3,
        schedule="cosine",
        batch_size=128,
        epochs=spec["epochs"],
        seed=spec["seed"],
        threads=1,
        runs_dir=spec["runs_dir"],
        name=spec["name"],
        progress=False,
        tensorboard=False,
        plots=False,
    )
    result = train(cfg)
    attacks = {
        attack: evaluate_robustness(result.run_dir, attack, EPS, limit=spec["attack_limit"], seed=spec["seed"])
        for attack in ("fgsm", "pgd")
    }
    return {
        **{k: spec[k] for k in ("model", "dataset", "method", "beta", "tau", "seed", "epochs")},
        "run_dir": str(result.run_dir),
        "status": result.status,
        "test_acc": result.summary["test_acc"],
        "compression": result.summary["compression"],
        "clean_acc": attacks["fgsm"]["clean_acc"],
        "fgsm": attacks["fgsm"]["adv_acc"],
        "pgd": attacks["pgd"]["adv_acc"],
        "cond_mean": attacks["fgsm"]["cond_mean"],
        "n": attacks["fgsm"]["n"],
    }


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = [("dense", 0.0), ("dlrt", 0.0)] + [("robust", b) for b in args.betas]
    out = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for method, beta in settings:
                tag = "" if method != "robust" else f"-b{beta:g}"
                out.append(
                    {
                        "model": args.model,
                        "dataset": dataset,
                        "method": method,
                        "beta": beta,
                        "tau": args.tau,
                        "seed": seed,
                        "epochs": args.epochs,
                        "attack_limit": args.attack_limit,
                        "runs_dir": args.runs_dir,
                        "name": f"{args.model}-{dataset}-{method}{tag}-tau{args.tau:g}-s{seed}-e{args.epochs}",
                    }
                )
    return out


def _key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["dataset"], r["method"], float(r["beta"]), float(r["tau"]), r["seed"], r["epochs"])


def _describe(r: dict[str, Any]) -> str:
    pgd = " ".join(f"{100 * a:.1f}" for a in r["pgd"])
    return (
        f"{r['model']} {r['dataset']} {r['method']} β {r['beta']:g} s{r['seed']}: clean {100 * r['clean_acc']:.2f}%, "
        f"compression {100 * r['compression']:.1f}%, cond {r['cond_mean'] or float('nan'):.3g}, PGD {pgd}"
    )


def summarize(path: Path) -> dict[str, Any]:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        if r["status"] == "completed":
            key = (r["model"], r["dataset"], r["epochs"], float(r["tau"]), r["method"], float(r["beta"]))
            groups.setdefault(key, []).append(r)
    table = []
    for (model, dataset, epochs, tau, method, beta), rs in sorted(groups.items()):

        def mean(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.mean(f(r) for r in rs)

        table.append(
            {
                "model": model,
                "dataset": dataset,
                "epochs": epochs,
                "tau": tau,
                "method": method,
                "beta": beta,
                "seeds": len(rs),
                "clean": 100 * mean(lambda r: r["clean_acc"]),
                "fgsm": [100 * mean(lambda r, i=i: r["fgsm"][i]) for i in range(len(EPS))],
                "pgd": [100 * mean(lambda r, i=i: r["pgd"][i]) for i in range(len(EPS))],
                "compression": 100 * mean(lambda r: r["compression"]),
                "cond": mean(lambda r: r["cond_mean"]) if method != "dense" else float("nan"),
            }
        )
    eps = " ".join(f"{e:>5g}" for e in EPS)
    print(
        f"{'model':<10}{'dataset':<14}{'ep':>3} {'τ':>5} {'method':<14}{'clean':>7}  FGSM @ {eps}   PGD @ {eps}  "
        f"{'compr.':>7} {'cond':>7}"
    )
    for t in table:
        name = t["method"] + (f" β {t['beta']:g}" if t["method"] == "robust" else "")
        fg = " ".join(f"{a:>5.1f}" for a in t["fgsm"])
        pg = " ".join(f"{a:>5.1f}" for a in t["pgd"])
        print(
            f"{t['model']:<10}{t['dataset']:<14}{t['epochs']:>3} {t['tau']:>5g} {name:<14}{t['clean']:>7.2f}  "
            f"{fg:>{7 + len(eps)}}   {pg:>{6 + len(eps)}}  {t['compression']:>6.1f}% {t['cond']:>7.3g}"
        )
    checks = targets(table)
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}: {c['detail']}")
    plot(table, path.with_suffix(".png"))
    return {"table": table, "checks": checks}


def targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Robust DLRT at ≥ 90 % compression: clean within 1 point of dense, adversarial ≥ DLRT at every ε and ≥ dense
    at ε ≤ 0.05, for both attacks (three-seed means); the best β per network and dataset."""
    checks = []
    for model, dataset, epochs, tau in sorted({(t["model"], t["dataset"], t["epochs"], t["tau"]) for t in table}):
        rows = [t for t in table if (t["model"], t["dataset"], t["epochs"], t["tau"]) == (model, dataset, epochs, tau)]
        dense = next((t for t in rows if t["method"] == "dense"), None)
        plain = next((t for t in rows if t["method"] == "dlrt"), None)
        if dense is None or plain is None:
            continue
        results = []
        for t in (t for t in rows if t["method"] == "robust"):
            ok = t["compression"] >= 90 and t["clean"] >= dense["clean"] - 1
            for attack in ("fgsm", "pgd"):
                ok &= all(a >= p for a, p in zip(t[attack], plain[attack]))
                ok &= all(a >= d for a, d, e in zip(t[attack], dense[attack], EPS) if e <= 0.05)
            results.append((ok, t))
        detail = "; ".join(
            f"β {t['beta']:g}: clean {t['clean']:.2f} (dense {dense['clean']:.2f}), compr. {t['compression']:.1f}%, "
            f"PGD {'/'.join(f'{a:.1f}' for a in t['pgd'])} vs DLRT {'/'.join(f'{a:.1f}' for a in plain['pgd'])} "
            f"vs dense {'/'.join(f'{a:.1f}' for a in dense['pgd'])}"
            for _, t in results
        )
        checks.append(
            {
                "name": f"{model}, {dataset}, {epochs} ep., τ {tau:g}: robust DLRT target",
                "ok": any(ok for ok, _ in results),
                "detail": detail,
            }
        )
    return checks


def plot(table: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(t["model"], t["dataset"], t["epochs"], t["tau"]) for t in table})
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    for row, (model, dataset, epochs, tau) in zip(axes, panels):
        for ax, attack in zip(row, ("fgsm", "pgd")):
            for t in table:
                if (t["model"], t["dataset"], t["epochs"], t["tau"]) != (model, dataset, epochs, tau):
                    continue
                label = t["method"] + (f" β={t['beta']:g}" if t["method"] == "robust" else "")
                ax.plot([0, *EPS], [t["clean"], *t[attack]], marker="o", label=label)
            title = f"{model}, {dataset}, {epochs} ep., τ {tau:g}: {attack.upper()}"
            ax.set(xlabel="ε (pixel units)", ylabel="accuracy (%)", title=title)
            ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, runs_dir="runs/robustness", out=RESULTS, epochs=1)
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--betas", type=float, nargs="+", default=[0.075, 0.3])
    p.add_argument("--attack-limit", type=int, default=500, help="test images attacked per run")
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if not args.summarize:
        run_sweep(__file__, specs(args), args.out, _key, _describe, args.jobs)
    summarize(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
