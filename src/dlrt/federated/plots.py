"""The PNGs of a federated run: global test accuracy against rounds and against bytes communicated."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot_run(run_dir: Path, rows: list[dict[str, Any]], cfg: Any) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not math.isnan(r["test_acc"])]
    label = cfg.method if cfg.method != "fedlrt" else f"FeDLRT ({cfg.correction})"
    out = []
    for name, key, xlabel, scale in (
        ("accuracy.png", "round", "round", 1.0),
        ("accuracy_vs_bytes.png", "bytes_total", "bytes communicated, all clients (MB)", 1e-6),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r[key] * scale for r in rows], [100 * r["test_acc"] for r in rows], marker=".", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("global test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out
