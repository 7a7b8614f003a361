"""The one epoch/step driver and run-directory writer behind ``dlrt train``, ``dlrt finetune`` and the demo.

Each command is a recipe: it builds its data, model and optimizer into a
:class:`Task`, opens a :class:`RunWriter` and hands both to :class:`Driver`,
which owns everything that is the same for all of them:

* batches: the epoch's order is ``randperm`` under a generator seeded by
  ``(seed, epoch)``, and the global RNG is reseeded from ``(seed, epoch, batch)``
  before every batch is fetched (augmentation, dropout), so a resumed run
  replays exactly what an uninterrupted one would have done;
* the step: ``opt.step(closure)`` for a :class:`~dlrt.DLRTOptimizer` as for any
  torch optimizer, the per-step hooks, the scheduler, the counters;
* running train metrics, one evaluation per epoch (and, with ``eval_every``, every
  ``eval_every`` steps, recorded as ``test_loss``/``test_acc`` in that step's row), the
  ``metrics.csv`` rows, a ``steps.csv`` row at the start and every ``log_every`` steps
  (loss, learning rate, the rank of every layer), TensorBoard scalars and the progress
  bar (through the writer);
* checkpoint/resume, Ctrl-C (status ``"interrupted"``) and divergence
  (:class:`~dlrt.optimizer.NonFiniteError` or a non-finite loss: status
  ``"diverged"``);
* data parallelism (``torchrun``, docs/distributed.md): when ``torch.distributed``
  is initialised, each of the ``N`` processes takes every ``N``-th index of the
  epoch's permutation (``DistributedSampler``'s semantics: the permutation is
  padded by its first indices to a multiple of ``N``), so a step's global batch
  is ``N × batch_size``; the train metrics are summed over the processes every
  step and the evaluation is sharded and summed, so every process sees the same
  numbers; only the process of rank 0 writes (its :class:`RunWriter` has
  ``writes=True``), the others read the checkpoint on resume.

Exact resume (docs/algorithms.md §7). The checkpoint is the single record of progress:
it holds the model, the optimizer, the scheduler, the position ``(epoch,
batch, step)``, the running train metrics *and* the rows of ``metrics.csv`` and
``steps.csv``, which are rewritten from it on resume. Two critical sections are
all-or-nothing: "step + hooks + scheduler + counters" and "end-of-epoch
evaluation + rows + checkpoint + CSV files". While a run is in progress SIGINT
only sets a flag (in the main thread); the driver raises
:class:`KeyboardInterrupt` at the next safe point between sections and saves a
checkpoint of that consistent position. A :class:`KeyboardInterrupt` raised
*inside* a section by other means leaves a half-done section, so nothing is
saved then: resuming continues from the last checkpoint, still exactly.

Extension points (for FeDLRT, robust training, the closures, torchrun):

* ``Task.forward(model, batch) -> (logits, labels, loss or None)``: how one
  batch is run and scored; a ``None`` loss means the cross-entropy;
* ``step_hooks``: ``hook(step)`` after every optimizer step, before the
  scheduler (e.g. AdaLoRA's ``update_and_allocate``), inside the step section;
* ``epoch_hooks``: ``hook(row)`` at every epoch end, before the row is stored;
  it may add columns to the row (name them in ``metric_fields``);
* ``step_row_hooks``: ``hook(row)`` on every ``steps.csv`` row before it is stored;
  it may add columns (name them in the writer's ``step_fields``), e.g. a language
  model's perplexity;
* ``extra_metrics(model) -> dict``: extra columns of every ``metrics.csv`` row;
* ``ranks(model) -> {name: rank}``: what "rank" means for the task;
* ``describe(row) -> str``: the line printed at every epoch end.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import io
from ..distributed import Communicator, resolve_group
from .records import METRICS, STEPS, from_json, read_csv, to_json, write_csv
from .signals import Interrupts

__all__ = [
    "Driver",
    "Outcome",
    "RunWriter",
    "Task",
    "TaskState",
    "classify",
    "new_run_dir",
    "seed_for",
    "step_closure",
    "to_device",
]

CONFIG = "config.yaml"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.safetensors"

#: Columns of ``steps.csv``: a row before the first step (loss NaN), every ``log_every`` steps and after the last.
STEP_FIELDS = ["step", "epoch", "loss", "lr", "seconds", "total_rank", "ranks"]
#: Columns a ``steps.csv`` row gains at the steps of a driver's ``eval_every``.
EVAL_STEP_FIELDS = ["test_loss", "test_acc"]

#: The clock of ``checkpoint_minutes`` (monotonic seconds; tests replace it).
_clock = time.monotonic

MATPLOTLIB_HINT = "plots=true needs matplotlib: pip install matplotlib (or pip install dlrt[cli])"


@dataclass
class Task:
    """A model with its data: ``forward(model, batch) -> (logits, labels, loss or None)``.

    A returned loss is the model's own (for PEFT's AdaLoRA it includes the
    orthogonality regulariser); without one the driver takes the cross-entropy.
    ``collate`` builds batches from dataset items (``None``: torch's default).
    """

    model: nn.Module
    train_set: Any
    test_set: Any
    collate: Callable[[list[Any]], Any] | None
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor | None]]


@dataclass
class TaskState:
    """State a recipe keeps outside the model and the optimizer that a checkpoint must hold for an exact
    resume (PEFT AdaLoRA's importance scores): ``get() -> (tensors, json)`` when saving,
    ``put(tensors, json)`` when resuming."""

    get: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]]
    put: Callable[[dict[str, Tensor], dict[str, Any]], None]


def classify(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, None]:
    """The forward of an ``(x, y)`` classification batch: cross-entropy of ``model(x)`` against ``y``."""
    x, y = batch
    return model(x), y, None


@dataclass
class Outcome:
    """How a :meth:`Driver.run` ended: status, the stored rows, counters and timings."""

    status: str  # "completed" | "interrupted" | "diverged"
    message: str
    rows: list[dict[str, Any]]
    step_rows: list[dict[str, Any]]
    steps: int
    wall_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    #: interrupted: whether a checkpoint of the stopping point was written (else resume starts from the last one)
    checkpointed: bool = False
    #: interrupted: the stop signal this process received first ("SIGINT", "SIGTERM", "SIGUSR1"), or "a stop
    #: signal to another process" (under a process group), if any
    signal: str | None = None


# ------------------------------------------------------------------ helpers
def check_checkpoint_interval(every: int | None, minutes: float | None) -> None:
    """A clear ``ValueError`` unless ``checkpoint_every`` is a step count ``>= 1`` and ``checkpoint_minutes``
    a finite number of minutes ``> 0`` (each may be ``None``: no checkpoints by that measure)."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
        raise ValueError(f"checkpoint_every must be a number of steps >= 1 (or none: not by steps), got {every!r}")
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, numbers.Real) or not math.isfinite(minutes) or minutes <= 0
    ):
        raise ValueError(f"checkpoint_minutes must be a number of minutes > 0 (or none: not by time), got {minutes!r}")


def step_closure(
    task: Task,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    *,
    clip: tuple[list[nn.Parameter], float] | None = None,
    held: dict[str, Tensor] | None = None,
) -> Callable[[], Tensor]:
    """A closure for ``opt.step``: zero the gradients, forward ``batch``, backpropagate the loss.

    The loss is the model's own when it returns one, else the cross-entropy.
    ``clip=(params, max_norm)`` clips their gradients after the backward pass;
    ``held`` receives the detached ``logits``, ``labels`` and ``loss``.
    """

    def closure() -> Tensor:
        opt.zero_grad()
        logits, labels, loss = task.forward(model, batch)
        if loss is None:
            loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(*clip)
        if held is not None:
            held["logits"], held["labels"], held["loss"] = logits.detach(), labels, loss.detach()
        return loss

    return closure


def interrupted_line(outcome: Outcome, resume: str) -> str:
    """The one line an interrupted command prints: what stopped it, what was saved, the command that resumes it."""
    by = {"SIGINT": "Ctrl-C", None: "an interrupt"}.get(outcome.signal, outcome.signal)
    if outcome.checkpointed:
        return f"interrupted by {by} at step {outcome.steps}: checkpoint saved; continue with `{resume}`"
    return f"interrupted by {by} inside a step: nothing new saved; `{resume}` continues from the last checkpoint"


def seed_for(seed: int, epoch: int, batch: int = -1) -> int:
    """The seed of ``(seed, epoch)``'s batch order (``batch=-1``) or of batch ``batch``'s RNG."""
    return (seed * 1_000_003 + epoch * 10_007 + batch + 1) % (2**63 - 1)


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` (a tensor, a tuple/list of tensors, or a dict of tensors) on ``device``; with ``dtype``, its
    floating-point tensors in that dtype (a model's: data stored as float32 feeds a float64 model)."""

    def move(t: Tensor) -> Tensor:
        return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(t) for t in batch)
    return move(batch)


def frozen_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s parameters that do not require gradients (a fine-tuning run's frozen
    pretrained weights)."""
    return [name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (``None`` without one): what its inputs need."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def new_run_dir(runs_dir: str, name: str | None, stem: str, hint: str = "") -> Path:
    """Create ``runs_dir/name``, or ``runs_dir/<time>-stem[-k]`` when ``name`` is None; never reuses one."""
    path = free_run_dir(runs_dir, name, stem, hint)
    path.mkdir(parents=True)
    return path


def free_run_dir(runs_dir: str, name: str | None, stem: str, hint: str = "") -> Path:
    """The path :func:`new_run_dir` would create, without creating it (``FileExistsError`` for a taken name)."""
    parent = Path(runs_dir)
    if name:
        run_dir = parent / name
        if run_dir.exists():
            extra = f" {hint.format(run_dir)}" if hint else ""
            raise FileExistsError(f"run directory {run_dir} exists; pick another name={extra}")
        return run_dir
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    run_dir, k = parent / stem, 1
    while run_dir.exists():
        k += 1
        run_dir = parent / f"{stem}-{k}"
    return run_dir


class _Progress:
    """A tqdm bar when available, wanted and on a terminal, else nothing."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ the writer
class RunWriter:
    """Writes a run directory: ``config.yaml``, ``metrics.csv``, ``steps.csv``, ``summary.json``, the
    checkpoint, TensorBoard scalars and plots; ``run_dir=None`` writes nothing (the demo's default).

    The directory is created by :meth:`create`, which a recipe calls only after
    everything the run needs has been built, so a run that fails validation
    leaves no directory behind.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        metric_fields: Sequence[str],
        *,
        progress: bool = True,
        tensorboard: bool = False,
        writes: bool = True,
        step_fields: Sequence[str] = (),
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        #: False on the processes of rank > 0 of a distributed run: they read ``checkpoint`` but write nothing.
        self.writes = writes
        self.metric_fields = list(metric_fields)
        #: The columns of ``steps.csv``: :data:`STEP_FIELDS` and the recipe's ``step_fields``.
        self.step_fields = [*STEP_FIELDS, *(f for f in step_fields if f not in STEP_FIELDS)]
        self.progress = progress
        self._tensorboard = tensorboard
        self._tb: Any = None

    def create(self, config: dict[str, Any]) -> None:
        """Make the (new) run directory and write ``config.yaml``."""
        if self.run_dir is None or not self.writes:
            return
        import yaml

        self.run_dir.mkdir(parents=True)
        (self.run_dir / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def checkpoint(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    def remove_temporaries(self) -> list[Path]:
        """Delete what killed writes of this run directory's files left behind (any age); return them.

        Called when a run starts or resumes, when no other writer of the directory
        can be alive: the checkpoint and the CSV/JSON files are written through
        temporary files renamed into place, so a kill leaves the previous file
        whole and, at most, a temporary one beside it.
        """
        if self.run_dir is None or not self.writes:
            return []
        removed: list[Path] = []
        for name in (CHECKPOINT, METRICS, STEPS, SUMMARY):
            removed += io.remove_stale_temporaries(self.run_dir / name, older_than=0.0)
        return removed

    def bar(self, total: int, desc: str, initial: int = 0) -> _Progress:
        return _Progress(self.progress and self.writes, total, desc, initial)

    def write_rows(self, rows: list[dict[str, Any]], step_rows: list[dict[str, Any]]) -> None:
        if self.run_dir is not None and self.writes:
            write_csv(self.run_dir / METRICS, self.metric_fields, rows)
            write_csv(self.run_dir / STEPS, self.step_fields, step_rows)

    def log(self, row: dict[str, Any], x: int) -> None:
        """TensorBoard scalars of ``row`` (numbers, and ``rank/<layer>`` for its ranks) at ``x``."""
        if self.run_dir is None or not self._tensorboard or not self.writes:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                return
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in row.items():
            if key in ("epoch", "step", "seconds"):
                continue
            if key == "ranks":
                for name, r in value.items():
                    self._tb.add_scalar(f"rank/{name}", r, x)
            elif isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, x)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.run_dir is None or not self.writes:
            return
        text = json.dumps(summary, indent=2) + "\n"
        io.atomic_write(self.run_dir / SUMMARY, lambda tmp: Path(tmp).write_text(text))

    def plot(self, plot: Callable[[Path], Any]) -> None:
        """Run ``plot(run_dir)``; without matplotlib, say so with the install command."""
        if self.run_dir is None or not self.writes:
            return
        try:
            plot(self.run_dir)
        except ImportError as err:
            if "matplotlib" not in str(err):
                raise
            message = f"{MATPLOTLIB_HINT}; no plots written to {self.run_dir}"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ------------------------------------------------------------------ the driver
class Driver:
    """Trains ``task.model`` with ``opt`` for ``epochs`` (or ``max_steps``), writing through ``writer``.

    See the module docstring for what it owns and its extension points.
    ``checkpoint=True`` saves a checkpoint when a new run starts, at every epoch
    end, every ``checkpoint_every`` steps and every ``checkpoint_minutes`` minutes
    since the last one (at the first step boundary after), and when a stop signal
    (Ctrl-C, SIGTERM, SIGUSR1) ends the run; :meth:`run` continues from it
    (``resume=True``). Each is written whole to a temporary file and renamed over
    the previous one, so a killed process always leaves one complete checkpoint.
    ``checkpoint_frozen=False`` leaves the parameters that do not require gradients
    out of it (a frozen pretrained model, rebuilt on resume; :func:`dlrt.io.save`'s ``frozen``).
    ``eval_every=N`` also evaluates the test set after every ``N``-th step and writes a
    ``steps.csv`` row there with ``test_loss`` and ``test_acc`` (name them in the writer's
    ``step_fields``, :data:`EVAL_STEP_FIELDS`).
    """

    def __init__(
        self,
        task: Task,
        opt: torch.optim.Optimizer,
        writer: RunWriter,
        *,
        device: torch.device,
        epochs: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int = 0,
        scheduler: Any = None,
        max_steps: int | None = None,
        log_every: int = 10,
        clip: tuple[list[nn.Parameter], float] | None = None,
        ranks: Callable[[nn.Module], dict[str, int]],
        extra_metrics: Callable[[nn.Module], dict[str, Any]] | None = None,
        step_hooks: Sequence[Callable[[int], None]] = (),
        epoch_hooks: Sequence[Callable[[dict[str, Any]], None]] = (),
        describe: Callable[[dict[str, Any]], str] | None = None,
        checkpoint: bool = False,
        checkpoint_every: int | None = None,
        checkpoint_minutes: float | None = None,
        task_state: TaskState | None = None,
        checkpoint_frozen: bool = True,
        eval_every: int | None = None,
        step_row_hooks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        if eval_every is not None and (
            isinstance(eval_every, bool) or not isinstance(eval_every, numbers.Integral) or eval_every < 1
        ):
            raise ValueError(
                f"eval_every must be a number of steps >= 1 (or none: at epoch ends only), got {eval_every!r}"
            )
        self.task, self.model, self.opt, self.writer = task, task.model, opt, writer
        self.device, self.epochs, self.seed = device, epochs, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.scheduler, self.log_every, self.clip = scheduler, log_every, clip
        self.ranks, self.extra_metrics = ranks, extra_metrics
        self.step_hooks, self.epoch_hooks, self.describe = list(step_hooks), list(epoch_hooks), describe
        self.checkpoint = writer.checkpoint if checkpoint else None
        check_checkpoint_interval(checkpoint_every, checkpoint_minutes)
        if not checkpoint and (checkpoint_every is not None or checkpoint_minutes is not None):
            raise ValueError("checkpoint_every= and checkpoint_minutes= need checkpoint=True")
        self.checkpoint_every, self.checkpoint_minutes = checkpoint_every, checkpoint_minutes
        self.task_state = task_state
        self.checkpoint_frozen = checkpoint_frozen
        self.eval_every, self.step_row_hooks = eval_every, list(step_row_hooks)
        group = resolve_group()
        self.comm = Communicator(group) if group is not None else None
        self.rank, self.world_size = (0, 1) if self.comm is None else (self.comm.rank, self.comm.size)
        #: Training samples per process and epoch (the padded shard of a distributed run).
        self.shard_size = math.ceil(len(task.train_set) / self.world_size)
        self.steps_per_epoch = math.ceil(self.shard_size / batch_size)
        total = epochs * self.steps_per_epoch
        self.total_steps = total if max_steps is None else min(total, max_steps)
        self._reset_position()

    # ----------------------------------------------------------- state
    def _reset_position(self) -> None:
        self.epoch, self.batch, self.step = 0, 0, 0
        self.carry: dict[str, float] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.rows: list[dict[str, Any]] = []
        self.step_rows: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        self._saved_step, self._saved_at = 0, _clock()
        #: Under a process group: whether the processes agreed at the last step to stop (a stop signal reached
        #: one of them) and to save (one of them found checkpoint_minutes passed).
        self._agreed_stop = self._agreed_due = False

    def _position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "carry": dict(self.carry),
            "elapsed": self.elapsed_before + time.perf_counter() - self._t_start,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rows": to_json(self.rows),
            "step_rows": to_json(self.step_rows),
            "world_size": self.world_size,
        }

    def _save(self) -> None:
        if self.checkpoint is not None and self.writer.writes:
            extra, tensors = self._position(), None
            if self.task_state is not None:
                tensors, extra["task"] = self.task_state.get()
            frozen = () if self.checkpoint_frozen else frozen_keys(self.model)
            io.save(self.checkpoint, self.model, self.opt, extra=extra, tensors=tensors, frozen=frozen)
        self._saved_step, self._saved_at = self.step, _clock()

    def _time_due(self) -> bool:
        """Whether ``checkpoint_minutes`` have passed since the last checkpoint (on this process's clock)."""
        m = self.checkpoint_minutes
        return m is not None and _clock() - self._saved_at >= 60.0 * m

    def _save_due(self) -> bool:
        """Whether a checkpoint is due after this step (the epoch's end, which saves anyway, aside)."""
        if self.checkpoint is None or self.batch >= self.steps_per_epoch or self.step >= self.total_steps:
            return False
        every = self.checkpoint_every is not None and self.step - self._saved_step >= self.checkpoint_every
        due = self._agreed_due if self.comm is not None else self._time_due()
        return every or due

    def _stopping(self, interrupts: Interrupts) -> bool:
        """Whether to stop at this safe point: the signal flag, or under a process group what all processes
        agreed at the last step (each stops at the same step, whichever of them got the signal)."""
        return self._agreed_stop if self.comm is not None else interrupts.requested

    def _restore(self) -> None:
        """Load the checkpoint (if any) and rewrite the CSV files from it."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            self.writer.write_rows([], [])
            return
        tensors: dict[str, Tensor] = {}
        extra = io.load(self.checkpoint, self.model, self.opt, tensors=tensors)
        if self.task_state is not None:
            self.task_state.put(tensors, extra.get("task", {}))
        saved_world = extra.get("world_size", 1)
        if saved_world != self.world_size and extra["batch"] != 0:
            raise ValueError(
                f"the checkpoint {self.checkpoint} was saved in the middle of an epoch by {saved_world} process(es); "
                f"this run has {self.world_size}: resume it with {saved_world} (checkpoints at epoch ends load in any)"
            )
        self.epoch, self.batch = extra["epoch"], extra["batch"]
        self.step = extra.get("step", self.epoch * self.steps_per_epoch + self.batch)
        self.carry = extra["carry"]
        self.elapsed_before = extra["elapsed"]
        self._saved_step = self.step
        if self.scheduler is not None and extra.get("scheduler") is not None:
            self.scheduler.load_state_dict(extra["scheduler"])
        if "rows" in extra:
            self.rows, self.step_rows = from_json(extra["rows"]), from_json(extra["step_rows"])
        else:  # a checkpoint from before the rows were stored in it
            self.rows = [r for r in read_csv(self.checkpoint.parent / METRICS) if r["epoch"] <= self.epoch]
        self.writer.write_rows(self.rows, self.step_rows)

    # ----------------------------------------------------------- batches
    def _batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """Epoch ``epoch``'s batches from number ``skip`` on; the RNG is seeded before each is fetched."""
        gen = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        data = self.task.train_set
        # The order of DataLoader(shuffle=True, generator=gen), which draws its worker base seed first:
        # runs made before this driver (the README's tables) keep their batches.
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        order = torch.randperm(len(data), generator=gen)
        if self.world_size > 1:  # DistributedSampler: pad with the first indices, take every N-th
            pad = self.shard_size * self.world_size - len(order)
            order = torch.cat([order, order.repeat(math.ceil(pad / len(order)))[:pad]])[self.rank :: self.world_size]
        order = order[skip * self.batch_size :]
        if isinstance(data, torch.utils.data.TensorDataset) and self.task.collate is None:
            # in-memory tensors: slice them (the same batches as the loader below, without per-item calls)
            it: Iterator[Any] = (tuple(t[idx] for t in data.tensors) for idx in order.split(self.batch_size))
        else:
            sampler = order.tolist()
            it = iter(torch.utils.data.DataLoader(data, self.batch_size, sampler=sampler, collate_fn=self.task.collate))
        dtype = model_dtype(self.model)
        for b in range(skip, self.steps_per_epoch):
            torch.manual_seed(seed_for(self.seed, epoch, b))
            batch = next(it, None)
            if batch is None:
                return
            yield to_device(batch, self.device, dtype)

    # ----------------------------------------------------------- the two sections
    def _train_step(self, batch: Any, interrupts: Interrupts | None = None) -> float:
        """Section 1: step, hooks, scheduler, counters (and a ``steps.csv`` row every ``log_every`` steps).

        Under a process group the step's metrics are summed over the processes, and
        with them each process's stop request and whether its clock says a
        checkpoint is due: one collective, and every process takes the same decisions.
        """
        from ..optimizer import DLRTOptimizer, NonFiniteError

        held: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        self.opt.step(step_closure(self.task, self.model, self.opt, batch, clip=self.clip, held=held))
        loss = float(held["loss"])
        if not isinstance(self.opt, DLRTOptimizer) and not math.isfinite(loss):
            raise NonFiniteError(f"step {self.step}: non-finite loss {loss}")
        for hook in self.step_hooks:
            hook(self.step)
        if self.scheduler is not None:
            self.scheduler.step()
        seconds = time.perf_counter() - t0
        n = held["labels"].numel()
        labels = held["labels"]
        # Accuracy for class labels; a task with real-valued targets (regression, a closure) counts none correct.
        correct = 0 if labels.is_floating_point() else int((held["logits"].argmax(-1) == labels).sum())
        if self.comm is not None:  # the global batch's numbers, the same on every process
            stop = interrupts is not None and interrupts.requested
            sums = torch.tensor([loss * n, correct, n, stop, self._time_due()], dtype=torch.float64)
            loss_sum, correct, n, stops, dues = self.comm.all_reduce(sums, "the step's train metrics").tolist()
            loss, correct, n = loss_sum / n, int(correct), int(n)
            self._agreed_stop, self._agreed_due = stops > 0, dues > 0
        self.carry["loss"] += loss * n
        self.carry["correct"] += correct
        self.carry["seen"] += n
        self.step += 1
        self.batch += 1
        if self.step == self.total_steps and isinstance(self.opt, DLRTOptimizer):
            self.opt.finish_cycle()  # the last step ends a coefficient cycle (GeoLoRA): truncate now
        evaluated = self.eval_every is not None and self.step % self.eval_every == 0
        if evaluated or self.step % self.log_every == 0 or self.step == self.total_steps:
            self._log_step(loss, seconds, self._evaluate() if evaluated else None)
        return seconds

    def _log_step(self, loss: float, seconds: float, test: tuple[float, float] | None = None) -> None:
        """A ``steps.csv`` row: the ranks of every layer after step ``self.step`` (0: the starting ranks),
        with the test loss and accuracy when ``test`` holds them."""
        ranks = self.ranks(self.model)
        lr = self.opt.param_groups[0]["lr"]
        row = {"step": self.step, "epoch": self.epoch + 1, "loss": loss, "lr": lr, "seconds": seconds}
        row = {**row, "total_rank": sum(ranks.values()), "ranks": ranks}
        if test is not None:
            row["test_loss"], row["test_acc"] = test
        for hook in self.step_row_hooks:
            hook(row)
        self.step_rows.append(row)

    def _evaluate(self) -> tuple[float, float]:
        """Loss and accuracy on the test set (NaN without one); under a process group each process scores
        its share and the sums are exchanged, so every process gets the same numbers."""
        if self.task.test_set is None:
            return float("nan"), float("nan")
        test_set = self.task.test_set
        if self.comm is not None:  # each process its share, then the sums
            test_set = torch.utils.data.Subset(test_set, range(self.rank, len(test_set), self.world_size))
        test_loss, test_acc = evaluate(
            self.model,
            test_set,
            self.eval_batch_size,
            self.device,
            forward=lambda m, b: self.task.forward(m, b)[:2],
            collate=self.task.collate,
        )
        if self.comm is not None:
            n = len(test_set)
            sums = torch.tensor([test_loss * n, test_acc * n, n], dtype=torch.float64)
            loss_sum, correct, seen = self.comm.all_reduce(sums, "the evaluation").tolist()
            test_loss, test_acc = loss_sum / max(seen, 1), correct / max(seen, 1)
        return test_loss, test_acc

    def _end_epoch(self, seconds: float) -> dict[str, Any]:
        """Section 2: evaluation, the epoch's row, checkpoint, CSV files."""
        test_loss, test_acc = self._evaluate()
        ranks = self.ranks(self.model)
        seen = max(self.carry["seen"], 1)
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": self.carry["loss"] / seen,
            "train_acc": self.carry["correct"] / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "total_rank": sum(ranks.values()),
            "ranks": ranks,
            **(self.extra_metrics(self.model) if self.extra_metrics is not None else {}),
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": self.carry["seconds"] + seconds,
        }
        for hook in self.epoch_hooks:
            hook(row)
        self.rows.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        self.carry = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self._save()
        self.writer.write_rows(self.rows, self.step_rows)
        return row

    # ----------------------------------------------------------- the run
    def run(self, *, resume: bool = False) -> Outcome:
        """Train to the end (or to Ctrl-C or divergence); ``resume=True`` continues from the checkpoint."""
        from ..optimizer import NonFiniteError

        self._t_start = time.perf_counter()
        self._reset_position()
        self.writer.remove_temporaries()
        if resume:
            self._restore()
        if self.step == 0 and not self.step_rows:
            self._log_step(float("nan"), 0.0)  # the starting ranks, before any step (no loss yet)
        status, message = "completed", ""
        step_seconds: list[float] = []
        in_section = checkpointed = agreed = False
        t_epoch = time.perf_counter()
        self.model.train()
        speak = self.comm is None or self.comm.rank == 0
        with Interrupts(speak) as interrupts:

            def stop_here() -> None:
                nonlocal agreed
                if self._stopping(interrupts):
                    agreed = True  # every process stops here (under a process group)
                    raise KeyboardInterrupt

            try:
                if self.checkpoint is not None and self.step == 0 and not (resume and self.checkpoint.is_file()):
                    # A new run: its start is a checkpoint too, so a kill before the first interval resumes from it.
                    in_section = True
                    self._save()
                    in_section = False
                while self.epoch < self.epochs and self.step < self.total_steps:
                    stop_here()
                    t_epoch = time.perf_counter()
                    n = min(self.steps_per_epoch, self.batch + self.total_steps - self.step)
                    bar = self.writer.bar(n, f"epoch {self.epoch + 1}/{self.epochs}", initial=self.batch)
                    for batch in self._batches(self.epoch, self.batch):
                        stop_here()
                        if self.step >= self.total_steps:
                            break
                        in_section = True
                        step_seconds.append(self._train_step(batch, interrupts))
                        in_section = False
                        seen = max(self.carry["seen"], 1)
                        total_rank = sum(self.ranks(self.model).values())
                        loss, acc = self.carry["loss"] / seen, self.carry["correct"] / seen
                        bar.update(1, loss=f"{loss:.4f}", acc=f"{acc:.3f}", rank=total_rank)
                        if self._save_due() and not self._stopping(interrupts):
                            in_section = True  # a checkpoint inside the epoch, and the CSV files it holds
                            now = time.perf_counter()
                            self.carry["seconds"] += now - t_epoch
                            t_epoch = now
                            self._save()
                            self.writer.write_rows(self.rows, self.step_rows)
                            in_section = False
                    bar.close()
                    stop_here()
                    in_section = True
                    row = self._end_epoch(time.perf_counter() - t_epoch)
                    in_section = False
                    self.writer.log(row, row["epoch"])
                    if self.describe is not None and self.writer.writes:
                        print(self.describe(row), flush=True)
            except KeyboardInterrupt:
                status = "interrupted"
                if not in_section and self.checkpoint is not None:  # a consistent position: save it
                    self.carry["seconds"] += time.perf_counter() - t_epoch
                    self._save()
                    self.writer.write_rows(self.rows, self.step_rows)
                    checkpointed = True
                if agreed and self.comm is not None:  # the others leave only once rank 0's checkpoint is whole
                    self.comm.all_reduce(torch.zeros(1), "the stop's checkpoint")
            except NonFiniteError as err:
                status, message = "diverged", str(err)
                if speak:
                    print(f"stopped: {message}", flush=True)
            finally:
                self.writer.close()
        wall = self.elapsed_before + time.perf_counter() - self._t_start
        by = interrupts.received or ("a stop signal to another process" if agreed and self.comm is not None else None)
        return Outcome(status, message, self.rows, self.step_rows, self.step, wall, step_seconds, checkpointed, by)


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
        batch = to_device(batch, device, model_dtype(model))
        logits, y = forward(model, batch) if forward is not None else (model(batch[0]), batch[1])
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        seen += y.numel()
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1)
