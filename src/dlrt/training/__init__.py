"""Training pipeline: configs, the one driver behind every command, run directories, checkpoints, plots."""

from .config import RunConfig, TrainConfig, apply_overrides, load_config
from .driver import Driver, Outcome, RunWriter, Task
from .loop import RunResult, evaluate, read_metrics, read_steps, resume, train
from .runs import open_run, setup, start_run

__all__ = [
    "Driver",
    "Outcome",
    "RunConfig",
    "RunResult",
    "RunWriter",
    "Task",
    "TrainConfig",
    "apply_overrides",
    "evaluate",
    "load_config",
    "open_run",
    "read_metrics",
    "read_steps",
    "resume",
    "setup",
    "start_run",
    "train",
]
