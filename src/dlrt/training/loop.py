"""``dlrt train``: build the data, model and optimizer of a :class:`TrainConfig` and hand them to the driver.

A run directory holds:

* ``config.yaml`` — the resolved :class:`~dlrt.training.config.TrainConfig`;
* ``metrics.csv`` — one row per epoch (loss, train/test accuracy, ranks per layer,
  total rank, compression, the condition number of every core and their mean,
  learning rate, seconds; with ``robust_beta`` the train loss includes ``β·Σℛ(S)``);
* ``steps.csv`` — a row every ``log_every`` steps (loss, learning rate, the rank
  of every layer);
* ``checkpoint.safetensors`` — model, optimizer, loop position and the rows above
  (:func:`dlrt.save`), written at every epoch end and on Ctrl-C;
* ``summary.json`` — final accuracy, compression, ranks, parameter counts, wall time
  and the run's status.

A language model (``model=gpt-…`` on a text corpus, :mod:`dlrt.training.lm`) trains
through the same recipe: its test set is the held-out validation text, ``metrics.csv``
and ``steps.csv`` gain perplexity columns (``train_ppl``, ``test_ppl``; ``ppl``), and the
run ends by writing ``samples.txt``, a few texts the model generated.

The loop itself is :class:`~dlrt.training.driver.Driver`: every source of
randomness is a function of ``(seed, epoch, batch)`` and the checkpoint is the
one record of progress, so a run resumed from it (``resume(run_dir)``)
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import conversion, distributed
from ..optim import RULES
from ..optimizer import DLRTOptimizer
from ..robust import condition_numbers, condition_regularizer
from .config import TrainConfig, load_config
from .driver import (
    CHECKPOINT,
    CONFIG,
    EVAL_STEP_FIELDS,
    SUMMARY,
    Task,
    classify,
    evaluate,
    interrupted_line,
    new_run_dir,
    to_device,
)
from .lm import is_language_run
from .records import METRICS, STEPS, read_metrics, read_steps, write_csv
from .runs import setup, start_run
from .schedule import lr_factor

__all__ = ["RunResult", "build_data", "build_forward", "build_model", "evaluate", "read_metrics", "read_steps"]
__all__ += ["resume", "train"]
__all__ += ["CHECKPOINT", "CONFIG", "METRICS", "STEPS", "SUMMARY", "new_run_dir", "to_device", "write_csv"]


@dataclass
class RunResult:
    """What :func:`train` returns: where the run lives and how it ended."""

    run_dir: Path
    status: str  # "completed" | "interrupted" | "diverged"
    summary: dict[str, Any]


# ------------------------------------------------------------------ building
def build_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """The train and test datasets of ``cfg`` (``limit`` applied); a language model's are token windows of
    its corpus, the test set the held-out validation documents (:func:`dlrt.training.lm.build_lm_data`)."""
    from ..data import get_dataset

    if is_language_run(cfg):
        from .lm import build_lm_data

        train_set, test_set = build_lm_data(cfg)
    else:
        kw: dict[str, Any] = {"augment": True} if cfg.augment else {}
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

    kwargs: dict[str, Any] = {}
    if is_language_run(cfg):
        if cfg.context is not None:
            kwargs["context"] = cfg.context
    else:
        info = dataset_info(cfg.dataset)
        kwargs["num_classes"] = info.num_classes
        if cfg.model == "mlp":
            kwargs["in_features"] = info.input_size
            if cfg.hidden is not None:
                kwargs["hidden"] = tuple(cfg.hidden)
        else:
            kwargs["in_channels"] = info.input_shape[0]
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model, **kwargs)
    if not cfg.dense:
        small = default_exclude(model, rank=cfg.rank, head="") if isinstance(cfg.rank, int) else ()
        exclude = tuple(dict.fromkeys([*cfg.exclude, *small]))
        conversion.convert(
            model,
            rank=cfg.rank,
            max_rank=cfg.max_rank,
            min_rank=cfg.min_rank,
            exclude=exclude,
            conv=cfg.conv,
            tucker_modes=cfg.tucker_modes,
            init=cfg.init,
        )
    return model


def build_forward(cfg: TrainConfig) -> Any:
    """How the task of ``cfg`` runs a batch (:attr:`Task.forward`): classification, or a language model's
    next-token prediction (:func:`dlrt.training.lm.lm_forward`), with ``robust_beta``'s regularizer."""
    if is_language_run(cfg):
        from .lm import lm_forward

        return functools.partial(lm_forward, beta=cfg.robust_beta)
    return functools.partial(_robust_forward, cfg.robust_beta) if cfg.robust_beta else classify


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    hyper: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.momentum is not None and cfg.optimizer in ("sgd", "geo-heavyball"):  # else the optimizer's default
        hyper["momentum"] = cfg.momentum
    if cfg.optimizer == "geo-adam" and not cfg.dense:
        hyper["second_moment"] = cfg.second_moment
    if cfg.dense:
        # On a dense weight (a flat space) the geometric methods are the usual ones (docs/algorithms.md §9).
        if cfg.optimizer == "geo-heavyball":
            hyper.setdefault("momentum", RULES["geo-heavyball"].defaults["momentum"])
        optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        cls = optimizers[{"geo-heavyball": "sgd", "geo-adam": "adam"}.get(cfg.optimizer, cfg.optimizer)]
        return cls(model.parameters(), **hyper)
    return DLRTOptimizer(
        model,
        integrator=cfg.integrator,
        optimizer=cfg.optimizer,
        tau=cfg.tau,
        tau_mode=cfg.tau_mode,
        tau_grad=cfg.tau_grad,
        coefficient_steps=cfg.coefficient_steps,
        check_every=cfg.check_every,
        **hyper,
    )


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """A per-step learning-rate schedule (``None`` for constant without warm-up).

    Without warm-up these are torch's own schedulers, as in checkpoints written
    before ``warmup`` existed, so those runs still resume.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
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
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    return None


# ------------------------------------------------------------------ records
METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "total_rank",
    "ranks",
    "compression",
    "cond_mean",
    "cond",
    "lr",
    "seconds",
]


def _layer_metrics(model: nn.Module) -> dict[str, Any]:
    """The extra columns of every row: compression, and each low-rank core's condition number and their mean."""
    cond = condition_numbers(model)
    mean = sum(cond.values()) / len(cond) if cond else float("nan")
    return {"compression": conversion.compression(model), "cond_mean": mean, "cond": cond}


def _robust_forward(beta: float, model: nn.Module, batch: tuple[Any, Any]) -> tuple[Any, Any, Any]:
    """The classification loss plus ``β · Σ ℛ(S)`` (:func:`dlrt.robust.condition_regularizer`)."""
    x, y = batch
    logits = model(x)
    return logits, y, nn.functional.cross_entropy(logits, y) + beta * condition_regularizer(model)


def _ranks_text(ranks: dict[str, int]) -> str:
    return ";".join(f"{n}:{r}" for n, r in ranks.items())


def _describe(cfg: TrainConfig, row: dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}, train {100 * row['train_acc']:.2f}%, "
        f"test {100 * row['test_acc']:.2f}%, rank {row['total_rank']} ({_ranks_text(row['ranks'])}), "
        f"compression {100 * row['compression']:.1f}%, {row['seconds']:.1f}s"
    )


# ------------------------------------------------------------------ the recipe
def train(cfg: TrainConfig | None = None, *, resume_dir: str | os.PathLike[str] | None = None) -> RunResult:
    """Train as ``cfg`` says in a new run directory, or continue ``resume_dir``.

    The run directory is created only once the data, model, optimizer and
    schedule are built, so a config that fails leaves nothing behind. Returns
    the run's :class:`RunResult`; Ctrl-C saves a checkpoint and returns with
    status ``"interrupted"``, a non-finite loss stops the run with status
    ``"diverged"`` and the message in ``summary.json``.

    Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) every
    process runs this function: it starts the process group (gloo on CPU,
    nccl on CUDA, with ``dist_timeout``), trains data-parallel with
    ``batch_size`` per process, lets rank 0 alone name and write the run
    directory, and destroys the group at the end (docs/distributed.md).
    """
    if resume_dir is not None:
        saved = Path(resume_dir) / CONFIG
        if not saved.is_file():
            raise FileNotFoundError(f"{resume_dir} is not a run directory (no {CONFIG})")
        cfg = load_config(saved, _started_before_the_gradient_rule(saved))
    cfg = cfg or TrainConfig()
    with distributed.init_from_env(setup(cfg), cfg.dist_timeout) as device:
        return _train(cfg, resume_dir, device)


def _started_before_the_gradient_rule(saved: Path) -> list[str]:
    """Overrides that let a run written before ``tau_mode`` and ``init`` existed resume as it began:
    the relative rule and the plain truncated SVD."""
    import yaml

    keys = yaml.safe_load(saved.read_text()) or {}
    return [f"{k}={v}" for k, v in (("tau_mode", "relative"), ("init", "svd")) if k not in keys]


def _train(cfg: TrainConfig, resume_dir: str | os.PathLike[str] | None, device: torch.device) -> RunResult:
    group = distributed.resolve_group()
    comm = distributed.Communicator(group) if group is not None else None
    if comm is not None and cfg.dense:
        raise ValueError(
            "dense=true under torchrun is not supported: dlrt train averages the gradients through DLRTOptimizer; "
            "train the dense baseline in one process, or with torch.nn.parallel.DistributedDataParallel"
        )
    train_set, test_set = build_data(cfg)
    model = build_model(cfg).to(device)
    opt = build_optimizer(cfg, model)
    world = 1 if comm is None else comm.size
    scheduler = build_scheduler(cfg, opt, math.ceil(math.ceil(len(train_set) / world) / cfg.batch_size))
    language = is_language_run(cfg)
    options: dict[str, Any] = {"metric_fields": METRIC_FIELDS, "describe": functools.partial(_describe, cfg)}
    if cfg.eval_every is not None:
        options["step_fields"] = EVAL_STEP_FIELDS
    if language:
        from . import lm

        options = {
            "metric_fields": lm.metric_fields(METRIC_FIELDS),
            "describe": functools.partial(lm.describe, cfg.epochs),
            "step_fields": lm.LM_STEP_FIELDS,
            "epoch_hooks": [lm.add_epoch_perplexity],
            "step_row_hooks": [lm.add_step_perplexity],
        }
    run_dir, driver = start_run(
        cfg,
        Task(model, train_set, test_set, None, build_forward(cfg)),
        opt,
        device=device,
        resume_dir=resume_dir,
        hint="or continue it with `dlrt train --resume {}`",
        tensorboard=cfg.tensorboard,
        scheduler=scheduler,
        ranks=conversion.mode_ranks,
        extra_metrics=_layer_metrics,
        checkpoint=True,
        **options,
    )
    out = driver.run(resume=resume_dir is not None)
    if out.status == "interrupted" and distributed.speaks():
        # a checkpoint inside an epoch resumes with as many processes as wrote it
        launch = "dlrt" if world == 1 else f"torchrun --nproc_per_node {world} -m dlrt"
        print(interrupted_line(out, f"{launch} train --resume {run_dir}"), flush=True)

    stored, dense = conversion.parameter_counts(model)
    rows = out.rows
    summary = {
        "status": out.status,
        "message": out.message,
        "epochs_completed": len(rows),
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": max((r["test_acc"] for r in rows), default=None),
        "compression": conversion.compression(model),
        "ranks": conversion.ranks(model),
        "cond": _layer_metrics(model)["cond"],
        "params_stored": stored,
        "params_dense": dense,
        "wall_seconds": out.wall_seconds,
        "config": cfg.to_dict(),
    }
    if language:
        from . import lm

        summary["test_loss"] = rows[-1]["test_loss"] if rows else None
        summary["test_ppl"] = rows[-1]["test_ppl"] if rows else None
        summary["best_test_ppl"] = min((r["test_ppl"] for r in rows), default=None)
        if cfg.samples and out.status == "completed" and driver.writer.writes and hasattr(model, "generate"):
            lm.write_samples(
                run_dir / lm.SAMPLES,
                model,
                test_set,
                samples=cfg.samples,
                tokens=cfg.sample_tokens,
                seed=cfg.seed,
                device=device,
            )
            summary["samples"] = lm.SAMPLES
    driver.writer.write_summary(summary)
    if cfg.plots and rows:
        from .plots import plot_run

        driver.writer.plot(lambda path: plot_run(path, model))
    return RunResult(run_dir, out.status, summary)


def resume(run_dir: str | os.PathLike[str]) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint."""
    return train(resume_dir=run_dir)
