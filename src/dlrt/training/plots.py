"""PNG plots of a run and across runs (matplotlib, imported lazily)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import linalg
from ..conversion import lowrank_layers
from ..layers.tucker import MODE_NAMES
from .records import read_metrics, read_steps


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike[str], model: nn.Module | None = None) -> list[Path]:
    """Write ``ranks.png`` (per epoch), ``cond.png`` (each core's condition number per epoch),
    ``rank_steps.png`` (every ``log_every`` steps, from ``steps.csv``), ``curves.png`` and
    (given the model) ``spectra.png`` into ``run_dir``."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    written = []
    epochs = [r["epoch"] for r in rows]

    names = list(rows[0]["ranks"]) if rows else []
    if names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot(epochs, [r["ranks"].get(name, float("nan")) for r in rows], marker="o", label=name)
        ax.set(xlabel="epoch", ylabel="rank", title="rank of each low-rank layer")
        ax.legend(fontsize="small")
        written.append(_save(plt, fig, run_dir / "ranks.png"))

    cond_names = list(dict.fromkeys(k for r in rows for k in (r.get("cond") or {})))
    if cond_names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in cond_names:
            ax.semilogy(epochs, [(r.get("cond") or {}).get(name, float("nan")) for r in rows], marker="o", label=name)
        ax.set(xlabel="epoch", ylabel="cond(S)", title="condition number of each low-rank core")
        ax.legend(fontsize="small")
        written.append(_save(plt, fig, run_dir / "cond.png"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    ax1.plot(epochs, [r["test_loss"] for r in rows], marker="o", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax1.legend()
    ax2.plot(epochs, [100 * r["train_acc"] for r in rows], marker="o", label="train")
    ax2.plot(epochs, [100 * r["test_acc"] for r in rows], marker="o", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax2.legend()
    written.append(_save(plt, fig, run_dir / "curves.png"))

    step_rows = read_steps(run_dir)
    step_names = list(dict.fromkeys(k for r in step_rows for k in r.get("ranks", {})))
    if step_names:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in step_rows]
        for name in step_names:
            ax.plot(steps, [r["ranks"].get(name, float("nan")) for r in step_rows], label=name)
        ax.set(xlabel="step", ylabel="rank", title="rank of each layer over the steps")
        if len(step_names) <= 12:
            ax.legend(fontsize="small")
        written.append(_save(plt, fig, run_dir / "rank_steps.png"))

    layers = list(lowrank_layers(model)) if model is not None else []
    if layers:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, layer in layers:
            core = layer.core.detach().float().cpu()
            # A Tucker layer: the singular values of each adapted mode's unfolding of its core.
            modes = getattr(layer, "tucker_modes", None)
            spectra = (
                [(name, torch.linalg.svdvals(core))]
                if modes is None
                else [(f"{name}/{MODE_NAMES[i]}", torch.linalg.svdvals(linalg.unfold(core, i))) for i in modes]
            )
            for label, sigma in spectra:
                ax.semilogy(range(1, sigma.numel() + 1), sigma.clamp_min(1e-12).numpy(), marker=".", label=label)
        ax.set(xlabel="index", ylabel="singular value", title="singular values of the cores at the end")
        ax.legend(fontsize="small")
        written.append(_save(plt, fig, run_dir / "spectra.png"))
    return written


def plot_report(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Accuracy against compression (``dlrt train`` runs) or against adapter parameters
    (``dlrt finetune`` runs), one point per run (from each ``summary.json``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    finetune = False
    for run_dir in run_dirs:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        if summary.get("test_acc") is None:
            continue
        cfg = summary["config"]
        if "method" in summary:
            finetune = True
            label = f"{summary['method']} lr={cfg['lr']:g}"
            ax.scatter(summary["adapter_params"], 100 * summary["test_acc"], label=label)
            continue
        label = "dense" if cfg.get("dense") else f"{cfg['integrator']} τ={cfg['tau']:g}"
        ax.scatter(100 * summary["compression"], 100 * summary["test_acc"], label=label)
    if finetune:
        ax.set(xlabel="adapter parameters", ylabel="test accuracy (%)", title="accuracy vs adapter size")
    else:
        ax.set(xlabel="compression (%)", ylabel="test accuracy (%)", title="accuracy vs compression")
    ax.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, out)


def plot_finetune(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The plots of a fine-tuning run: ``ranks.png`` (rank of each adapted module per epoch),
    ``rank_steps.png`` (the same every ``log_every`` steps) and ``curves.png``."""
    return plot_run(run_dir)
