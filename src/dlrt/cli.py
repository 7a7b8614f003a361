"""The ``dlrt`` command line: ``dlrt train | finetune | eval | export | robustness | report | federated | closure``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .exporting import FORMATS, RULES

#: Exit statuses of the training commands: an interrupted run (Ctrl-C, SIGTERM, SIGUSR1) exits with 130.
EXIT = {"completed": 0, "interrupted": 130, "diverged": 1}


def _exit_status(status: str) -> int:
    """The exit status of a training command's run ``status`` (:data:`EXIT`).

    Under torchrun the processes of rank > 0 exit with 0 whenever the run ended with a
    status (interrupted or diverged too): torchrun's agent stops every process as soon
    as one exits with an error status, and rank 0 may still be writing the run's last
    files and its report. Rank 0's status (130, 1) is then torchrun's own.
    """
    from .distributed import speaks

    return EXIT[status] if speaks() else 0


def _run(args: argparse.Namespace, command: str, run: Any, cls: type) -> Any:
    """``run(cfg)`` with the config of ``--config`` and ``key=value``, or ``run(resume_dir=...)`` with ``--resume``
    (which takes the run's saved config, so it refuses the other two)."""
    from .training.config import load_config

    if args.resume:
        if args.config or args.overrides:
            raise SystemExit(
                f"dlrt {command}: --resume continues a run with its saved config; drop --config and key=value"
            )
        return run(resume_dir=args.resume)
    return run(load_config(args.config, args.overrides, cls=cls))


def _say(line: str) -> None:
    """Print ``line`` on this process unless it is one of torchrun's processes of rank > 0."""
    from .distributed import speaks

    if speaks():
        print(line, flush=True)


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    result = _run(args, "train", train, TrainConfig)
    _say(f"{result.status}: {result.run_dir}")
    return _exit_status(result.status)


def _finetune(args: argparse.Namespace) -> int:
    from .training.config import FinetuneConfig
    from .training.finetune import finetune

    result = _run(args, "finetune", finetune, FinetuneConfig)
    s = result.summary
    acc = "-" if s["test_acc"] is None else f"{100 * s['test_acc']:.2f}%"
    _say(
        f"{result.status}: {result.run_dir} (test accuracy {acc}, total rank {s['total_rank']}, "
        f"adapter parameters {s['adapter_params']:,d})"
    )
    return _exit_status(result.status)


def _eval(args: argparse.Namespace) -> int:
    from . import conversion, io
    from .training.config import load_config
    from .training.lm import is_language_run, perplexity
    from .training.loop import CHECKPOINT, CONFIG, build_data, build_forward, build_model, evaluate
    from .training.runs import resolve_device

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / CHECKPOINT).is_file():
        raise SystemExit(f"dlrt eval: {run_dir} is not a run directory with a checkpoint")
    cfg = load_config(run_dir / CONFIG)
    device = resolve_device(cfg.device)
    _, test_set = build_data(cfg)
    model = build_model(cfg).to(device)
    io.load(run_dir / CHECKPOINT, model)
    forward = build_forward(cfg)
    loss, acc = evaluate(model, test_set, cfg.eval_batch_size, device, forward=lambda m, b: forward(m, b)[:2])
    stored, dense = conversion.parameter_counts(model)
    out = {
        "test_loss": loss,
        **({"test_ppl": perplexity(loss)} if is_language_run(cfg) else {}),
        "test_acc": acc,
        "compression": conversion.compression(model),
        "ranks": conversion.ranks(model),
        "params_stored": stored,
        "params_dense": dense,
    }
    print(json.dumps(out, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .training.export_run import export_run

    path, info = export_run(
        args.run_dir, args.out, format=args.format, rule=args.rule, merged=not args.unmerged, batch=args.batch
    )
    print(f"{path} ({info['bytes'] / 1e6:.2f} MB, {args.format})")
    for name, layer in info["layers"].items():
        timed = layer.get("seconds")
        how = ""
        if timed:
            how = f" (dense {1e6 * timed['dense']:.0f} µs, factored {1e6 * timed['factored']:.0f} µs)"
        n, m = layer["shape"]
        print(f"  {name}: {layer['kind']} {n}×{m} rank {layer['rank']} → {layer['form']}{how}")
    return 0


def _federated(args: argparse.Namespace) -> int:
    from .federated import federate
    from .training.config import FederatedConfig, load_config

    result = federate(load_config(args.config, args.overrides, cls=FederatedConfig))
    s = result.summary
    acc = "-" if s["test_acc"] is None else f"{100 * s['test_acc']:.2f}%"
    mb = s["bytes_total"] / 1e6
    _say(f"{result.status}: {result.run_dir} (test accuracy {acc} after {s['rounds']} rounds, {mb:.1f} MB sent)")
    return _exit_status(result.status)


def _robustness(args: argparse.Namespace) -> int:
    from .training.robustness import evaluate_robustness, format_table, read_robustness

    # evaluate_robustness validates the request before it loads anything.
    entry = evaluate_robustness(args.run_dir, args.attack, args.eps, limit=args.limit, steps=args.steps)
    print(f"{args.run_dir}: {args.attack} on {entry['n']} test images (ε in pixel units)")
    print(format_table({args.attack: read_robustness(args.run_dir)[args.attack]}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .training.plots import plot_report, plot_run

    rows = []
    for run in args.run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise SystemExit(f"dlrt report: {run} has no summary.json (is it a finished run directory?)")
        s = json.loads(path.read_text())
        cfg = s["config"]
        rows.append((run, cfg, s))
        if len(args.run_dirs) == 1:
            if "method" in s:
                from .training.plots import plot_finetune

                plot_finetune(run)
            else:
                plot_run(run)
    kinds = {"finetune" if "method" in s else "train" for _, _, s in rows}
    if len(kinds) > 1:
        raise ValueError("dlrt report: pass either `dlrt train` runs or `dlrt finetune` runs, not both")
    if kinds == {"finetune"}:
        print(f"{'run':<40} {'method':<22} {'test acc':>9} {'adapter params':>15} {'total rank':>11}")
        for run, cfg, s in rows:
            method = f"{s['method']} lr={cfg['lr']:g}"
            acc = "-" if s["test_acc"] is None else f"{100 * s['test_acc']:.2f}%"
            print(f"{Path(run).name[:40]:<40} {method:<22} {acc:>9} {s['adapter_params']:>15,d} {s['total_rank']:>11}")
    else:
        from .training.robustness import read_robustness

        print(f"{'run':<40} {'method':<18} {'test acc':>9} {'compression':>12} {'ranks'}")
        for run, cfg, s in rows:
            method = "dense" if cfg.get("dense") else f"{cfg['integrator']} tau={cfg['tau']:g}"
            acc = "-" if s["test_acc"] is None else f"{100 * s['test_acc']:.2f}%"
            print(f"{Path(run).name[:40]:<40} {method:<18} {acc:>9} {100 * s['compression']:>11.1f}% {s['ranks']}")
            for attack, r in sorted(read_robustness(run).items()):  # written by `dlrt robustness`
                accs = ", ".join(f"ε {e:g}: {100 * a:.2f}%" for e, a in zip(r["eps"], r["adv_acc"]))
                print(f"{'':<40} adversarial accuracy ({attack}, {r['n']} images): {accs}")
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "report.png"
    print(f"plot: {plot_report(args.run_dirs, out)}")
    return 0


def _closure(args: argparse.Namespace) -> int:
    if args.closure_command == "train":
        from .kinetic.config import ClosureConfig
        from .kinetic.train import train_closure

        run = _run(args, "closure train", train_closure, ClosureConfig)
        s = run.summary
        errors = ", ".join(f"{k} {s[k]:.2e}" for k in ("h_err", "alpha_err", "u_err") if k in s)
        _say(f"{run.status}: {run.run_dir} (relative validation errors: {errors})")
        return _exit_status(run.status)
    from .kinetic.train import solve_run

    cases = ["source", "periodic"] if args.case == "all" else [args.case]
    results = solve_run(args.run_dir, cases, cells=args.cells, t_end=args.t_end, out_dir=args.out)
    for case, r in results.items():
        print(
            f"{case}: relative L2 difference network vs Newton {r['rel_l2']:.2e} after {r['steps']} steps; closure "
            f"seconds Newton {r['newton_closure_seconds']:.3f}, network {r['network_closure_seconds']:.3f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dlrt`` parser and its subcommands (the documentation's CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="dlrt", description="Dynamical low-rank training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (default: LeNet5 on MNIST, rank-adaptive BUG)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=_train)
    p = sub.add_parser(
        "finetune", help="fine-tune a pretrained model with adapters (default: GeoLoRA, MiniLM on Rotten Tomatoes)"
    )
    p.add_argument("--config", help="YAML config file (see configs/finetune_*.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=_finetune)
    p = sub.add_parser(
        "eval", help="evaluate a run's checkpoint on its test set (a language model's: validation loss and perplexity)"
    )
    p.add_argument("run_dir")
    p.set_defaults(func=_eval)
    p = sub.add_parser("robustness", help="clean and adversarial accuracy of a run's checkpoint (FGSM or PGD)")
    p.add_argument("run_dir")
    p.add_argument("--attack", choices=("fgsm", "pgd"), default="pgd", help="default pgd (L∞, random start)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.1], help="budgets in pixel units")
    p.add_argument("--limit", type=int, default=None, help="attack only the first N test images")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.set_defaults(func=_robustness)
    p = sub.add_parser("export", help="write a run's model as a file that runs without dlrt (docs/export.md)")
    p.add_argument("run_dir", help="a `dlrt train` or `dlrt finetune` run directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="pt2",
        help="aoti: compiled ahead of time for this machine (load with torch._inductor.aoti_load_package)",
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        default="flops",
        help="factored where it costs fewer multiply-adds (flops) or runs faster here (measured), or one form",
    )
    p.add_argument("--unmerged", action="store_true", help="GeoLoRA: keep the frozen layer and the update apart")
    p.add_argument(
        "--out",
        help="output file (default: model.<format> in the run directory, model.aoti.pt2 for aoti; never overwritten)",
    )
    p.add_argument("--batch", type=int, default=2, help="test examples the export traces (and measures) on")
    p.set_defaults(func=_export)
    p = sub.add_parser(
        "federated", help="federated training: FeDLRT, FedAvg or FedLin, in process or on Flower (docs/federated.md)"
    )
    p.add_argument("--config", help="YAML config file (keys: dlrt.training.config.FederatedConfig)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=_federated)
    p = sub.add_parser("report", help="summarize runs and plot accuracy against compression")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="plot file (default: report.png beside the runs)")
    p.set_defaults(func=_report)
    p = sub.add_parser("closure", help="neural entropy closures for kinetic moment systems (docs/kinetic.md)")
    closure = p.add_subparsers(dest="closure_command", required=True)
    q = closure.add_parser("train", help="train a neural closure (default: ICNN, 1D M2)")
    q.add_argument("--config", help="YAML config file (keys: dlrt.kinetic.ClosureConfig)")
    q.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    q = closure.add_parser("solve", help="run the 1D test cases with the Newton and the run's network closure")
    q.add_argument("run_dir", help="a `dlrt closure train` run directory")
    q.add_argument("--case", choices=("source", "periodic", "all"), default="all")
    q.add_argument("--cells", type=int, default=100)
    q.add_argument("--t-end", type=float, default=None, help="final time (default: the case's)")
    q.add_argument("--out", default=None, help="directory of solve.json and the plots (default: the run directory)")
    p.set_defaults(func=_closure)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dlrt`` with ``argv`` (default: the process's arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"dlrt {args.command}: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional dependency of the chosen model, method or plot
        hint = "install the optional dependencies with pip install 'dlrt[cli,data,finetune]'"
        what = f"this run needs the package {err.name!r}, which is not installed" if err.name else str(err)
        print(f"dlrt {args.command}: {what}; {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
