"""Training pipeline: configs, the loop with run directories and checkpoints, plots."""

from .config import TrainConfig, apply_overrides, load_config
from .loop import RunResult, evaluate, read_metrics, resume, train

__all__ = ["RunResult", "TrainConfig", "apply_overrides", "evaluate", "load_config", "read_metrics", "resume", "train"]
