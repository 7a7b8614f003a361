"""What the table builders of ``results.py`` share: reading a results file, formatting a number.

Imported by ``results.py`` and by the modules of builders (``results_training.py``, ``results_finetune.py``,
``results_inference.py``), which import nothing else from this folder: no import circles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The learning rates of the fine-tuning sweeps (benchmarks/finetune.py; part c of benchmarks/optimizers.py).
FINETUNE_LRS = (1e-4, 5e-4, 1e-3, 5e-3)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pct_text(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def int_text(x: float) -> str:
    return f"{round(x):,d}"


def lr_text(x: float) -> str:
    """``5e-3``; ``2.5e-3`` where one significant digit would round the rate."""
    text = f"{x:.0e}" if float(f"{x:.0e}") == x else f"{x:.1e}"
    return text.replace("e-0", "e-")
