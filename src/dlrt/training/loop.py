"""The training loop behind ``dlrt train``: run directories, metrics, checkpoints, resume.

A run directory holds:

* ``config.yaml`` — the resolved :class:`~dlrt.training.config.TrainConfig`;
* ``metrics.csv`` — one row per epoch (loss, train/test accuracy, ranks per layer,
  total rank, compression, learning rate, seconds);
* ``checkpoint.safetensors`` — model, optimizer and loop position (:func:`dlrt.save`),
  written at every epoch end and on Ctrl-C;
* ``summary.json`` — final accuracy, compression, ranks, parameter counts, wall time
  and the run's status.

Every source of randomness is a function of ``(seed, epoch, batch)``, so a run
resumed from its checkpoint (``resume(run_dir)``) continues exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import io
from .. import model as model_tools
from ..optimizer import DLRTOptimizer, NonFiniteError
from .config import TrainConfig, load_config

__all__ = ["RunResult", "build_data", "build_model", "evaluate", "resume", "train"]

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
CONFIG = "config.yaml"


@dataclass
class RunResult:
    """What :func:`train` returns: where the run lives and how it ended."""

    run_dir: Path
    status: str  # "completed" | "interrupted" | "diverged"
    summary: dict[str, Any]


# ------------------------------------------------------------------ building
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu")
    return device


def build_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """The train and test datasets of ``cfg`` (``limit`` applied)."""
    from ..data import get_dataset

    kw: dict[str, Any] = {}
    if cfg.augment:
        kw["augment"] = True
    train_set = get_dataset(cfg.dataset, "train", root=cfg.data_root, **kw)
    test_set = get_dataset(cfg.dataset, "test", root=cfg.data_root)
    if cfg.limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(cfg.limit, len(test_set))))
    return train_set, test_set


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model of ``cfg``, converted to low rank unless ``cfg.dense``."""
    from ..data import dataset_info
    from ..models import default_exclude, get_model

    info = dataset_info(cfg.dataset)
    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = {"num_classes": info.num_classes}
    if cfg.model == "mlp":
        kwargs["in_features"] = info.input_size
    else:
        kwargs["in_channels"] = info.input_shape[0]
    model = get_model(cfg.model, **kwargs)
    if not cfg.dense:
        small = default_exclude(model, rank=cfg.rank, head="") if isinstance(cfg.rank, int) else ()
        exclude = tuple(dict.fromkeys([*cfg.exclude, *small]))
        model_tools.convert(model, rank=cfg.rank, max_rank=cfg.max_rank, min_rank=cfg.min_rank, exclude=exclude)
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    hyper: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        hyper["momentum"] = cfg.momentum
    if cfg.dense:
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        return cls(model.parameters(), **hyper)
    return DLRTOptimizer(
        model,
        integrator=cfg.integrator,
        optimizer=cfg.optimizer,
        tau=cfg.tau,
        coefficient_steps=cfg.coefficient_steps,
        **hyper,
    )


def lr_factor(
    step: int, total: int, schedule: str, warmup_steps: int = 0, step_size: int = 1, gamma: float = 1.0
) -> float:
    """Multiplier of the base learning rate at ``step`` (counted from 0).

    The first ``warmup_steps`` rise linearly towards 1; the remaining steps follow
    ``schedule``: ``linear`` (to 0), ``cosine`` (to 0), ``step`` (× ``gamma`` every
    ``step_size`` steps) or ``constant``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total - warmup_steps)
    t = min(step - warmup_steps, span)
    if schedule == "linear":
        return 1.0 - t / span
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / span))
    if schedule == "step":
        return gamma ** ((step - warmup_steps) // step_size)
    return 1.0


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """A per-step learning-rate schedule (``None`` for constant without warm-up).

    Without warm-up these are torch's own schedulers, as in checkpoints written
    before ``warmup`` existed, so those runs still resume.
    """
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup * total)
    if warm:
        factor = functools.partial(
            lr_factor,
            total=total,
            schedule=cfg.schedule,
            warmup_steps=warm,
            step_size=cfg.step_size * steps_per_epoch,
            gamma=cfg.gamma,
        )
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    return None


# ------------------------------------------------------------------ helpers
def _seed_for(cfg: TrainConfig, epoch: int, batch: int = -1) -> int:
    return (cfg.seed * 1_000_003 + epoch * 10_007 + batch + 1) % (2**63 - 1)


def _batches(cfg: TrainConfig, dataset: Any, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The epoch's batches, in an order fixed by ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(_seed_for(cfg, epoch))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    return iter(loader)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    *,
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``, in eval mode.

    Batches are ``(x, y)`` pairs unless ``forward(model, batch) -> (logits,
    labels)`` says how to run one (batches are moved to ``device`` first:
    tensors, tuples of tensors or dicts of tensors); ``collate`` builds them.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = to_device(batch, device)
        logits, y = forward(model, batch) if forward is not None else (model(batch[0]), batch[1])
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        seen += y.numel()
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, a tuple/list of tensors, or a dict of tensors) on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(device) for t in batch)
    return batch.to(device)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _new_run_dir(cfg: TrainConfig) -> Path:
    stem = f"{cfg.model}-{cfg.dataset}-" + ("dense" if cfg.dense else f"{cfg.integrator}-tau{cfg.tau:g}")
    return new_run_dir(cfg.runs_dir, cfg.name, stem, "or continue it with `dlrt train --resume {}`")


def new_run_dir(runs_dir: str, name: str | None, stem: str, hint: str = "") -> Path:
    """Create ``runs_dir/name``, or ``runs_dir/<time>-stem[-k]`` when ``name`` is None; never reuses one."""
    parent = Path(runs_dir)
    if name:
        run_dir = parent / name
        if run_dir.exists():
            extra = f" {hint.format(run_dir)}" if hint else ""
            raise FileExistsError(f"run directory {run_dir} exists; pick another name={extra}")
    else:
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
        run_dir, k = parent / stem, 1
        while run_dir.exists():
            k += 1
            run_dir = parent / f"{stem}-{k}"
    run_dir.mkdir(parents=True)
    return run_dir


def _ranks_text(model: nn.Module) -> str:
    return ";".join(f"{n}:{r}" for n, r in model_tools.ranks(model).items())


METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "total_rank",
    "ranks",
    "compression",
    "lr",
    "seconds",
]


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv`` with numbers parsed and ``ranks`` as a dict."""
    rows = []
    path = Path(run_dir) / METRICS
    if not path.exists():
        return rows
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out: dict[str, Any] = {}
            for key, value in row.items():
                if key == "ranks":
                    out[key] = {k: int(v) for k, v in (p.split(":") for p in value.split(";") if p)}
                elif key == "epoch" or key == "total_rank":
                    out[key] = int(value)
                else:
                    out[key] = float(value)
            rows.append(out)
    return rows


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(run_dir / METRICS, METRIC_FIELDS, rows)


def write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV through a temporary file; a ``ranks`` dict becomes ``name:rank;…``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                out = dict(row)
                if isinstance(out.get("ranks"), dict):
                    out["ranks"] = ";".join(f"{k}:{v}" for k, v in out["ranks"].items())
                writer.writerow(out)

    io.atomic_write(path, write)


class _Progress:
    """A tqdm bar when available, wanted and on a terminal, else nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _TensorBoard:
    def __init__(self, enabled: bool, run_dir: Path) -> None:
        self.writer = None
        if enabled:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "total_rank", "compression", "lr"):
            self.writer.add_scalar(key, row[key], row["epoch"])
        for name, r in row["ranks"].items():
            self.writer.add_scalar(f"rank/{name}", r, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig | None = None, *, resume_dir: str | os.PathLike[str] | None = None) -> RunResult:
    """Train as ``cfg`` says in a new run directory, or continue ``resume_dir``.

    Returns the run's :class:`RunResult`; Ctrl-C saves a checkpoint and returns
    with status ``"interrupted"``, a non-finite loss stops the run with status
    ``"diverged"`` and the message in ``summary.json``.
    """
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG})")
        cfg = load_config(run_dir / CONFIG)
    else:
        cfg = cfg or TrainConfig()
        run_dir = _new_run_dir(cfg)
        import yaml

        (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    train_set, test_set = build_data(cfg)
    model = build_model(cfg).to(device)
    opt = build_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    scheduler = build_scheduler(cfg, opt, steps_per_epoch)

    start_epoch, start_batch, carry = 0, 0, {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    rows: list[dict[str, Any]] = []
    elapsed_before = 0.0
    ckpt = run_dir / CHECKPOINT
    if resume_dir is not None and ckpt.is_file():
        extra = io.load(ckpt, model, opt)
        start_epoch, start_batch = extra["epoch"], extra["batch"]
        carry = extra["carry"]
        elapsed_before = extra["elapsed"]
        if scheduler is not None and extra.get("scheduler") is not None:
            scheduler.load_state_dict(extra["scheduler"])
        rows = [r for r in read_metrics(run_dir) if r["epoch"] <= start_epoch]

    def save(epoch: int, batch: int) -> None:
        extra = {
            "epoch": epoch,
            "batch": batch,
            "carry": carry,
            "elapsed": elapsed_before + time.perf_counter() - t_start,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        io.save(ckpt, model, opt, extra=extra)

    tb = _TensorBoard(cfg.tensorboard, run_dir)
    t_start = t_epoch = time.perf_counter()
    status, message = "completed", ""
    model.train()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            skip = start_batch if epoch == start_epoch else 0
            bar = _Progress(cfg.progress, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            bar.update(skip)
            for b, (x, y) in enumerate(_batches(cfg, train_set, epoch)):
                if b < skip:
                    continue
                torch.manual_seed(_seed_for(cfg, epoch, b))
                x, y = x.to(device), y.to(device)
                out_holder: dict[str, Tensor] = {}

                def closure(x: Tensor = x, y: Tensor = y, holder: dict[str, Tensor] = out_holder) -> Tensor:
                    opt.zero_grad()
                    out = model(x)
                    loss = nn.functional.cross_entropy(out, y)
                    loss.backward()
                    holder["out"], holder["loss"] = out.detach(), loss.detach()
                    return loss

                try:
                    opt.step(closure)
                except NonFiniteError as err:
                    status, message = "diverged", str(err)
                    raise
                if scheduler is not None:
                    scheduler.step()
                carry["loss"] += float(out_holder["loss"]) * y.numel()
                carry["correct"] += int((out_holder["out"].argmax(1) == y).sum())
                carry["seen"] += y.numel()
                bar.update(
                    1,
                    loss=f"{carry['loss'] / carry['seen']:.4f}",
                    acc=f"{carry['correct'] / carry['seen']:.3f}",
                    rank=sum(model_tools.ranks(model).values()),
                )
                start_batch = b + 1
            bar.close()
            test_loss, test_acc = evaluate(model, test_set, cfg.eval_batch_size, device)
            ranks = model_tools.ranks(model)
            row = {
                "epoch": epoch + 1,
                "train_loss": carry["loss"] / max(carry["seen"], 1),
                "train_acc": carry["correct"] / max(carry["seen"], 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "total_rank": sum(ranks.values()),
                "ranks": ranks,
                "compression": model_tools.compression(model),
                "lr": opt.param_groups[0]["lr"],
                "seconds": carry["seconds"] + time.perf_counter() - t_epoch,
            }
            rows.append(row)
            _write_metrics(run_dir, rows)
            tb.log(row)
            carry = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            start_batch = 0
            save(epoch + 1, 0)
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, train {100 * row['train_acc']:.2f}%, "
                f"test {100 * test_acc:.2f}%, rank {row['total_rank']} ({_ranks_text(model)}), "
                f"compression {100 * row['compression']:.1f}%, {row['seconds']:.1f}s",
                flush=True,
            )
    except KeyboardInterrupt:
        status = "interrupted"
        carry["seconds"] += time.perf_counter() - t_epoch
        save(epoch, start_batch)
        print(f"interrupted: checkpoint saved; continue with `dlrt train --resume {run_dir}`", flush=True)
    except NonFiniteError:
        print(f"stopped: {message}", flush=True)
    finally:
        tb.close()

    stored, dense = model_tools.parameter_counts(model)
    last = rows[-1] if rows else {}
    summary = {
        "status": status,
        "message": message,
        "epochs_completed": len(rows),
        "test_acc": last.get("test_acc"),
        "best_test_acc": max((r["test_acc"] for r in rows), default=None),
        "compression": model_tools.compression(model),
        "ranks": model_tools.ranks(model),
        "params_stored": stored,
        "params_dense": dense,
        "wall_seconds": elapsed_before + time.perf_counter() - t_start,
        "config": cfg.to_dict(),
    }
    _write_json(run_dir / SUMMARY, summary)
    if cfg.plots and rows:
        from .plots import plot_run

        with contextlib.suppress(ImportError):
            plot_run(run_dir, model)
    return RunResult(run_dir, status, summary)


def resume(run_dir: str | os.PathLike[str]) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint."""
    return train(resume_dir=run_dir)
