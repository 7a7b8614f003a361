"""``dlrt export RUN_DIR``: a trained run's model as a deployable file (:func:`dlrt.export`).

A ``dlrt train`` run is rebuilt from its config and checkpoint; a ``dlrt finetune``
run from its pretrained model and saved adapter (GeoLoRA merged or not; PEFT's
LoRA and AdaLoRA merged). The example inputs are the first test examples of the
run's own data, so the file takes inputs of exactly that kind: images for the image
models, token ids and attention mask (padded to the run's ``max_length``) for text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exporting import FORMATS, RULES
from .driver import CHECKPOINT, CONFIG

#: The file name of ``dlrt export`` in the run directory, by format.
EXPORT_NAMES = {
    "pt2": "model.pt2",
    "aoti": "model.aoti.pt2",
    "onnx": "model.onnx",
    "safetensors": "model.safetensors",
}


class Logits(nn.Module):
    """``model(input_ids=..., attention_mask=...).logits``: a text classifier with tensor inputs and output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    loaded = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{run_dir / CONFIG} is not a mapping of key: value")
    return loaded


def _text_inputs(dataset: Any, n: int, max_length: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples' token ids and attention masks, padded to ``max_length``."""
    batch = dataset.collate([dataset[i] for i in range(n)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = max_length - ids.shape[1]
    if pad > 0:
        ids = nn.functional.pad(ids, (0, pad), value=dataset.collate.pad_token_id)
        mask = nn.functional.pad(mask, (0, pad), value=0)
    return ids, mask


def _image_inputs(dataset: Any, n: int) -> tuple[Tensor]:
    return (torch.stack([dataset[i][0] for i in range(n)]),)


def load_train_run(run_dir: Path, n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The trained model of a ``dlrt train`` run (on the CPU, eval mode) and ``n`` test inputs."""
    from .. import io
    from .config import load_config
    from .loop import build_data, build_model

    if not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}: the run saved no model to export")
    cfg = load_config(run_dir / CONFIG)
    _, test_set = build_data(cfg)
    model = build_model(cfg)
    io.load(run_dir / CHECKPOINT, model)
    return model.eval(), _image_inputs(test_set, n)


def load_finetune_run(run_dir: Path, n: int, merged: bool) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The fine-tuned model of a ``dlrt finetune`` run (on the CPU, eval mode) and ``n`` test inputs."""
    from ..models.pretrained import PRETRAINED
    from .config import FinetuneConfig, load_config
    from .finetune import ADAPTER_DIR, build_task

    cfg = load_config(run_dir / CONFIG, cls=FinetuneConfig)
    adapter = run_dir / ADAPTER_DIR
    if cfg.method == "full":
        raise ValueError(
            f"{run_dir} is a full fine-tuning run: it has no adapters and saved no model to export "
            "(fine-tune with method=geolora, lora or adalora)"
        )
    if not adapter.is_dir():
        raise FileNotFoundError(f"{run_dir} has no {ADAPTER_DIR}/ directory: the run saved no adapter to export")
    task = build_task(cfg)
    if cfg.method == "geolora":
        from ..peft import GeoLoRAModel

        model: nn.Module = GeoLoRAModel.from_pretrained(task.model, adapter)
    else:
        if not merged:
            raise ValueError(f"a {cfg.method} run exports merged only (PEFT's merge_and_unload); drop --unmerged")
        import peft

        model = peft.PeftModel.from_pretrained(task.model, str(adapter)).merge_and_unload()
    if PRETRAINED[cfg.model].kind == "text":
        return Logits(model).eval(), _text_inputs(task.test_set, n, cfg.max_length)
    return model.eval(), _image_inputs(task.test_set, n)


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    format: str = "pt2",
    rule: str = "flops",
    merged: bool = True,
    batch: int = 2,
) -> tuple[Path, dict[str, Any]]:
    """Export a ``dlrt train`` or ``dlrt finetune`` run's model; returns the file and what was exported.

    Args:
        run_dir: the run directory (``config.yaml`` and the checkpoint or the adapter).
        out: the file to write (default: ``model.pt2`` / ``model.aoti.pt2`` / ``model.onnx`` /
            ``model.safetensors`` in ``run_dir``); an existing file is refused.
        format, rule, merged: as :func:`dlrt.export`.
        batch: test examples the export (and ``rule="measured"``) runs on; at least 2,
            the batch dimension being dynamic.

    Returns:
        ``(path, info)``: ``info`` has ``kind`` (``train`` or ``finetune``), ``layers`` (by module
        name, as :func:`dlrt.exporting.plain_and_layers`) and ``bytes``.

    Raises:
        ValueError: a bad format, rule or batch; a run without a model to export; an existing ``out``.
        FileNotFoundError: ``run_dir`` is not a run directory.
    """
    from ..exporting import plain_and_layers, save_plain

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch must be an int ≥ 2 (the batch dimension is dynamic), got {batch!r}")
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / EXPORT_NAMES[format]
    if path.exists():
        raise ValueError(f"{path} exists: nothing is overwritten; remove it or pass another output file")
    finetuned = "method" in _read_config(run_dir)
    if finetuned:
        model, inputs = load_finetune_run(run_dir, batch, merged)
    else:
        model, inputs = load_train_run(run_dir, batch)
    plain, layers = plain_and_layers(model, rule=rule, merged=merged, example_inputs=inputs)
    written = save_plain(plain, layers, inputs, path, format=format, rule=rule, merged=merged)
    kind = "finetune" if finetuned else "train"
    return written, {"kind": kind, "layers": layers, "bytes": written.stat().st_size}
