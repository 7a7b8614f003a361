"""Starting a run: the one way every command turns its config into a run directory and a driver.

Each command (``dlrt train``, ``dlrt finetune``, ``dlrt closure train``, ``dlrt federated``)
goes the same way around its own recipe:

1. :func:`setup`: apply the config's process settings (``threads``) and resolve its
   ``device``, before anything is built;
2. build its data, model and optimizer (the recipe's own part);
3. :func:`start_run`: name the run directory (``runs_dir/name``, or
   ``runs_dir/<time>-<stem>``; under torchrun rank 0 names it for all), create it with
   ``config.yaml``, and return it with the :class:`~dlrt.training.driver.Driver` that
   trains the recipe's task, its loop settings (epochs, batch sizes, seed, ``log_every``,
   ``max_steps``) read from the config. A command with a loop of its own
   (``dlrt federated``'s rounds) takes the run directory and writer alone,
   :func:`open_run`.

The directory is created only after step 2, so a config or a build that fails leaves
nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..distributed import Communicator, resolve_group
from .config import RunConfig
from .driver import Driver, RunWriter, Task, free_run_dir

__all__ = ["open_run", "resolve_device", "setup", "start_run"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu")
    return device


def setup(cfg: RunConfig) -> torch.device:
    """Apply ``cfg.threads`` (before anything is computed: it can change the rounding) and return ``cfg.device``."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def open_run(
    cfg: RunConfig,
    metric_fields: Sequence[str],
    *,
    resume_dir: str | os.PathLike[str] | None = None,
    hint: str = "",
    tensorboard: bool = False,
    record: dict[str, Any] | None = None,
    write: bool = True,
    step_fields: Sequence[str] = (),
) -> tuple[Path | None, RunWriter]:
    """The run directory of ``cfg`` (``resume_dir`` to continue one) and its :class:`RunWriter`.

    A new directory is created with ``config.yaml`` (``record``, default ``cfg.to_dict()``).
    ``hint`` completes the error for a taken ``name`` (``{}``: the directory). Under
    torchrun, rank 0 names the directory and alone writes. ``write=False``: no directory.
    ``step_fields``: the columns ``steps.csv`` has beyond the driver's own.
    """
    group = resolve_group()
    comm = Communicator(group) if group is not None else None
    run_dir: Path | None = None
    if resume_dir is not None:
        run_dir = Path(resume_dir)
    elif write:
        run_dir = _name_run_dir(cfg, hint, comm)
    writes = comm is None or comm.rank == 0
    writer = RunWriter(
        run_dir, metric_fields, progress=cfg.progress, tensorboard=tensorboard, writes=writes, step_fields=step_fields
    )
    if resume_dir is None:
        writer.create(cfg.to_dict() if record is None else record)
    return run_dir, writer


def start_run(
    cfg: RunConfig,
    task: Task,
    opt: torch.optim.Optimizer,
    *,
    device: torch.device,
    metric_fields: Sequence[str],
    resume_dir: str | os.PathLike[str] | None = None,
    hint: str = "",
    tensorboard: bool = False,
    step_fields: Sequence[str] = (),
    **options: Any,
) -> tuple[Path, Driver]:
    """Open the run directory of ``cfg`` (:func:`open_run`) and the :class:`Driver` of ``task`` in it.

    ``cfg`` is a :class:`~dlrt.training.config.RunConfig` with the loop keys ``epochs``,
    ``batch_size``, ``eval_batch_size`` and ``log_every`` (and, if it has them, ``max_steps``, ``eval_every``,
    and with ``checkpoint=True`` ``checkpoint_every`` and ``checkpoint_minutes``);
    ``options`` are the recipe's own :class:`Driver` arguments (scheduler, hooks, metrics, ...).
    """
    if options.get("checkpoint"):
        for key in ("checkpoint_every", "checkpoint_minutes"):
            options.setdefault(key, getattr(cfg, key, None))
    run_dir, writer = open_run(
        cfg, metric_fields, resume_dir=resume_dir, hint=hint, tensorboard=tensorboard, step_fields=step_fields
    )
    assert run_dir is not None
    driver = Driver(
        task,
        opt,
        writer,
        device=device,
        epochs=cfg.epochs,  # type: ignore[attr-defined]
        batch_size=cfg.batch_size,  # type: ignore[attr-defined]
        eval_batch_size=cfg.eval_batch_size,  # type: ignore[attr-defined]
        seed=cfg.seed,
        max_steps=getattr(cfg, "max_steps", None),
        eval_every=getattr(cfg, "eval_every", None),
        log_every=cfg.log_every,  # type: ignore[attr-defined]
        **options,
    )
    return run_dir, driver


def _name_run_dir(cfg: RunConfig, hint: str, comm: Communicator | None) -> Path:
    """``runs_dir/name`` or a free ``runs_dir/<time>-<stem>``; under torchrun rank 0's choice, on every process."""
    if comm is None:
        return free_run_dir(cfg.runs_dir, cfg.name, cfg.run_stem, hint)
    # rank 0 names the run directory (the time stamp may differ between processes)
    named: list[Any] = [None, None]
    if comm.rank == 0:
        try:
            named[0] = str(free_run_dir(cfg.runs_dir, cfg.name, cfg.run_stem, hint))
        except FileExistsError as err:
            named[1] = str(err)
    named = comm.broadcast_object(named, "the run directory's name")
    if named[1] is not None:
        raise FileExistsError(named[1])
    return Path(named[0])
