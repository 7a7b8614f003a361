"""Reproduce the "Low-rank lottery tickets" LeNet5/MNIST table (and the 5×500 MLP sweep).

Runs a rank-adaptive integrator (BUG by default) for each τ and the dense baseline,
by default with the authors' settings (SGD, lr 0.05, constant, batch 256; the dense
baseline always gets the same optimizer), over one or more seeds, through the same
pipeline as ``dlrt train`` (each run leaves a run directory), and prints the measured
table beside the published one. Reported per τ: final-epoch test accuracy (mean over
seeds; the best epoch is shown separately and labelled), compression counted two ways,
the ranks, and wall seconds per epoch against the dense run's.

* honest compression: every stored parameter (U, S, V, biases, dense layers) against
  the dense model's, what ``dlrt.compression`` reports;
* paper convention: low-rank layers counted as (out + 1)·r, as in the published table
  (see shared/design/REFERENCES.md).

Rerun::

    python benchmarks/lottery_table.py --epochs 10 --seeds 0 1 2
    python benchmarks/lottery_table.py --model mlp --taus 0.05 0.1 0.17 --rank 150
    python benchmarks/lottery_table.py --optimizer adam --lr 3e-3 --schedule cosine \
        --batch-size 128 --rank 20 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import dlrt
from dlrt.training import TrainConfig, read_metrics, train

PUBLISHED = {  # LeNet5 / MNIST, SGD lr 0.05 (authors' table): accuracy %, eval compression %
    "dense": (98.82, 0.0),
    0.11: (98.21, 93.0),
    0.2: (98.12, 97.0),
    0.45: (94.07, 98.5),
}


def paper_compression(run_dir: Path) -> float | None:
    """1 − (Σ_low-rank (out + 1)·r + dense layers' parameters) / dense parameters."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = TrainConfig(**summary["config"])
    from dlrt.training.loop import build_model

    model = build_model(cfg)
    if cfg.dense:
        return 0.0
    dlrt.load(run_dir / "checkpoint.safetensors", model)
    stored = 0
    lowrank_params = set()
    for _, layer in dlrt.lowrank_layers(model):
        stored += (layer.out_dim + 1) * layer.rank
        lowrank_params |= {id(p) for p in layer.parameters()}
    stored += sum(p.numel() for p in model.parameters() if id(p) not in lowrank_params)
    return 1.0 - stored / summary["params_dense"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet5", choices=("lenet5", "mlp"))
    p.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.11, 0.2, 0.3, 0.45])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rank", default="1.0", help="start rank: an int, or a fraction of each layer's full rank")
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine", "step"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--exclude", nargs="*", default=["head"], help="layers left dense (default: the classifier)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--integrator", default="bug")
    p.add_argument("--runs-dir", default="runs/lottery")
    p.add_argument("--out", default="benchmarks/results/lottery_table.json")
    p.add_argument("--limit", type=int, default=None, help="use only N samples (smoke runs)")
    args = p.parse_args(argv)
    rank = float(args.rank) if "." in args.rank else int(args.rank)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, list[dict]] = {}
    settings = ["dense", *args.taus]
    for setting in settings:
        for seed in args.seeds:
            name = f"{stamp}-{args.model}-{'dense' if setting == 'dense' else f'tau{setting:g}'}-s{seed}"
            cfg = TrainConfig(
                dataset="mnist",
                model=args.model,
                dense=setting == "dense",
                tau=0.0 if setting == "dense" else float(setting),
                rank=rank,
                max_rank=args.max_rank,
                integrator=args.integrator,
                exclude=list(args.exclude),
                optimizer=args.optimizer,
                schedule=args.schedule,
                batch_size=args.batch_size,
                threads=args.threads,
                lr=args.lr,
                momentum=args.momentum,
                epochs=args.epochs,
                seed=seed,
                limit=args.limit,
                runs_dir=args.runs_dir,
                name=name,
                progress=False,
                tensorboard=False,
            )
            print(f"== {name}", flush=True)
            result = train(cfg)
            rows = read_metrics(result.run_dir)
            results.setdefault(str(setting), []).append(
                {
                    "seed": seed,
                    "run_dir": str(result.run_dir),
                    "status": result.status,
                    "final_acc": rows[-1]["test_acc"] if rows else None,
                    "best_acc": max((r["test_acc"] for r in rows), default=None),
                    "compression": result.summary["compression"],
                    "paper_compression": paper_compression(result.run_dir),
                    "ranks": result.summary["ranks"],
                    "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
                }
            )

    dense_sec = statistics.median(r["seconds_per_epoch"] for r in results["dense"])
    print(
        f"\n{args.model} on MNIST, {args.integrator}, {args.optimizer} lr {args.lr} ({args.schedule}), "
        f"batch {args.batch_size}, start rank {args.rank}, {args.epochs} epochs, seeds {args.seeds}"
    )
    header = (
        f"{'tau':>6} {'final acc':>10} {'best acc':>9} {'compr.':>7} {'compr.(paper)':>14} "
        f"{'s/epoch vs dense':>17}  {'published acc / compr.':>22}  ranks (seed {args.seeds[0]})"
    )
    print(header)

    def mean(runs: list[dict], key: str) -> float:
        return statistics.mean(r[key] for r in runs if r[key] is not None)

    for setting in settings:
        runs = results[str(setting)]
        pub = PUBLISHED.get(setting) if args.model == "lenet5" else None
        pub_text = f"{pub[0]:.2f}% / {pub[1]:.1f}%" if pub else "-"
        print(
            f"{setting!s:>6} {100 * mean(runs, 'final_acc'):>9.2f}% {100 * mean(runs, 'best_acc'):>8.2f}% "
            f"{100 * mean(runs, 'compression'):>6.1f}% {100 * mean(runs, 'paper_compression'):>13.1f}% "
            f"{mean(runs, 'seconds_per_epoch') / dense_sec:>16.2f}x  {pub_text:>22}  {runs[0]['ranks']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
