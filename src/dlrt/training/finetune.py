"""The fine-tuning loop behind ``dlrt finetune`` (and ``benchmarks/finetune_vs_peft.py``).

One loop, four methods on the same model, split and seed: GeoLoRA
(:mod:`dlrt.peft`), full fine-tuning, and PEFT's LoRA and AdaLoRA (``peft``
imported only for those). A run directory holds ``config.yaml``,
``metrics.csv`` (per epoch: losses, accuracies, the rank of every adapted
module, adapter and trainable parameter counts, seconds), ``steps.csv`` (per
step: loss, seconds, total rank), ``summary.json``, the adapter
(``adapter/``, written by ``save_pretrained``; not for full fine-tuning) and
PNG plots.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import FinetuneConfig
from .loop import (
    CONFIG,
    METRICS,
    SUMMARY,
    _Progress,
    _write_json,
    lr_factor,
    new_run_dir,
    resolve_device,
    to_device,
    write_csv,
)
from .loop import evaluate as loop_evaluate

__all__ = ["FinetuneResult", "Task", "build_task", "finetune"]

STEPS = "steps.csv"
ADAPTER_DIR = "adapter"

#: Per model: (target_modules, modules_to_save) when the config leaves them unset.
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "minilm": (["query", "value"], ["classifier"]),
    "tiny-bert": (["query", "value"], ["classifier"]),
    "mnist-cnn": (["features.0", "features.3", "classifier.0"], ["classifier.2"]),
}

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
class Task:
    """A model with its data: ``forward(model, batch) -> (logits, labels, loss or None)``.

    A returned loss is the model's own (for PEFT's AdaLoRA it includes the
    orthogonality regulariser); without one the loop takes the cross-entropy.
    """

    model: nn.Module
    train_set: Any
    test_set: Any
    collate: Callable[[list[Any]], Any] | None
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor | None]]


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
    from ..models import pretrained

    if cfg.model in ("minilm", "tiny-bert"):
        from ..data.text import TextClassificationDataset, load_rotten_tomatoes

        if cfg.model == "minilm":
            model, tokenizer = pretrained.load_minilm(num_labels=2, pooling=cfg.pooling)
        else:
            model, tokenizer = pretrained.tiny_bert(num_labels=2, seed=cfg.seed, pooling=cfg.pooling), HashTokenizer()
        train, test = load_rotten_tomatoes(cfg.data_path, test_fraction=cfg.test_fraction, seed=cfg.seed)
        if cfg.limit is not None:
            train, test = train[: cfg.limit], test[: cfg.limit]
        train_set = TextClassificationDataset(train, tokenizer, max_length=cfg.max_length)
        test_set = TextClassificationDataset(test, tokenizer, max_length=cfg.max_length)

        def forward(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
            out = model(**batch)
            return out.logits, batch["labels"], out.loss

        return Task(model, train_set, test_set, train_set.collate, forward)

    model = pretrained.load_pretrained_mnist_cnn()
    train_set = pretrained.mnist_cnn_dataset(cfg.dataset, "train", root=cfg.data_path)
    test_set = pretrained.mnist_cnn_dataset(cfg.dataset, "test", root=cfg.data_path)
    if cfg.limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.limit, len(train_set))))
        test_set = torch.utils.data.Subset(test_set, range(min(cfg.limit, len(test_set))))

    def forward_image(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        x, y = batch
        return model(x), y, None

    return Task(model, train_set, test_set, None, forward_image)


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


def _modules(cfg: FinetuneConfig) -> tuple[list[str], list[str]]:
    targets, save = DEFAULT_MODULES[cfg.model]
    return (
        cfg.target_modules if cfg.target_modules is not None else targets,
        cfg.modules_to_save if cfg.modules_to_save is not None else save,
    )


def _torch_optimizer(cfg: FinetuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def apply_method(
    cfg: FinetuneConfig, model: nn.Module, total_steps: int
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    """``(model, optimizer, after_step)`` for ``cfg.method``; ``after_step(step)`` runs after every step."""
    targets, save = _modules(cfg)
    if cfg.method == "geolora":
        from ..peft import GeoLoRAConfig, get_geolora_model

        config = GeoLoRAConfig(
            r=cfg.r,
            max_rank=cfg.max_rank,
            min_rank=cfg.min_rank,
            tau=cfg.tau,
            budget=cfg.budget,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=save,
            coefficient_steps=cfg.coefficient_steps,
            integrator=cfg.integrator,
        )
        geo = get_geolora_model(model, config)
        opt = geo.make_optimizer(
            optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm
        )
        return geo, opt, lambda step: None
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, _torch_optimizer(cfg, list(model.parameters())), lambda step: None
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
        return pmodel, _torch_optimizer(cfg, [p for p in pmodel.parameters() if p.requires_grad]), lambda step: None
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
    opt = _torch_optimizer(cfg, [p for p in pmodel.parameters() if p.requires_grad])

    def allocate(step: int) -> None:
        pmodel.base_model.update_and_allocate(step)

    return pmodel, opt, allocate


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
    return loop_evaluate(
        model, task.test_set, batch_size, device, forward=lambda m, b: task.forward(m, b)[:2], collate=task.collate
    )


def _short(name: str) -> str:
    # "base_model.model.bert.encoder.layer.3.attention.self.query" -> "layer.3.attention.self.query"
    parts = name.split(".")
    return ".".join(parts[parts.index("layer") :]) if "layer" in parts else name.removeprefix("base_model.model.")


# ------------------------------------------------------------------ the loop
def finetune(cfg: FinetuneConfig | None = None, task: Task | None = None) -> FinetuneResult:
    """Fine-tune as ``cfg`` says in a new run directory.

    ``task`` (from :func:`build_task`) may be passed to reuse loaded data; its
    model is modified. Ctrl-C stops with status ``"interrupted"`` after writing
    the summary and the adapter; a non-finite loss stops with ``"diverged"``.
    """
    from ..optimizer import DLRTOptimizer, NonFiniteError

    cfg = cfg or FinetuneConfig()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run_dir = new_run_dir(cfg.runs_dir, cfg.name, f"{cfg.model}-{cfg.dataset}-{cfg.method}")
    import yaml

    (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

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
    clip = (trainable_params, cfg.max_grad_norm) if torch_clip else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    step_seconds: list[float] = []
    status, message, step = "completed", "", 0
    t_start = time.perf_counter()
    try:
        for epoch in range(cfg.epochs):
            if step >= total_steps:
                break
            t_epoch = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            loader = torch.utils.data.DataLoader(
                task.train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen, collate_fn=task.collate
            )
            bar = _Progress(cfg.progress, min(steps_per_epoch, total_steps - step), f"epoch {epoch + 1}/{cfg.epochs}")
            run_loss, correct, seen = 0.0, 0, 0
            for batch in loader:
                if step >= total_steps:
                    break
                batch = to_device(batch, device)
                held: dict[str, Tensor] = {}
                closure = step_closure(task, model, opt, batch, clip=clip, held=held)
                t0 = time.perf_counter()
                try:
                    opt.step(closure)
                except NonFiniteError as err:
                    status, message = "diverged", str(err)
                    raise
                if not torch.isfinite(held["loss"]):
                    status, message = "diverged", f"step {step}: non-finite loss {float(held['loss'])}"
                    raise NonFiniteError(message)
                after_step(step)
                if scheduler is not None:
                    scheduler.step()
                step_seconds.append(time.perf_counter() - t0)
                step += 1
                n = held["labels"].numel()
                run_loss += float(held["loss"]) * n
                correct += int((held["logits"].argmax(-1) == held["labels"]).sum())
                seen += n
                total_rank = sum(adapter_ranks(model).values())
                step_rows.append(
                    {"step": step, "loss": float(held["loss"]), "seconds": step_seconds[-1], "total_rank": total_rank}
                )
                bar.update(1, loss=f"{run_loss / seen:.4f}", acc=f"{correct / seen:.3f}", rank=total_rank)
            bar.close()
            if (step >= total_steps or epoch == cfg.epochs - 1) and isinstance(opt, DLRTOptimizer):
                opt.finish_cycle()  # GeoLoRA mid coefficient cycle: truncate before the final evaluation
            test_loss, test_acc = evaluate(task, model, cfg.eval_batch_size, device)
            ranks = {_short(k): v for k, v in adapter_ranks(model).items()}
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": run_loss / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "total_rank": sum(ranks.values()),
                "ranks": ranks,
                "adapter_params": adapter_parameters(model),
                "trainable_params": trainable,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t_epoch,
            }
            rows.append(row)
            write_csv(run_dir / METRICS, FINETUNE_METRIC_FIELDS, rows)
            write_csv(run_dir / STEPS, ["step", "loss", "seconds", "total_rank"], step_rows)
            print(
                f"epoch {epoch + 1}/{cfg.epochs} ({cfg.method}): train loss {row['train_loss']:.4f}, "
                f"test {100 * test_acc:.2f}%, total rank {row['total_rank']}, "
                f"adapter params {row['adapter_params']:,d}, {row['seconds']:.1f}s",
                flush=True,
            )
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"interrupted at step {step}", flush=True)
    except NonFiniteError:
        print(f"stopped: {message}", flush=True)

    if status == "interrupted" and isinstance(opt, DLRTOptimizer):
        opt.finish_cycle()  # truncate before counting and saving
    if status != "diverged" and cfg.method != "full":
        with contextlib.suppress(Exception) if status == "interrupted" else contextlib.nullcontext():
            model.save_pretrained(run_dir / ADAPTER_DIR)
    last = rows[-1] if rows else {}
    summary = {
        "status": status,
        "message": message,
        "method": cfg.method,
        "steps": step,
        "test_acc": last.get("test_acc"),
        "best_test_acc": max((r["test_acc"] for r in rows), default=None),
        "ranks": {_short(k): v for k, v in adapter_ranks(model).items()},
        "total_rank": sum(adapter_ranks(model).values()),
        "adapter_params": adapter_parameters(model),
        "trainable_params": trainable,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "training_state_bytes": training_state_bytes(model, opt),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - t_start,
        "config": cfg.to_dict(),
    }
    _write_json(run_dir / SUMMARY, summary)
    if cfg.plots and rows:
        with contextlib.suppress(ImportError):
            from .plots import plot_finetune

            plot_finetune(run_dir)
    return FinetuneResult(run_dir, status, summary, step_seconds)
