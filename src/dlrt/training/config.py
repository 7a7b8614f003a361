"""Training configuration: a validated dataclass, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FederatedConfig",
    "FinetuneConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_keys",
    "load_config",
]


#: Steps between checkpoints inside an epoch, by default (``checkpoint_every``).
CHECKPOINT_EVERY = 500


def checkpoint_every_key() -> Any:
    """The ``checkpoint_every`` key of the commands whose runs checkpoint and resume (train, finetune, closure)."""
    help = "steps between checkpoints inside an epoch (none: at epoch ends only)"
    return field(default=CHECKPOINT_EVERY, metadata={"help": help})


def second_moment_key() -> Any:
    """The ``second_moment`` key of the commands that train with geo-adam (train, finetune)."""
    help = (
        "geo-adam: what its one second moment per layer averages over: rank (every layer steps about lr·√r) | "
        "coordinates (the r(n+m−r) of its tangent space: larger layers take larger steps, as with per-entry Adam); "
        "docs/algorithms.md §9.3"
    )
    return field(default="rank", metadata={"help": help})


def checkpoint_minutes_key() -> Any:
    """The ``checkpoint_minutes`` key of the commands whose runs checkpoint and resume."""
    return field(default=None, metadata={"help": "minutes between checkpoints, at the next step (none: not by time)"})


@dataclass
class RunConfig:
    """The keys every command's config has: how the run is seeded, where it runs, and where and how it writes.

    :class:`TrainConfig`, :class:`FinetuneConfig`, :class:`FederatedConfig` and
    :class:`~dlrt.kinetic.ClosureConfig` derive from it (a command re-declares a key only
    to change its default or help), and :func:`dlrt.training.runs.start_run` turns one into
    a run directory and a driver. A command's own keys come first in ``config.yaml`` and
    in the list of valid keys (:func:`config_keys`).
    """

    seed: int = field(default=0, metadata={"help": "seeds initialisation, data order, sampling and augmentation"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    runs_dir: str = field(default="runs", metadata={"help": "parent directory of run directories"})
    name: str | None = field(default=None, metadata={"help": "run directory name (default: generated)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots (needs matplotlib)"})

    def __post_init__(self) -> None:
        _coerce_all(self)
        _check_finite(self)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or none), got {self.threads}")

    @property
    def run_stem(self) -> str:
        """The run directory's name after its time stamp, when ``name`` is not given."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {key: values[key] for key in config_keys(type(self))}


def config_keys(cls: type) -> list[str]:
    """The keys of a config class: its own in the order it declares them, then those it inherits."""
    names = [f.name for f in dataclasses.fields(cls)]
    own = [key for key in inspect.get_annotations(cls) if key in names]
    return own + [key for key in names if key not in own]


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run depends on; saved resolved as ``config.yaml`` in the run directory.

    The defaults train LeNet5 on MNIST with the rank-adaptive BUG integrator and
    Adam (3e-3, cosine schedule, batch 128), a recipe that reaches ~97 % test
    accuracy at ~90 % compression after one epoch; ``configs/`` holds the papers'
    settings (e.g. SGD lr 0.05 for the lottery-ticket table).
    """

    # data and model
    dataset: str = field(
        default="mnist",
        metadata={
            "help": "mnist | fashion-mnist | cifar10 | digits; text corpora for the gpt models: hamlet | "
            "convention-speeches | rotten-tomatoes | debates"
        },
    )
    data_root: str | None = field(
        default=None, metadata={"help": "dataset directory, or a text corpus's file (default: packaged data)"}
    )
    model: str = field(
        default="lenet5",
        metadata={
            "help": "mlp | lenet5 | vgg11 | vgg16 | vgg_small | resnet20; language models: gpt-tiny | gpt-small | "
            "gpt-medium | gpt-large"
        },
    )
    context: int | None = field(
        default=None, metadata={"help": "language models: tokens per window (default: the model's context)"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "language models: share of the corpus held out for validation, by document"}
    )
    hidden: list[int] | None = field(
        default=None, metadata={"help": "model=mlp: widths of the hidden layers (default 500, 500, 500, 500)"}
    )
    # low-rank conversion
    rank: int | float = field(
        default=2,
        metadata={
            "help": "starting rank: an int, or a fraction in (0, 1] of each layer's full rank; not a ceiling (max_rank "
            "is): the gradient rank rule grows each layer to what the task needs"
        },
    )
    max_rank: int | None = field(default=None, metadata={"help": "largest rank a layer may reach"})
    min_rank: int = field(default=1, metadata={"help": "smallest rank a layer may reach"})
    exclude: list[str] = field(default_factory=lambda: ["head"], metadata={"help": "layers left dense"})
    conv: str = field(default="matrix", metadata={"help": "format of the convolutions: matrix | tucker"})
    tucker_modes: list[int] | None = field(
        default=None, metadata={"help": "conv=tucker: kernel modes whose rank adapts (0 out, 1 in, 2, 3 spatial)"}
    )
    dense: bool = field(default=False, metadata={"help": "train the dense baseline instead (no conversion)"})
    # integrator and optimizer
    integrator: str = field(default="bug", metadata={"help": "bug | fixed | parallel | abc"})
    optimizer: str = field(default="adam", metadata={"help": "sgd | adam | adamw | geo-heavyball | geo-adam"})
    lr: float = field(default=0.003, metadata={"help": "learning rate"})
    momentum: float | None = field(
        default=None, metadata={"help": "momentum of sgd (default 0) or geo-heavyball (default 0.9)"}
    )
    second_moment: str = second_moment_key()
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    tau: float = field(default=0.11, metadata={"help": "truncation tolerance (relative for gradient and relative)"})
    tau_mode: str = field(
        default="gradient",
        metadata={"help": "rank rule: gradient (ranks grow and shrink) | relative | absolute (docs/algorithms.md §1)"},
    )
    tau_grad: float | None = field(
        default=None, metadata={"help": "gradient rule: tolerance on the gradient trend (default: tau)"}
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "start of the low-rank layers (dlrt.convert's init): scaled | svd; default scaled for sgd and "
            "geo-heavyball (steps proportional to the gradient), svd for the Adam family"
        },
    )
    coefficient_steps: int = field(default=1, metadata={"help": "S-steps per augmentation"})
    robust_beta: float = field(
        default=0.0, metadata={"help": "β of the condition-number regularizer: β·Σℛ(S) added to the loss (0: off)"}
    )
    schedule: str = field(default="cosine", metadata={"help": "constant | cosine | step (per step)"})
    step_size: int = field(default=10, metadata={"help": "epochs between decays (schedule=step)"})
    gamma: float = field(default=0.1, metadata={"help": "decay factor (schedule=step)"})
    warmup: float = field(default=0.0, metadata={"help": "share of the steps with a linear lr warm-up from 0"})
    # loop
    epochs: int = field(default=3, metadata={"help": "training epochs"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps, the schedule's length (none: all epochs)"}
    )
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=1000, metadata={"help": "evaluation batch size"})
    augment: bool = field(default=False, metadata={"help": "light augmentation (CIFAR: crop + flip)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N train/test samples"})
    eval_every: int | None = field(
        default=None,
        metadata={"help": "steps between evaluations of the test (validation) set in steps.csv (none: epoch ends)"},
    )
    samples: int = field(
        default=3, metadata={"help": "language models: texts generated into samples.txt at the end (0: none)"}
    )
    sample_tokens: int = field(default=200, metadata={"help": "language models: tokens per generated sample"})
    # data parallelism (torchrun; docs/distributed.md)
    dist_timeout: float = field(
        default=300.0, metadata={"help": "seconds a process waits for its peers before it stops with an error"}
    )
    check_every: int = field(
        default=100, metadata={"help": "steps between checks that all processes hold the same ranks and factors"}
    )
    # outputs (and RunConfig's)
    tensorboard: bool = field(default=True, metadata={"help": "log to TensorBoard when installed"})
    log_every: int = field(default=10, metadata={"help": "steps between rows of steps.csv (ranks of every layer)"})
    checkpoint_every: int | None = checkpoint_every_key()
    checkpoint_minutes: float | None = checkpoint_minutes_key()

    def __post_init__(self) -> None:
        super().__post_init__()
        from .driver import check_checkpoint_interval

        check_checkpoint_interval(self.checkpoint_every, self.checkpoint_minutes)
        positive = ("min_rank", "epochs", "batch_size", "eval_batch_size", "coefficient_steps", "step_size")
        for key in (*positive, "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "tau", "weight_decay", "robust_beta"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        check_rank(self.rank, self.max_rank, self.min_rank)
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.check_every < 0:
            raise ValueError(f"check_every must be >= 0 (0: never), got {self.check_every}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or none), got {self.limit}")
        for key in ("eval_every", "context", "max_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or none), got {getattr(self, key)}")
        if self.samples < 0 or self.sample_tokens < 1:
            raise ValueError(f"samples must be >= 0 and sample_tokens >= 1, got {self.samples}, {self.sample_tokens}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        _check_choice("model", self.model.lower(), _models())
        from .lm import check_task

        check_task(self)  # the dataset fits the model: an image dataset a classifier, a text corpus a GPT
        _check_choice("integrator", self.integrator, _integrators())
        _check_second_moment(self.second_moment, self.optimizer)
        if self.dense and self.second_moment != "rank":
            raise ValueError(
                f"second_moment={self.second_moment!r} sets geo-adam's step on low-rank layers; dense=true trains "
                "with torch.optim.Adam, which has none: leave second_moment unset"
            )
        from ..conversion import INITS
        from ..linalg import check_tau

        check_tau(self.tau, self.tau_mode)
        if self.tau_grad is not None:
            check_tau(self.tau_grad, "relative", "tau_grad")
        if self.init is None:
            # A step proportional to the gradient (SGD, heavy ball) moves a layer only as far as the signal
            # reaching it: it needs the dense scale. Adam's normalised steps do not, and learn faster from
            # the plain truncated SVD, whose singular values are the dense layer's (docs/algorithms.md §1.3).
            self.init = "scaled" if self.optimizer in ("sgd", "geo-heavyball") else "svd"
        _check_choice("init", self.init, INITS)
        _check_choice("conv", self.conv, ("matrix", "tucker"))
        if self.hidden is not None:
            if self.model.lower() != "mlp":
                raise ValueError(f"hidden applies to model=mlp, not model={self.model!r}")
            bad = not isinstance(self.hidden, (list, tuple)) or not self.hidden
            if bad or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
                raise ValueError(f"hidden must be a non-empty list of positive ints, got {self.hidden!r}")
            self.hidden = list(self.hidden)
        if self.tucker_modes is not None:
            if self.conv != "tucker":
                raise ValueError(f"tucker_modes applies to conv=tucker, not conv={self.conv!r}")
            from ..layers.tucker import check_tucker_modes

            self.tucker_modes = list(check_tucker_modes(self.tucker_modes))
        if self.robust_beta and self.dense:
            raise ValueError("robust_beta regularizes low-rank cores; a dense run (dense=true) has none: set it to 0")
        if self.conv == "tucker" and not self.dense:
            _check_tucker_training(self.integrator, self.optimizer)
        _check_choice("optimizer", self.optimizer, _rules())
        if self.momentum and self.optimizer not in ("sgd", "geo-heavyball"):
            raise ValueError(f"momentum applies to optimizer sgd or geo-heavyball, not {self.optimizer!r}")
        _check_choice("schedule", self.schedule, ("constant", "cosine", "step"))
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")

    @property
    def run_stem(self) -> str:
        return f"{self.model}-{self.dataset}-" + ("dense" if self.dense else f"{self.integrator}-tau{self.tau:g}")


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run (``dlrt finetune``); saved resolved as ``config.yaml`` in the run directory.

    The defaults fine-tune the pretrained MiniLM-L6 encoder on the Rotten Tomatoes
    snippets (binary sentiment, split by movie) with GeoLoRA adapters.
    ``method`` picks GeoLoRA, full fine-tuning, or PEFT's LoRA / AdaLoRA (needs
    ``peft``) on the same data, model and loop.
    """

    # task
    model: str = field(default="minilm", metadata={"help": "minilm | mnist-cnn (pretrained) | tiny-bert (tests)"})
    dataset: str = field(
        default="rotten-tomatoes",
        metadata={
            "help": "rotten-tomatoes (sentiment) | convention-party (party of a convention-speech paragraph): "
            "text models; fashion-mnist | mnist: mnist-cnn"
        },
    )
    data_path: str | None = field(default=None, metadata={"help": "dataset file/directory (default: packaged)"})
    test_fraction: float = field(
        default=0.2,
        metadata={
            "help": "share of the examples held out, in whole movies (rotten-tomatoes) or speakers (convention-party)"
        },
    )
    max_length: int = field(default=64, metadata={"help": "tokens per snippet or paragraph (text tasks)"})
    pooling: str = field(default="mean", metadata={"help": "mean | cls: what the text head reads"})
    # adapters
    method: str = field(default="geolora", metadata={"help": "geolora | lora | adalora | full"})
    r: int = field(default=8, metadata={"help": "initial adapter rank (LoRA: the rank)"})
    max_rank: int | None = field(default=None, metadata={"help": "largest adapter rank (geolora)"})
    min_rank: int = field(default=1, metadata={"help": "smallest adapter rank (geolora)"})
    tau: float | None = field(
        default=None, metadata={"help": "relative truncation tolerance (geolora; default: GeoLoRAConfig's)"}
    )
    budget: int | None = field(
        default=None,
        metadata={
            "help": "total rank of all adapters, or their parameters with budget_unit=params "
            "(geolora; default: r per adapter)"
        },
    )
    budget_unit: str | None = field(
        default=None,
        metadata={
            "help": "rank | params: what budget counts (geolora; default: params, what LoRA of rank r stores, "
            "without a budget; rank for a budget given)"
        },
    )
    budget_order: str = field(
        default="sigma",
        metadata={
            "help": "sigma | energy: the budget keeps the largest singular values first, or the largest σ² per "
            "unit of budget (geolora)"
        },
    )
    integrator: str = field(default="parallel", metadata={"help": "parallel | bug | abc (geolora)"})
    adapter_init: str | None = field(
        default=None,
        metadata={"help": "gradient | random | lora: how the adapters start (geolora; default: GeoLoRAConfig's init)"},
    )
    coefficient_steps: int | None = field(
        default=None, metadata={"help": "S-steps between truncations (geolora; default: GeoLoRAConfig's)"}
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "scaling = lora_alpha / r (default: GeoLoRAConfig's for geolora, 16 for lora/adalora)"},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "modules to adapt (default: per model)"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full (default: the model's new head)"}
    )
    init_r: int = field(default=12, metadata={"help": "AdaLoRA initial rank"})
    target_r: int = field(default=8, metadata={"help": "AdaLoRA target average rank"})
    # optimizer and loop
    optimizer: str | None = field(
        default=None,
        metadata={
            "help": "adamw | adam | sgd | geo-adam | geo-heavyball (the last two: geolora); "
            "default geo-adam for geolora, adamw otherwise"
        },
    )
    lr: float | None = field(
        default=None, metadata={"help": "learning rate (default: GeoLoRA's make_optimizer default, 1e-3 otherwise)"}
    )
    modules_to_save_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "modules_to_save (the new head) learn at lr × this "
            "(default: GeoLoRA's make_optimizer default for geolora, 1 otherwise)"
        },
    )
    second_moment: str = second_moment_key()
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (never on GeoLoRA's bases)"})
    schedule: str = field(default="linear", metadata={"help": "constant | linear | cosine (per step)"})
    warmup: float = field(default=0.0, metadata={"help": "share of the steps with a linear lr warm-up from 0"})
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "clip gradients to this global norm (geolora: the tangent-space norm)"}
    )
    epochs: int = field(default=1, metadata={"help": "training epochs"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    batch_size: int = field(default=16, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=256, metadata={"help": "evaluation batch size"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N train/test examples"})
    # outputs (and RunConfig's)
    log_every: int = field(default=10, metadata={"help": "steps between rows of steps.csv (ranks of every adapter)"})
    checkpoint_every: int | None = checkpoint_every_key()
    checkpoint_minutes: float | None = checkpoint_minutes_key()

    def __post_init__(self) -> None:
        super().__post_init__()
        from .driver import check_checkpoint_interval

        check_checkpoint_interval(self.checkpoint_every, self.checkpoint_minutes)
        self._resolve_method_defaults()
        positive = ("r", "min_rank", "epochs", "batch_size", "eval_batch_size", "coefficient_steps", "max_length")
        for key in (*positive, "init_r", "target_r", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.modules_to_save_lr_ratio > 0:
            raise ValueError(f"modules_to_save_lr_ratio must be > 0, got {self.modules_to_save_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or none), got {self.max_grad_norm}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout is a probability in [0, 1), got {self.lora_dropout}")
        for key in ("max_steps", "limit", "budget", "max_rank"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or none), got {getattr(self, key)}")
        for key in ("lr", "tau", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} exceeds init_r={self.init_r}")
        from ..models.pretrained import PRETRAINED

        _check_choice("model", self.model, tuple(PRETRAINED))
        _check_choice("dataset", self.dataset, tuple(dict.fromkeys(d for p in PRETRAINED.values() for d in p.datasets)))
        if self.dataset not in PRETRAINED[self.model].datasets:
            takes = " or ".join(PRETRAINED[self.model].datasets)
            raise ValueError(f"model={self.model!r} does not fit dataset={self.dataset!r}: it takes {takes}")
        _check_choice("method", self.method, ("geolora", "lora", "adalora", "full"))
        _check_choice("pooling", self.pooling, ("mean", "cls"))
        _check_choice("budget_unit", self.budget_unit, ("rank", "params"))
        _check_choice("budget_order", self.budget_order, ("sigma", "energy"))
        _check_choice("integrator", self.integrator, _integrators(adaptive=True))  # GeoLoRA adapts the rank
        from ..layers.adapter import ADAPTER_INITS

        if self.method == "geolora":
            _check_choice("adapter_init", self.adapter_init, ADAPTER_INITS)
        elif self.adapter_init is not None:
            raise ValueError(
                f"adapter_init={self.adapter_init!r} sets how GeoLoRA's adapters start; method={self.method!r} "
                "starts its own way: leave adapter_init unset"
            )
        _check_choice("optimizer", self.optimizer, _rules())
        flat = ("adamw", "adam", "sgd")
        if self.method != "geolora" and self.optimizer not in flat:
            raise ValueError(
                f"optimizer={self.optimizer!r} trains GeoLoRA's low-rank adapters only; "
                f"method={self.method!r} takes one of {', '.join(flat)}"
            )
        _check_second_moment(self.second_moment, self.optimizer)
        _check_choice("schedule", self.schedule, ("constant", "linear", "cosine"))

    def _resolve_method_defaults(self) -> None:
        """Fill the method-dependent defaults (None): GeoLoRA's come from GeoLoRAConfig and make_optimizer."""
        from ..peft import GeoLoRAConfig
        from ..peft.model import LR, MODULES_TO_SAVE_LR_RATIO

        geo, defaults = self.method == "geolora", GeoLoRAConfig()
        if self.lr is None:
            self.lr = LR if geo else 1e-3
        if self.coefficient_steps is None:
            self.coefficient_steps = defaults.coefficient_steps
        if self.lora_alpha is None:
            self.lora_alpha = defaults.lora_alpha if geo else 16.0
        if self.tau is None:
            self.tau = defaults.tau if geo else 0.1
        if self.adapter_init is None and geo:
            self.adapter_init = defaults.init
        if self.optimizer is None:
            self.optimizer = "geo-adam" if geo else "adamw"
        if self.modules_to_save_lr_ratio is None:
            self.modules_to_save_lr_ratio = MODULES_TO_SAVE_LR_RATIO if geo else 1.0
        if self.budget_unit is None:
            self.budget_unit = "params" if geo and self.budget is None else "rank"

    @property
    def run_stem(self) -> str:
        return f"{self.model}-{self.dataset}-{self.method}"


@dataclass
class FederatedConfig(RunConfig):
    """A federated run (``dlrt federated``); saved resolved as ``config.yaml`` in the run directory.

    The defaults train the lottery-ticket MLP on MNIST with FeDLRT (full variance
    correction) over 4 IID clients, in process. The data, model and low-rank keys
    mean what they mean for ``dlrt train``; the clients step with plain SGD at ``lr``.
    """

    # federation
    method: str = field(default="fedlrt", metadata={"help": "fedlrt | fedavg | fedlin"})
    correction: str = field(default="full", metadata={"help": "FeDLRT variance correction: full | simplified | none"})
    engine: str = field(default="inprocess", metadata={"help": "inprocess | flower (Flower simulation runtime)"})
    clients: int = field(default=4, metadata={"help": "number of clients"})
    rounds: int = field(default=40, metadata={"help": "communication rounds"})
    local_steps: int = field(default=20, metadata={"help": "client SGD steps per round"})
    grad_batches: int | None = field(
        default=4, metadata={"help": "batches of the round-start gradients (none: all the client's samples)"}
    )
    participation: float = field(default=1.0, metadata={"help": "share of the clients sampled each round"})
    min_clients: int = field(default=1, metadata={"help": "fewest well-formed replies a stage needs"})
    dirichlet_alpha: float | None = field(default=None, metadata={"help": "non-IID label split (none: IID)"})
    timeout: float = field(default=600.0, metadata={"help": "seconds a stage waits for replies (engine=flower)"})
    eval_every: int = field(default=1, metadata={"help": "rounds between evaluations of the global model"})
    # data and model (as dlrt train)
    dataset: str = field(default="mnist", metadata={"help": "mnist | fashion-mnist | cifar10 | digits"})
    data_root: str | None = field(default=None, metadata={"help": "dataset directory (default: packaged data)"})
    model: str = field(default="mlp", metadata={"help": "mlp | lenet5 | vgg11 | vgg16 | vgg_small | resnet20"})
    rank: int | float = field(default=20, metadata={"help": "starting rank (int, or a fraction of the full rank)"})
    max_rank: int | None = field(default=None, metadata={"help": "largest rank a layer may reach"})
    min_rank: int = field(default=1, metadata={"help": "smallest rank a layer may reach"})
    exclude: list[str] = field(default_factory=lambda: ["head"], metadata={"help": "layers left dense"})
    tau: float = field(default=0.1, metadata={"help": "truncation tolerance of the server"})
    tau_mode: str = field(
        default="gradient", metadata={"help": "the server's rank rule: gradient | relative | absolute"}
    )
    init: str = field(default="scaled", metadata={"help": "start of the low-rank layers: scaled (from scratch) | svd"})
    optimizer: str = field(default="sgd", metadata={"help": "client optimizer: sgd (the corrected SGD step)"})
    lr: float = field(default=0.1, metadata={"help": "client learning rate"})
    batch_size: int = field(default=64, metadata={"help": "client batch size"})
    eval_batch_size: int = field(default=1000, metadata={"help": "evaluation batch size"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N train/test samples"})
    # outputs (and RunConfig's)
    progress: bool = field(default=True, metadata={"help": "print a line per round"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("clients", "rounds", "local_steps", "min_clients", "eval_every", "min_rank", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for key in ("grad_batches", "limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (or none), got {getattr(self, key)}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation is a share of the clients in (0, 1], got {self.participation}")
        if self.dirichlet_alpha is not None and not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0 (or none for IID), got {self.dirichlet_alpha}")
        for key in ("lr", "tau"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        check_rank(self.rank, self.max_rank, self.min_rank)
        _check_choice("model", self.model.lower(), _models())
        _refuse_text("dlrt federated", self.model, self.dataset)
        from ..data import dataset_info

        dataset_info(self.dataset)
        _check_choice("method", self.method, ("fedlrt", "fedavg", "fedlin"))
        _check_choice("correction", self.correction, ("full", "simplified", "none"))
        _check_choice("engine", self.engine, ("inprocess", "flower"))
        _check_choice("optimizer", self.optimizer, ("sgd",))
        from ..conversion import INITS
        from ..linalg import check_tau

        check_tau(self.tau, self.tau_mode)
        _check_choice("init", self.init, INITS)
        sampled = self.sampled_clients
        if self.min_clients > sampled:
            raise ValueError(
                f"min_clients={self.min_clients} exceeds the {sampled} clients sampled per round "
                f"(participation={self.participation} of clients={self.clients}): lower min_clients"
            )

    @property
    def sampled_clients(self) -> int:
        """Clients sampled per round: ``participation × clients``, rounded, at least one."""
        return max(1, min(self.clients, round(self.participation * self.clients)))

    @property
    def run_stem(self) -> str:
        return f"{self.model}-{self.dataset}-{self.method}"


def check_rank(rank: int | float, max_rank: int | None = None, min_rank: int = 1) -> None:
    """A starting ``rank`` is an int >= 1 or a fraction in (0, 1]; ``max_rank`` is at least ``min_rank``."""
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
    if rank <= 0:
        raise ValueError(f"rank must be >= 1 (or a fraction in (0, 1]), got {rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ValueError(f"max_rank={max_rank} is below min_rank={min_rank}")


def _refuse_text(command: str, model: str, dataset: str) -> None:
    """A clear ``ValueError`` when a command that trains image classifiers is given a language model or a
    text corpus (``dlrt train`` trains those)."""
    from ..data import CORPORA
    from ..models import model_kind

    if model_kind(model) == "language" or str(dataset).strip().lower() in CORPORA:
        what = f"model={model!r} is a language model" if model_kind(model) == "language" else ""
        if str(dataset).strip().lower() in CORPORA:
            what = (what + " and " if what else "") + f"dataset={dataset!r} is a text corpus"
        raise ValueError(
            f"{command} trains image classifiers; {what}: train language models with "
            "`dlrt train model=gpt-tiny dataset=hamlet`"
        )


def _models() -> tuple[str, ...]:
    from ..models import list_models

    return tuple(list_models())


def _integrators(adaptive: bool = False) -> tuple[str, ...]:
    from ..integrators import INTEGRATORS

    return tuple(name for name, cls in INTEGRATORS.items() if cls.adaptive or not adaptive)


def _rules() -> tuple[str, ...]:
    from ..optim import RULES

    return tuple(RULES)


def _check_finite(cfg: Any) -> None:
    """Every number of ``cfg`` is finite: ``nan`` and ``inf`` pass ``<``/``>`` checks, so refuse them first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def _check_second_moment(value: str, optimizer: str) -> None:
    from ..optim.geometric import GeoAdam

    _check_choice("second_moment", value, GeoAdam.SECOND_MOMENTS)
    if value != "rank" and optimizer != "geo-adam":
        raise ValueError(f"second_moment={value!r} applies to optimizer=geo-adam only, not {optimizer!r}")


def _check_tucker_training(integrator: str, optimizer: str) -> None:
    """conv=tucker needs an integrator and inner optimizer that drive Tucker layers (see DLRTOptimizer)."""
    from ..integrators import INTEGRATORS
    from ..optim import RULES

    if not INTEGRATORS[integrator].tucker or RULES[optimizer].geometric:
        raise ValueError(
            f"conv=tucker trains with integrator bug, parallel or fixed and optimizer sgd, adam or adamw; "
            f"got integrator={integrator!r}, optimizer={optimizer!r}"
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the field's type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if inner == [int, float]:
            as_number = _coerce(key, value, float)
            return int(as_number) if as_number.is_integer() and "." not in str(value) else as_number
        return _coerce(key, value, inner[0])
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):  # "a,b" or YAML's "[a, b]"
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if hint is str:
        return str(value)
    return value


def _coerce_all(cfg: Any) -> None:
    for key, hint in _field_types(type(cfg)).items():
        setattr(cfg, key, _coerce(key, getattr(cfg, key), hint))


def _check_keys(keys: typing.Iterable[str], where: str, cls: type) -> None:
    valid = config_keys(cls)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {', '.join(valid)}")


def apply_overrides(values: dict[str, Any], overrides: typing.Sequence[str], cls: type = TrainConfig) -> dict[str, Any]:
    """Apply ``key=value`` strings on top of ``values`` (keys validated against the dataclass ``cls``)."""
    out = dict(values)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        _check_keys([key.strip()], "the overrides", cls)
        out[key.strip()] = value.strip()
    return out


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: typing.Sequence[str] = (), cls: type = TrainConfig
) -> Any:
    """A config (``cls``: :class:`TrainConfig`, or another config dataclass of this module) from a YAML
    file (optional) and ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of key: value")
        _check_keys(loaded, str(path), cls)
        values.update(loaded)
    values = apply_overrides(values, overrides, cls)
    return cls(**values)
