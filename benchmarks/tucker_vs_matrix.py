"""Tucker DLRT against matrix DLRT and a fixed-rank Tucker factorization, on the convolutions of a CNN.

Every run goes through ``dlrt train`` (its pipeline and run directories): LeNet5 (5×5
kernels) or a small VGG-style network (``vgg_small``, four 3×3 convolutions with BN) on
MNIST and Fashion-MNIST, the convolutions factorized and the linear layers left dense
in every method, so the methods differ only in how the convolutions are held:

* ``dense``: the reference, Adam;
* ``matrix``: ``conv=matrix`` (kernel as ``out × in·kh·kw``), rank-adaptive BUG from full rank, per τ;
* ``tucker``: ``conv=tucker`` (one rank per kernel mode), rank-adaptive BUG from full rank, per τ;
* ``fixed``: tensorly-torch's ``FactorizedConv`` (Tucker, factorized forward) at a fixed
  share of the dense parameters, trained through autograd by Adam (``dense=true`` in the
  config: a plain torch optimizer over every parameter).

Same recipe for all (Adam, lr 3e-3, cosine, batch 128). Reported per method and setting
(mean over seeds): final test accuracy and the parameters the convolutions store, against
the dense convolutions' (conv-layer compression: 25,570 in LeNet5, 60,048 in vgg_small).
``--timing`` measures the step time of the dense, matrix and Tucker LeNet5 interleaved in
one process (medians).

Rerun (2 processes of one thread each)::

    python benchmarks/tucker_vs_matrix.py                 # LeNet5, 1 epoch, the README's grid, ~35 min
    python benchmarks/tucker_vs_matrix.py --model vgg_small --limit 30000 --matrix-taus 0.1 0.2 0.3 \
        --tucker-taus 0.1 0.2 0.3 --fixed-fractions 0.1 0.2 0.4
    python benchmarks/tucker_vs_matrix.py --datasets fashion-mnist --epochs 3 --matrix-taus 0.45 \
        --tucker-taus 0.25 0.3 --fixed-fractions
    python benchmarks/tucker_vs_matrix.py --timing --threads 2
    python benchmarks/tucker_vs_matrix.py --summarize      # table, targets and PNG from the results
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

from benchlib import add_sweep_arguments, run_sweep

RESULTS = Path("benchmarks/results/tucker_vs_matrix.jsonl")


def conv_split(model_name: str) -> tuple[list[str], list[str], int, int]:
    """The dense model's convolutions, its linear layers (left dense), and the parameters in and outside the convs."""
    from dlrt.models import get_model

    model = get_model(model_name, num_classes=10, in_channels=1)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    inside = sum(p.numel() for n in convs for p in model.get_submodule(n).parameters())
    return convs, linears, inside, sum(p.numel() for p in model.parameters()) - inside


# ------------------------------------------------------------------ one run (a worker process)
def _register_fixed(model_name: str, fraction: float) -> str:
    """Register the model with tensorly-torch Tucker convolutions at ``fraction`` of their dense parameters."""
    import tltorch

    from dlrt.models import get_model, list_models, register_model

    name = f"{model_name}_tltorch_{fraction:g}"

    def build(**kw: Any) -> torch.nn.Module:
        model = get_model(model_name, **kw)
        for conv in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]:
            fact = tltorch.FactorizedConv.from_conv(
                model.get_submodule(conv),
                rank=fraction,
                factorization="tucker",
                implementation="factorized",
                decompose_weights=True,
            )
            setattr(model, conv, fact)  # the models' convolutions are top-level attributes
        return model

    if name not in list_models():
        register_model(name, build)
    return name


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    from dlrt.training import TrainConfig, read_metrics, train

    method, setting = spec["method"], spec["setting"]
    base = spec.get("model", "lenet5")
    convs, linears, dense_conv, non_conv = conv_split(base)
    model = _register_fixed(base, setting) if method == "fixed" else base
    cfg = TrainConfig(
        dataset=spec["dataset"],
        model=model,
        dense=method in ("dense", "fixed"),
        conv="tucker" if method == "tucker" else "matrix",
        rank=1.0,  # from full rank: the ranks are found during training
        tau=float(setting) if method in ("matrix", "tucker") else 0.1,
        exclude=linears,
        optimizer="adam",
        lr=spec["lr"],
        schedule="cosine",
        batch_size=128,
        epochs=spec["epochs"],
        seed=spec["seed"],
        limit=spec.get("limit"),
        threads=1,
        runs_dir=spec["runs_dir"],
        name=spec["name"],
        progress=False,
        tensorboard=False,
        plots=False,
    )
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    summary = result.summary
    conv_stored = summary["params_stored"] - non_conv
    return {
        "model": base,
        **{k: spec[k] for k in ("dataset", "method", "setting", "seed", "epochs", "lr")},
        "run_dir": str(result.run_dir),
        "status": result.status,
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "conv_params": conv_stored,
        "conv_compression": 1 - conv_stored / dense_conv,
        "ranks": {k: v for k, v in summary["ranks"].items() if k in convs},
        "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
    }


# ------------------------------------------------------------------ the sweep
def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = [("dense", 0.0)]
    settings += [("matrix", t) for t in args.matrix_taus]
    settings += [("tucker", t) for t in args.tucker_taus]
    settings += [("fixed", f) for f in args.fixed_fractions]
    out = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for method, setting in settings:
                model = "" if args.model == "lenet5" else f"{args.model}-"
                name = f"{model}{dataset}-{method}-{setting:g}-s{seed}-e{args.epochs}"
                out.append(
                    {
                        "model": args.model,
                        "dataset": dataset,
                        "method": method,
                        "setting": setting,
                        "seed": seed,
                        "epochs": args.epochs,
                        "lr": args.lr,
                        "limit": args.limit,
                        "runs_dir": args.runs_dir,
                        "name": name,
                    }
                )
    return out


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("model", "lenet5"), r["dataset"], r["method"], float(r["setting"]), r["seed"], r["epochs"], r["lr"])


def _describe(r: dict[str, Any]) -> str:
    name = f"{r['model']}-{r['dataset']}-{r['method']}-{r['setting']:g}-s{r['seed']}-e{r['epochs']}"
    return (
        f"{name}: acc {100 * r['test_acc']:.2f}%, conv params {r['conv_params']} "
        f"({100 * r['conv_compression']:.1f}%), ranks {r['ranks']}"
    )


def sweep(args: argparse.Namespace) -> None:
    run_sweep(__file__, specs(args), args.out, _key, _describe, args.jobs)


# ------------------------------------------------------------------ step time
def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Median step time of dense, matrix-DLRT and Tucker-DLRT LeNet5, interleaved (batch 128, one process)."""
    import dlrt
    from dlrt.data import get_dataset
    from dlrt.models import LeNet5

    torch.set_num_threads(args.threads)
    data = get_dataset("mnist", "train")
    x = torch.stack([data[i][0] for i in range(128)])
    y = torch.tensor([int(data[i][1]) for i in range(128)])
    models = {}
    for kind in ("dense", "matrix", "tucker"):
        torch.manual_seed(0)
        model = LeNet5()
        if kind == "dense":
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        else:
            dlrt.convert(model, rank=1.0, conv=kind, target_modules=["conv1", "conv2"])
            opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="adam", lr=args.lr, tau=args.timing_tau)
        models[kind] = (model, opt)

    def step(kind: str) -> None:
        model, opt = models[kind]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    for kind in models:  # warm-up, and the ranks settle from full rank at the benchmark's τ
        for _ in range(args.timing_warmup):
            step(kind)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.timing_rounds):
        for kind in models:
            t0 = time.perf_counter()
            for _ in range(5):
                step(kind)
            times[kind].append((time.perf_counter() - t0) / 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "threads": args.threads,
        "tau": args.timing_tau,
        "seconds_per_step": med,
        "tucker_over_matrix": med["tucker"] / med["matrix"],
        "matrix_over_dense": med["matrix"] / med["dense"],
        "tucker_over_dense": med["tucker"] / med["dense"],
        "ranks": {k: dlrt.ranks(models[k][0]) for k in ("matrix", "tucker")},
    }
    out = args.out.with_name(f"{args.out.stem}_timing_threads{args.threads}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record, indent=2, default=str))
    return record


# ------------------------------------------------------------------ summary
def summarize(path: Path) -> dict[str, Any]:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        if r["status"] == "completed":
            key = (r.get("model", "lenet5"), r["dataset"], r["epochs"], r["method"], float(r["setting"]))
            groups.setdefault(key, []).append(r)
    table = []
    for (model, dataset, epochs, method, setting), rs in sorted(groups.items()):
        table.append(
            {
                "model": model,
                "dataset": dataset,
                "epochs": epochs,
                "method": method,
                "setting": setting,
                "seeds": sorted(r["seed"] for r in rs),
                "acc": 100 * statistics.mean(r["test_acc"] for r in rs),
                "acc_sd": 100 * statistics.stdev(r["test_acc"] for r in rs) if len(rs) > 1 else 0.0,
                "conv_params": statistics.mean(r["conv_params"] for r in rs),
                "conv_compression": 100 * statistics.mean(r["conv_compression"] for r in rs),
                "ranks_seed0": min(rs, key=lambda r: r["seed"])["ranks"],
            }
        )
    label = {
        "dense": "dense",
        "matrix": "matrix DLRT τ",
        "tucker": "Tucker DLRT τ",
        "fixed": "fixed Tucker (tltorch) f",
    }
    print(
        f"{'model':<10}{'dataset':<14}{'ep':>3} {'method':<26}{'acc %':>14}{'conv params':>13}{'conv compr.':>12}  "
        "seeds, ranks (lowest seed)"
    )
    for row in table:
        name = label[row["method"]] + ("" if row["method"] == "dense" else f" {row['setting']:g}")
        print(
            f"{row['model']:<10}{row['dataset']:<14}{row['epochs']:>3} {name:<26}"
            f"{row['acc']:>8.2f} ±{row['acc_sd']:.2f}{row['conv_params']:>13.0f}"
            f"{row['conv_compression']:>11.1f}%  {len(row['seeds'])}, {row['ranks_seed0']}"
        )
    checks = targets(table)
    for c in checks:
        print(f"{ {True: 'PASS', False: 'FAIL', None: 'N/A'}[c['ok']] }: {c['name']}: {c['detail']}")
    plot(table, path.with_suffix(".png"))
    return {"table": table, "checks": checks}


def targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's accuracy/compression targets, per dataset, from the seed means."""
    checks = []
    for model, dataset, epochs in sorted({(r["model"], r["dataset"], r["epochs"]) for r in table}):
        rows = [r for r in table if (r["model"], r["dataset"], r["epochs"]) == (model, dataset, epochs)]
        where = f"{model}, {dataset}, {epochs} epoch(s)"
        tucker = [r for r in rows if r["method"] == "tucker"]
        for other in ("matrix", "fixed"):
            rivals = [r for r in rows if r["method"] == other]
            best, detail = (
                0.0,
                f"no {other} point reaches any Tucker point's accuracy − 0.3" if tucker else "no Tucker point",
            )
            for t in tucker:
                # Every rival at least as accurate (within 0.3 points) stores this many times more.
                close = [r for r in rivals if r["acc"] >= t["acc"] - 0.3]
                if not close:
                    continue
                ratio = min(r["conv_params"] for r in close) / t["conv_params"]
                if ratio > best:
                    best = ratio
                    detail = (
                        f"Tucker τ {t['setting']:g} ({t['acc']:.2f} %, {t['conv_params']:.0f} params): every {other} "
                        f"point within 0.3 points stores ≥ {ratio:.2f}× as many"
                    )
            # None: no rival point reaches any Tucker point's accuracy, so there is no equal-accuracy pair.
            ok = best >= 1.5 if best else None
            checks.append({"name": f"{where}: Tucker ≥ 1.5× {other} conv compression", "ok": ok, "detail": detail})
        dense = [r for r in rows if r["method"] == "dense"]
        if dataset == "fashion-mnist" and dense:
            ref = dense[0]["acc"]
            good = [t for t in tucker if t["conv_compression"] >= 90 and t["acc"] >= ref - 0.5]
            detail = f"dense {ref:.2f} %; Tucker: " + ", ".join(
                f"τ {t['setting']:g}: {t['acc']:.2f} % at {t['conv_compression']:.1f} %" for t in tucker
            )
            checks.append(
                {
                    "name": f"{where}: Tucker ≥ dense − 0.5 at ≥ 90 % conv compression",
                    "ok": bool(good),
                    "detail": detail,
                }
            )
    return checks


def plot(table: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["dataset"], r["epochs"]) for r in table})
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    styles = {"matrix": "o-", "tucker": "s-", "fixed": "^--"}
    names = {"matrix": "matrix DLRT (τ)", "tucker": "Tucker DLRT (τ)", "fixed": "fixed-rank Tucker, Adam (tltorch)"}
    for ax, (model, dataset, epochs) in zip(axes.flat, panels):
        rows = [r for r in table if (r["model"], r["dataset"], r["epochs"]) == (model, dataset, epochs)]
        for method, style in styles.items():
            pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["conv_compression"])
            if pts:
                ax.errorbar(
                    [p["conv_compression"] for p in pts],
                    [p["acc"] for p in pts],
                    yerr=[p["acc_sd"] for p in pts],
                    fmt=style,
                    label=names[method],
                    capsize=3,
                )
        for r in rows:
            if r["method"] == "dense":
                ax.axhline(r["acc"], color="k", lw=0.8, ls=":", label="dense")
        ax.set(
            xlabel="conv-layer compression (%)", ylabel="test accuracy (%)", title=f"{model}, {dataset}, {epochs} ep."
        )
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, runs_dir="runs/tucker_vs_matrix", out=RESULTS, epochs=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int, default=None, help="use only N samples (smoke runs)")
    p.add_argument("--matrix-taus", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.45])
    p.add_argument("--tucker-taus", type=float, nargs="*", default=[0.15, 0.2, 0.25, 0.3])
    p.add_argument("--fixed-fractions", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--timing", action="store_true", help="interleaved step times of dense, matrix and Tucker LeNet5")
    p.add_argument("--timing-tau", type=float, default=0.2)
    p.add_argument("--timing-warmup", type=int, default=30)
    p.add_argument("--timing-rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if args.timing:
        timing(args)
        return 0
    if not args.summarize:
        sweep(args)
    summarize(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
