"""``dlrt finetune`` (and ``benchmarks/finetune_vs_peft.py``): a recipe for the training driver.

Four methods on the same model, split and seed: GeoLoRA (:mod:`dlrt.peft`),
full fine-tuning, and PEFT's LoRA and AdaLoRA (``peft`` imported only for
those); the loop is :class:`~dlrt.training.driver.Driver`. A run directory
holds ``config.yaml``, ``metrics.csv`` (per epoch: losses, accuracies, the
rank of every adapted module, adapter and trainable parameter counts,
seconds), ``steps.csv`` (every ``log_every`` steps: loss, learning rate,
seconds, the rank of every adapted module), ``summary.json``, the checkpoint
(``checkpoint.safetensors``: model, optimizer and position, from which
``dlrt finetune --resume`` continues), the adapter (``adapter/``, written by
``save_pretrained``; not for full fine-tuning) and PNG plots.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.pretrained import PRETRAINED, Pretrained
from .config import FinetuneConfig
from .driver import CONFIG, Task, TaskState, interrupted_line, step_closure
from .driver import evaluate as driver_evaluate
from .records import STEPS
from .runs import setup, start_run
from .schedule import lr_factor

__all__ = ["PRETRAINED", "FinetuneResult", "Pretrained", "Task", "build_task", "finetune"]

ADAPTER_DIR = "adapter"
__all__ += ["ADAPTER_DIR", "STEPS", "step_closure"]


FINETUNE_METRIC_FIELDS = [
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "total_rank",
    "ranks",
    "adapter_params",
    "trainable_params",
    "lr",
    "seconds",
]


@dataclass
class FinetuneResult:
    run_dir: Path
    status: str  # "completed" | "interrupted" | "diverged"
    summary: dict[str, Any]
    step_seconds: list[float] = field(default_factory=list)


class HashTokenizer:
    """A tokenizer for the tiny test BERT: words hashed into ``vocab_size − 1`` ids (0 pads)."""

    pad_token_id = 0

    def __init__(self, vocab_size: int = 100) -> None:
        self.vocab_size = vocab_size

    def _ids(self, text: str, max_length: int) -> list[int]:
        import zlib

        words = text.lower().split()[:max_length]
        return [1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in words] or [1]

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 64, **_: Any) -> dict[str, Any]:
        ids = [self._ids(t, max_length) for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


# ------------------------------------------------------------------ building
def build_task(cfg: FinetuneConfig) -> Task:
    """The pretrained model and the train/test data of ``cfg`` (``limit`` applied)."""
    from ..data import mnist_cnn_dataset
    from ..models import pretrained

    if PRETRAINED[cfg.model].kind == "text":
        from ..data.text import TextClassificationDataset, load_convention_party, load_rotten_tomatoes

        if cfg.model == "minilm":
            model, tokenizer = pretrained.load_minilm(num_labels=2, pooling=cfg.pooling)
        else:
            model, tokenizer = pretrained.tiny_bert(num_labels=2, seed=cfg.seed, pooling=cfg.pooling), HashTokenizer()
        load = {"rotten-tomatoes": load_rotten_tomatoes, "convention-party": load_convention_party}[cfg.dataset]
        train, test = load(cfg.data_path, test_fraction=cfg.test_fraction, seed=cfg.seed)
        if cfg.limit is not None:
            train, test = train[: cfg.limit], test[: cfg.limit]
        train_set = TextClassificationDataset(train, tokenizer, max_length=cfg.max_length)
        test_set = TextClassificationDataset(test, tokenizer, max_length=cfg.max_length)

        def forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
            out = model(**batch)
            return out.logits, batch["labels"], out.loss

        return Task(model, train_set, test_set, train_set.collate, forward)

    model = pretrained.load_pretrained_mnist_cnn()
    train_set = mnist_cnn_dataset(cfg.dataset, "train", root=cfg.data_path)
    test_set = mnist_cnn_dataset(cfg.dataset, "test", root=cfg.data_path)
    if cfg.limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(cfg.limit, len(test_set))))

    def forward_image(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        x, y = batch
        return model(x), y, None

    return Task(model, train_set, test_set, None, forward_image)


def _modules(cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    known = PRETRAINED[cfg.model]
    return (
        cfg.target_modules if cfg.target_modules is not None else list(known.targets),
        cfg.modules_to_save if cfg.modules_to_save is not None else list(known.save),
    )


def _torch_optimizer(cfg: FinetuneConfig, model: nn.Module, save: list[str]) -> torch.optim.Optimizer:
    """The torch optimizer of a non-GeoLoRA method; parameters of the ``save`` modules learn at
    ``lr × modules_to_save_lr_ratio``."""
    from ..selection import excluded

    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            in_saved = "." in name and excluded(name.rsplit(".", 1)[0], save)
            (head if in_saved and cfg.modules_to_save_lr_ratio != 1.0 else rest).append(p)
    groups = [{"params": rest}] + ([{"params": head, "lr": cfg.lr * cfg.modules_to_save_lr_ratio}] if head else [])
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def apply_method(
    cfg: FinetuneConfig, model: nn.Module, total_steps: int
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    """``(model, optimizer, after_step)`` for ``cfg.method``; ``after_step(step)`` runs after every step.

    For AdaLoRA, ``after_step.state`` is the :class:`~dlrt.training.driver.TaskState` of
    PEFT's rank allocator (its importance scores and the rank pattern live outside the
    model's state dict), which a checkpoint must hold for an exact resume.
    """
    targets, save = _modules(cfg)
    if cfg.method == "geolora":
        from ..peft import GeoLoRAConfig, get_geolora_model

        config = GeoLoRAConfig(
            r=cfg.r,
            max_rank=cfg.max_rank,
            min_rank=cfg.min_rank,
            tau=cfg.tau,
            budget=cfg.budget,
            budget_unit=cfg.budget_unit,
            budget_order=cfg.budget_order,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=save,
            coefficient_steps=cfg.coefficient_steps,
            integrator=cfg.integrator,
            init=cfg.adapter_init,
        )
        geo = get_geolora_model(model, config)
        opt = geo.make_optimizer(
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            modules_to_save_lr_ratio=cfg.modules_to_save_lr_ratio,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            **({"second_moment": cfg.second_moment} if cfg.optimizer == "geo-adam" else {}),
        )
        return geo, opt, lambda step: None
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, _torch_optimizer(cfg, model, save), lambda step: None
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"method={cfg.method!r} needs PEFT: pip install peft ({err})") from err
    common = {
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "modules_to_save": save,
    }
    if cfg.method == "lora":
        pmodel = peft.get_peft_model(model, peft.LoraConfig(r=cfg.r, **common))
        return pmodel, _torch_optimizer(cfg, pmodel, save), lambda step: None
    # AdaLoRA: budget warm-up for the first 10 % of steps, final budget for the last 20 %.
    tinit, tfinal = total_steps // 10, total_steps // 5
    if total_steps - tinit - tfinal < 1:
        raise ValueError(f"AdaLoRA needs more steps than {total_steps} to schedule its budget")
    config = peft.AdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, total_steps // 50),
        total_step=total_steps,
        **common,
    )
    pmodel = peft.get_peft_model(model, config)
    opt = _torch_optimizer(cfg, pmodel, save)

    def allocate(step: int) -> None:
        pmodel.base_model.update_and_allocate(step)

    allocate.state = _adalora_state(pmodel)  # type: ignore[attr-defined]
    return pmodel, opt, allocate


def _adalora_state(pmodel: nn.Module) -> TaskState:
    """PEFT AdaLoRA's rank-allocator state (importance scores, their averages, the rank pattern) for checkpoints."""
    allocator = pmodel.base_model.rankallocator
    adapter = pmodel.base_model.trainable_adapter_name
    scores = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def get() -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"{kind}/{name}": t for kind in scores for name, t in getattr(allocator, kind).items()}
        return tensors, {"rank_pattern": pmodel.peft_config[adapter].rank_pattern}

    def put(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        device = next(pmodel.parameters()).device
        for kind in scores:
            getattr(allocator, kind).clear()
        for key, t in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = t.to(device)
        pmodel.peft_config[adapter].rank_pattern = info.get("rank_pattern")

    return TaskState(get, put)


def build_scheduler(cfg: FinetuneConfig, opt: torch.optim.Optimizer, total_steps: int) -> Any:
    """Per-step schedule: ``cfg.warmup`` of the steps rise linearly from 0, the rest follow ``cfg.schedule``."""
    warm = int(cfg.warmup * total_steps)
    if cfg.schedule == "constant" and warm == 0:
        return None
    factor = functools.partial(lr_factor, total=total_steps, schedule=cfg.schedule, warmup_steps=warm)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- accounting
def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every adapted module: GeoLoRA's current rank, LoRA's r, AdaLoRA's unmasked rank."""
    from ..peft import GeoLoRAModel

    if isinstance(model, GeoLoRAModel):
        return model.ranks()
    ranks = {}
    for name, module in model.named_modules():
        E = getattr(module, "lora_E", None)
        A = getattr(module, "lora_A", None)
        if isinstance(E, nn.ParameterDict) and E:
            ranks[name] = int((next(iter(E.values())) != 0).sum())
        elif isinstance(A, nn.ModuleDict) and A:
            ranks[name] = next(iter(A.values())).weight.shape[0]
    return ranks


def adapter_parameters(model: nn.Module) -> int:
    """Parameters an adapter needs at its current ranks (0 for full fine-tuning).

    GeoLoRA: ``(n + m + r)·r`` per layer (U, V, S). LoRA: ``(n + m)·r``. AdaLoRA:
    ``(n + m + 1)·r`` with ``r`` the unmasked rank (what a pruned export keeps;
    during training it stores ``init_r`` for every layer).
    """
    from ..peft import GeoLoRAModel

    if isinstance(model, GeoLoRAModel):
        return model.num_adapter_parameters()
    total = 0
    for _, module in model.named_modules():
        E = getattr(module, "lora_E", None)
        A = getattr(module, "lora_A", None)
        B = getattr(module, "lora_B", None)
        if isinstance(E, nn.ParameterDict) and E:
            key = next(iter(E))
            r = int((E[key] != 0).sum())
            total += (A[key].shape[1] + B[key].shape[0] + 1) * r
        elif isinstance(A, nn.ModuleDict) and A:
            key = next(iter(A))
            total += A[key].weight.numel() + B[key].weight.numel()
    return total


def training_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients of trainable parameters and optimizer state (activations excluded)."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    total += sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


def evaluate(task: Task, model: nn.Module, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` on ``task.test_set``."""
    return driver_evaluate(
        model, task.test_set, batch_size, device, forward=lambda m, b: task.forward(m, b)[:2], collate=task.collate
    )


def _short(name: str) -> str:
    # "base_model.model.bert.encoder.layer.3.attention.self.query" -> "layer.3.attention.self.query"
    parts = name.split(".")
    return ".".join(parts[parts.index("layer") :]) if "layer" in parts else name.removeprefix("base_model.model.")


# ------------------------------------------------------------------ the recipe
def _describe(cfg: FinetuneConfig, row: dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']}/{cfg.epochs} ({cfg.method}): train loss {row['train_loss']:.4f}, "
        f"test {100 * row['test_acc']:.2f}%, total rank {row['total_rank']}, "
        f"adapter params {row['adapter_params']:,d}, {row['seconds']:.1f}s"
    )


def finetune(
    cfg: FinetuneConfig | None = None,
    task: Task | None = None,
    *,
    resume_dir: str | os.PathLike[str] | None = None,
) -> FinetuneResult:
    """Fine-tune as ``cfg`` says in a new run directory, or continue the run in ``resume_dir``.

    ``task`` (from :func:`build_task`) may be passed to reuse loaded data; its
    model is modified. The run directory is created only once the task, the
    adapters and the optimizer are built. The run checkpoints as ``dlrt train``
    does (``checkpoint_every``, ``checkpoint_minutes``, epoch ends); Ctrl-C, SIGTERM
    or SIGUSR1 stops it at the next step with status ``"interrupted"`` after
    writing the checkpoint, the summary and the adapter, and ``resume_dir``
    continues it exactly; a non-finite loss stops with ``"diverged"``.
    """
    from ..optimizer import DLRTOptimizer
    from .config import load_config

    if resume_dir is not None:
        if cfg is not None:
            raise ValueError("resume_dir= continues a run with its saved config; do not pass cfg")
        saved = Path(resume_dir) / CONFIG
        if not saved.is_file():
            raise FileNotFoundError(f"{resume_dir} is not a run directory (no {CONFIG})")
        cfg = load_config(saved, cls=FinetuneConfig)
    cfg = cfg or FinetuneConfig()
    device = setup(cfg)
    torch.manual_seed(cfg.seed)
    task = task or build_task(cfg)
    steps_per_epoch = math.ceil(len(task.train_set) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    torch.manual_seed(cfg.seed)  # adapters' initial bases
    model, opt, after_step = apply_method(cfg, task.model.to(device), total_steps)
    model.to(device).train()
    scheduler = build_scheduler(cfg, opt, total_steps)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in trainable_params)
    # torch optimizers clip in the closure; a DLRTOptimizer clips by the tangent-space norm itself
    torch_clip = cfg.max_grad_norm is not None and not isinstance(opt, DLRTOptimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def ranks(m: nn.Module) -> dict[str, int]:
        return {_short(k): v for k, v in adapter_ranks(m).items()}

    run_dir, driver = start_run(
        cfg,
        Task(model, task.train_set, task.test_set, task.collate, task.forward),
        opt,
        device=device,
        metric_fields=FINETUNE_METRIC_FIELDS,
        scheduler=scheduler,
        clip=(trainable_params, cfg.max_grad_norm) if torch_clip else None,
        ranks=ranks,
        extra_metrics=lambda m: {"adapter_params": adapter_parameters(m), "trainable_params": trainable},
        step_hooks=[after_step],
        describe=functools.partial(_describe, cfg),
        checkpoint=True,
        task_state=getattr(after_step, "state", None),
        checkpoint_frozen=False,  # the pretrained weights come from the model's source on resume
        resume_dir=resume_dir,
        hint="or continue it with `dlrt finetune --resume {}`",
    )
    out = driver.run(resume=resume_dir is not None)
    status = out.status
    if status == "interrupted":
        print(interrupted_line(out, f"dlrt finetune --resume {run_dir}"), flush=True)
        if isinstance(opt, DLRTOptimizer):
            opt.finish_cycle()  # truncate before counting and saving
    if status != "diverged" and cfg.method != "full":
        with contextlib.suppress(Exception) if status == "interrupted" else contextlib.nullcontext():
            model.save_pretrained(run_dir / ADAPTER_DIR)
    rows = out.rows
    summary = {
        "status": status,
        "message": out.message,
        "method": cfg.method,
        "steps": out.steps,
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": max((r["test_acc"] for r in rows), default=None),
        "ranks": ranks(model),
        "total_rank": sum(adapter_ranks(model).values()),
        "adapter_params": adapter_parameters(model),
        "trainable_params": trainable,
        "median_step_seconds": statistics.median(out.step_seconds) if out.step_seconds else None,
        "training_state_bytes": training_state_bytes(model, opt),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "wall_seconds": out.wall_seconds,
        "config": cfg.to_dict(),
    }
    driver.writer.write_summary(summary)
    if cfg.plots and rows:
        from .plots import plot_finetune

        driver.writer.plot(plot_finetune)
    return FinetuneResult(run_dir, status, summary, out.step_seconds)
