"""The language-model parts of ``dlrt train``: next-token data, forward, perplexity and samples.

A run is a language-model run when its ``model`` is of kind ``"language"``
(:func:`dlrt.models.model_kind`: the ``gpt-*`` models); its ``dataset`` is then a
text corpus of :mod:`dlrt.data.lm`. The recipe in :mod:`dlrt.training.loop` stays
the one for both kinds: these functions supply what differs.

* the data: the corpus split by document into training and validation windows of
  ``context`` byte tokens (the run's test set is the validation part);
* the forward: the logits of every position against the next token, flattened, so
  the driver's cross-entropy and accuracy are the mean next-token loss and accuracy;
* the records: perplexity ``exp(loss)`` beside every loss, in ``metrics.csv``
  (``train_ppl``, ``test_ppl``) and ``steps.csv`` (``ppl`` of the step's batch;
  ``test_ppl`` at the steps of ``eval_every``);
* ``samples.txt``: a few texts the trained model continues from validation prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LM_STEP_FIELDS",
    "SAMPLES",
    "build_lm_data",
    "check_task",
    "is_language_run",
    "lm_forward",
    "metric_fields",
    "perplexity",
    "write_samples",
]

SAMPLES = "samples.txt"


def metric_fields(fields: list[str]) -> list[str]:
    """The columns of a language-model run's ``metrics.csv`` from a classifier run's ``fields``: ``step``
    after ``epoch`` and each loss followed by its perplexity (``train_ppl``, ``test_ppl``)."""
    out: list[str] = []
    for name in fields:
        out.append(name)
        if name == "epoch":
            out.append("step")
        elif name.endswith("_loss"):
            out.append(name[: -len("loss")] + "ppl")
    return out


#: Columns a language-model run's ``steps.csv`` has beyond the driver's own.
LM_STEP_FIELDS = ["ppl", "test_loss", "test_ppl", "test_acc"]

#: Tokens of a validation window that prompt each sample.
PROMPT_TOKENS = 32
#: Sampling temperature of ``samples.txt``.
TEMPERATURE = 0.8


def is_language_run(cfg: Any) -> bool:
    """Whether ``cfg`` (a :class:`~dlrt.training.config.TrainConfig`) trains a language model."""
    from ..models import model_kind

    return model_kind(cfg.model) == "language"


def check_task(cfg: Any) -> None:
    """A clear ``ValueError`` unless ``cfg``'s dataset fits its model and the keys fit the task.

    An image dataset goes with a classifier, a text corpus of :mod:`dlrt.data.lm` with a language
    model; ``augment`` is for images only.
    """
    from ..data import CORPORA, dataset_info

    corpus = str(cfg.dataset).strip().lower() in CORPORA
    language = is_language_run(cfg)
    if language and not corpus:
        raise ValueError(
            f"model={cfg.model!r} is a language model: train it on a text corpus, dataset= one of {', '.join(CORPORA)}"
        )
    if corpus and not language:
        from ..models import list_models

        raise ValueError(
            f"dataset={cfg.dataset!r} is a text corpus: train a language model on it, model= one of "
            f"{', '.join(list_models('language'))}"
        )
    if not language:
        dataset_info(cfg.dataset)  # unknown names: a ValueError listing the registered datasets
        if cfg.context is not None:
            raise ValueError(f"context= sets a language model's window; model={cfg.model!r} is a classifier: drop it")
        return
    cfg.dataset = str(cfg.dataset).strip().lower()
    if cfg.augment:
        raise ValueError("augment=true crops and flips images; a text corpus has none: set augment=false")


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean next-token cross-entropy in nats (``inf`` past overflow, NaN stays NaN)."""
    if loss is None or math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


def build_lm_data(cfg: Any) -> tuple[Any, Any]:
    """Training and validation windows of ``cfg.dataset`` (:func:`dlrt.data.lm_datasets`).

    Windows hold ``cfg.context`` tokens (default: the model's context); the split
    by document uses seed 0 whatever ``cfg.seed``, so runs of different seeds are
    scored on the same held-out text.
    """
    from ..data import lm_datasets

    return lm_datasets(cfg.dataset, model_context(cfg), path=cfg.data_root, val_fraction=cfg.val_fraction, seed=0)


def model_context(cfg: Any) -> int:
    """The window length of ``cfg``: its ``context``, else the registered model's."""
    if cfg.context is not None:
        return int(cfg.context)
    from ..models import GPT_SIZES

    size = cfg.model.lower().removeprefix("gpt-")
    if size not in GPT_SIZES:
        raise ValueError(f"set context= for the language model {cfg.model!r}")
    return GPT_SIZES[size].context


def lm_forward(model: nn.Module, batch: tuple[Tensor, Tensor], beta: float = 0.0) -> tuple[Tensor, Tensor, Any]:
    """Next-token logits of ``(x, y)`` windows, flattened to ``(batch·time, vocab)`` against ``(batch·time,)``.

    With ``beta > 0`` the loss gains the condition-number regularizer ``β·Σℛ(S)``
    (:func:`dlrt.robust.condition_regularizer`); else it is left to the driver (cross-entropy).
    """
    x, y = batch
    logits = model(x)
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    if not beta:
        return logits, y, None
    from ..robust import condition_regularizer

    return logits, y, nn.functional.cross_entropy(logits, y) + beta * condition_regularizer(model)


def add_epoch_perplexity(row: dict[str, Any]) -> None:
    """An epoch hook: ``train_ppl`` and ``test_ppl`` beside the losses."""
    row["train_ppl"] = perplexity(row["train_loss"])
    row["test_ppl"] = perplexity(row["test_loss"])


def add_step_perplexity(row: dict[str, Any]) -> None:
    """A step-row hook: ``ppl`` of the step's batch, and ``test_ppl`` where the row holds a test loss."""
    row["ppl"] = perplexity(row["loss"])
    if "test_loss" in row:
        row["test_ppl"] = perplexity(row["test_loss"])


def describe(epochs: int, row: dict[str, Any]) -> str:
    """The line printed at an epoch end of a language-model run."""
    ranks = ";".join(f"{n}:{r}" for n, r in row["ranks"].items())
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} (perplexity {row['train_ppl']:.2f}), "
        f"validation loss {row['test_loss']:.4f} (perplexity {row['test_ppl']:.2f}, next-token accuracy "
        f"{100 * row['test_acc']:.1f}%), rank {row['total_rank']} ({ranks}), "
        f"compression {100 * row['compression']:.1f}%, {row['seconds']:.1f}s"
    )


@torch.no_grad()
def write_samples(
    path: str | Path,
    model: nn.Module,
    val_set: Any,
    *,
    samples: int,
    tokens: int,
    seed: int,
    device: torch.device,
) -> list[str]:
    """Continue ``samples`` validation prompts by ``tokens`` sampled tokens each and write them to ``path``.

    Prompt ``i`` is the first :data:`PROMPT_TOKENS` tokens of a validation window
    spread evenly over the set; tokens are drawn at temperature :data:`TEMPERATURE`
    from a generator seeded with ``seed`` on ``device``. Returns the texts.
    """
    from ..data import ByteTokenizer

    if samples < 1 or len(val_set) == 0:
        return []
    tok = ByteTokenizer()
    gen = torch.Generator(device=device).manual_seed(seed)
    picks = torch.linspace(0, len(val_set) - 1, samples).round().long().unique().tolist()
    context = getattr(getattr(model, "config", None), "context", None)
    texts, parts = [], []
    for k, i in enumerate(picks, start=1):
        x = val_set[i][0]
        prompt = x[: min(PROMPT_TOKENS, x.numel())].unsqueeze(0).to(device)
        if context is not None:
            prompt = prompt[:, -context:]
        out = model.generate(prompt, tokens, temperature=TEMPERATURE, generator=gen)
        head, tail = tok.decode(out[0, : prompt.shape[1]]), tok.decode(out[0, prompt.shape[1] :])
        texts.append(head + tail)
        parts.append(f"=== sample {k}: prompt (validation window {i}) ===\n{head}\n=== continuation ===\n{tail}\n")
    note = f"# {len(texts)} samples, {tokens} tokens each, temperature {TEMPERATURE}, seed {seed}\n\n"
    Path(path).write_text(note + "\n".join(parts), encoding="utf-8")
    return texts
