"""The CSV files of a run directory (``metrics.csv``, ``steps.csv``) and the JSON form of their rows.

Rows are dicts; a column in :data:`DICT_FIELDS` holds a ``{layer: value}`` dict, written
as ``name:value;…``. Every file is written through a temporary file renamed into place
(:func:`dlrt.io.atomic_write`). The checkpoint stores the rows too (:func:`to_json`), so a
resumed run rewrites the files from it.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from .. import io

__all__ = [
    "DICT_FIELDS",
    "METRICS",
    "STEPS",
    "from_json",
    "read_csv",
    "read_metrics",
    "read_steps",
    "to_json",
    "write_csv",
]

METRICS = "metrics.csv"
STEPS = "steps.csv"


#: Columns holding a ``{layer: value}`` dict, written as ``name:value;…``, and the type of their values.
DICT_FIELDS: dict[str, type] = {"ranks": int, "cond": float}


def write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV through a temporary file; a dict column (:data:`DICT_FIELDS`) becomes ``name:value;…``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                out = dict(row)
                for key in DICT_FIELDS:
                    if isinstance(out.get(key), dict):
                        out[key] = ";".join(f"{k}:{v}" for k, v in out[key].items())
                writer.writerow(out)

    io.atomic_write(path, write)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV written by :func:`write_csv`: numbers parsed, dict columns as dicts.

    An empty cell (a column added after the row was written) reads as ``None``.
    """
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out: dict[str, Any] = {}
            for key, value in row.items():
                if key in DICT_FIELDS:
                    kind = DICT_FIELDS[key]
                    out[key] = {k: kind(v) for k, v in (p.rsplit(":", 1) for p in value.split(";") if p)}
                elif value == "":
                    out[key] = None
                elif key in ("epoch", "step", "total_rank", "adapter_params", "trainable_params"):
                    out[key] = int(value)
                else:
                    out[key] = float(value)
            rows.append(out)
    return rows


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv`` with numbers parsed and ``ranks`` as a dict."""
    return read_csv(Path(run_dir) / METRICS)


def read_steps(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``steps.csv`` (a row every ``log_every`` steps) with ``ranks`` as a dict."""
    return read_csv(Path(run_dir) / STEPS)


def to_json(value: Any) -> Any:
    """``value`` with non-finite floats as strings (checkpoint headers are strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
