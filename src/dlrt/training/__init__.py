"""Training pipeline: configs, the one driver behind every command, run directories, checkpoints, plots."""

from .config import TrainConfig, apply_overrides, load_config
from .driver import Driver, Outcome, RunWriter, Task
from .loop import RunResult, evaluate, read_metrics, read_steps, resume, train

__all__ = [
    "Driver",
    "Outcome",
    "RunResult",
    "RunWriter",
    "Task",
    "TrainConfig",
    "apply_overrides",
    "evaluate",
    "load_config",
    "read_metrics",
    "read_steps",
    "resume",
    "train",
]
