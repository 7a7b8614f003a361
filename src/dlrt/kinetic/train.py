"""``dlrt closure train`` and ``dlrt closure solve``: recipes over the one training driver.

``train_closure`` draws (or loads) the data, builds the network and hands a
:class:`~dlrt.training.driver.Task` whose ``forward`` returns the Sobolev loss to
:class:`~dlrt.training.driver.Driver`. The run directory is ``dlrt train``'s:
``config.yaml``, ``metrics.csv`` (validation errors of h, α, u per epoch),
``steps.csv``, ``summary.json``, ``checkpoint.safetensors`` and ``closure.png``;
the training data are kept as ``data.safetensors``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import io
from ..distributed import speaks
from ..training.driver import CHECKPOINT, CONFIG, Task, interrupted_line
from ..training.records import METRICS, read_csv
from ..training.runs import setup, start_run
from .basis import Basis, make_basis
from .config import ClosureConfig
from .data import ClosureData, load_data, sample, save_data
from .networks import ICNN, build_network, predict

__all__ = ["ClosureRun", "closure_errors", "load_closure", "solve_run", "train_closure"]

DATA = "data.safetensors"
METRIC_FIELDS = [
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "h_err",
    "alpha_err",
    "u_err",
    "total_rank",
    "ranks",
    "lr",
    "seconds",
]


@dataclass
class ClosureRun:
    """A finished ``dlrt closure train``: run directory, status and ``summary.json``'s content."""

    run_dir: Path
    status: str
    summary: dict[str, Any]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def sobolev_loss(
    model: nn.Module, u: Tensor, h: Tensor, alpha: Tensor, basis: Basis, cfg: ClosureConfig, create_graph: bool
) -> Tensor:
    """``w_h MSE(h) + w_α MSE(α_r) + w_u MSE(u_r)`` of the network closure at normalised moments ``u``."""
    h_p, a_p, u_p = predict(model, u, basis, cfg.gamma, create_graph=create_graph)
    mse = nn.functional.mse_loss
    return (
        cfg.loss_h * mse(h_p, h)
        + cfg.loss_alpha * mse(a_p[:, 1:], alpha[:, 1:])
        + cfg.loss_u * mse(u_p[:, 1:], u[:, 1:])
    )


@torch.no_grad()
def closure_errors(
    model: nn.Module,
    data: ClosureData,
    basis: Basis,
    gamma: float,
    batch_size: int = 10_000,
    cfg: ClosureConfig | None = None,
) -> dict[str, float]:
    """Relative errors ``‖ŷ − y‖_F / ‖y‖_F`` of ``h``, ``α`` and ``u`` (all components) over ``data``.

    With ``cfg``, also ``val_loss``: its Sobolev loss on ``data``.
    """
    hs, alphas, us = [], [], []
    for i in range(0, len(data), batch_size):
        h, a, u = predict(model, data.u[i : i + batch_size], basis, gamma)
        hs.append(h), alphas.append(a), us.append(u)  # type: ignore[arg-type]
    h, a, u = torch.cat(hs), torch.cat(alphas), torch.cat(us)
    out = {"h_err": _rel(h, data.h), "alpha_err": _rel(a, data.alpha), "u_err": _rel(u, data.u)}
    if cfg is not None:
        mse = nn.functional.mse_loss
        loss = cfg.loss_h * mse(h, data.h) + cfg.loss_alpha * mse(a[:, 1:], data.alpha[:, 1:])
        out = {"val_loss": float(loss + cfg.loss_u * mse(u[:, 1:], data.u[:, 1:])), **out}
    return out


def _build_model(cfg: ClosureConfig, n: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    model = build_network(cfg.model, n, cfg.width, cfg.depth).to(device, dtype)
    if cfg.lowrank:
        from ..conversion import convert

        convert(model, rank=cfg.rank, tau=cfg.tau, exclude=["head", "hidden.0"])
    return model


def _basis(cfg: ClosureConfig, dtype: torch.dtype, device: torch.device) -> Basis:
    return make_basis(cfg.kind, cfg.order, cfg.dim, cfg.quadrature, device=device, dtype=dtype)


def _data(cfg: ClosureConfig, basis: Basis) -> ClosureData:
    if cfg.data_path is None:
        return sample(
            basis.to(dtype=torch.float64),
            cfg.samples,
            gamma=cfg.gamma,
            bound=cfg.bound,
            min_eig=cfg.min_eig,
            seed=cfg.seed,
        )
    data = load_data(cfg.data_path)
    want = {"kind": basis.kind, "order": basis.order, "dim": basis.dim, "gamma": cfg.gamma}
    got = {k: data.meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{cfg.data_path} holds data for {got}, but the config asks for {want}: fix the config")
    return data


def train_closure(cfg: ClosureConfig | None = None, *, resume_dir: str | os.PathLike[str] | None = None) -> ClosureRun:
    """Train a neural closure as ``cfg`` says in a new run directory (created once everything is built),
    or continue the run in ``resume_dir`` from its checkpoint, with its saved config and samples."""
    from ..conversion import lowrank_layers, ranks
    from ..training.config import load_config

    if resume_dir is not None:
        if cfg is not None:
            raise ValueError("resume_dir= continues a run with its saved config; do not pass cfg")
        saved = Path(resume_dir)
        if not (saved / CONFIG).is_file() or not (saved / DATA).is_file():
            raise FileNotFoundError(f"{resume_dir} is not a `dlrt closure train` run directory (no {CONFIG}, {DATA})")
        cfg = load_config(saved / CONFIG, cls=ClosureConfig)
    cfg = cfg or ClosureConfig()
    device = setup(cfg)
    dtype = getattr(torch, cfg.dtype)
    basis = _basis(cfg, dtype, device)
    data = load_data(Path(resume_dir) / DATA) if resume_dir is not None else _data(cfg, basis)
    train_data, val_data = (d.to(device, dtype) for d in data.split(cfg.val_fraction, cfg.seed))
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, basis.n, dtype, device)
    model.fit(train_data.u[:, 1:], train_data.h, train_data.alpha[:, 1:])
    if cfg.lowrank:
        from ..optimizer import DLRTOptimizer

        opt: torch.optim.Optimizer = DLRTOptimizer(model, cfg.integrator, "adam", lr=cfg.lr, tau=cfg.tau)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    decay = cfg.lr_final / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: decay ** min(s / max(total - 1, 1), 1.0))

    def forward(m: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        u, h, alpha = batch
        loss = sobolev_loss(m, u, h, alpha, basis, cfg, create_graph=True)
        # Real-valued targets: the driver counts the samples and no accuracy (none is written to metrics.csv).
        return h, h, loss

    def validate(m: nn.Module) -> dict[str, Any]:
        return closure_errors(m, val_data, basis, cfg.gamma, cfg.eval_batch_size, cfg)

    train_set = torch.utils.data.TensorDataset(train_data.u, train_data.h, train_data.alpha)
    run_dir, driver = start_run(
        cfg,
        Task(model, train_set, None, None, forward),
        opt,
        device=device,
        metric_fields=METRIC_FIELDS,
        scheduler=scheduler,
        ranks=lambda m: dict(ranks(m)),
        extra_metrics=validate,
        step_hooks=[model.project] if isinstance(model, ICNN) else [],
        describe=lambda r: (
            f"epoch {r['epoch']}: train loss {r['train_loss']:.3e}, val loss {r['val_loss']:.3e}, "
            f"rel. errors h {r['h_err']:.2e} α {r['alpha_err']:.2e} u {r['u_err']:.2e}"
        ),
        checkpoint=True,
        resume_dir=resume_dir,
    )
    if resume_dir is None:
        save_data(run_dir / DATA, data)
    out = driver.run(resume=resume_dir is not None)
    if out.status == "interrupted" and speaks():
        print(interrupted_line(out, f"dlrt closure train --resume {run_dir}"), flush=True)
    final = validate(model) if out.status != "diverged" else {}
    stored = sum(p.numel() for p in model.parameters())
    summary = {
        "status": out.status,
        "message": out.message,
        "steps": out.steps,
        **final,
        "parameters": stored,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "lowrank_layers": [name for name, _ in lowrank_layers(model)],
        "ranks": dict(ranks(model)),
        "samples": {"train": len(train_data), "validation": len(val_data), **data.meta},
        "wall_seconds": out.wall_seconds,
        "config": cfg.to_dict(),
    }
    driver.writer.write_summary(summary)
    if cfg.plots and out.rows:
        driver.writer.plot(lambda d: plot_training(d, model, val_data, basis, cfg.gamma))
    return ClosureRun(run_dir, out.status, summary)


def plot_training(run_dir: Path, model: nn.Module, val: ClosureData, basis: Basis, gamma: float) -> Path:
    """``closure.png``: validation errors per epoch, and network against reference ``α_r`` on held-out data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(run_dir / METRICS)
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("h_err", "h"), ("alpha_err", "α"), ("u_err", "u")):
        ax1.semilogy(epochs, [r[key] for r in rows], marker="o", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("relative validation error")
    ax1.legend()
    k = min(len(val), 2000)
    _, a, _ = predict(model, val.u[:k], basis, gamma)
    ax2.scatter(val.alpha[:k, 1:].flatten().cpu(), a[:, 1:].detach().flatten().cpu(), s=2)
    ax2.set_xlabel("α_r (Newton / sampled)")
    ax2.set_ylabel("α_r (network)")
    fig.tight_layout()
    path = run_dir / "closure.png"
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def load_closure(run_dir: str | Path, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Basis, ClosureConfig]:
    """The trained network of a ``dlrt closure train`` run (on the CPU, in ``dtype``), its basis and config."""
    from ..training.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir} is not a `dlrt closure train` run directory with a checkpoint")
    cfg = load_config(run_dir / CONFIG, cls=ClosureConfig)
    basis = _basis(cfg, dtype, torch.device("cpu"))
    model = _build_model(cfg, basis.n, torch.float32 if cfg.dtype == "float32" else torch.float64, torch.device("cpu"))
    io.load(run_dir / CHECKPOINT, model)
    return model.to(dtype).eval(), basis, cfg


def solve_run(
    run_dir: str | Path,
    cases: list[str],
    *,
    cells: int = 100,
    t_end: float | None = None,
    out_dir: str | Path | None = None,
    plots: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the 1D test ``cases`` with the Newton closure and with the run's network closure (float64).

    Writes ``solve.json`` (errors, timings) and ``solve_<case>.png`` (both solutions and their difference)
    to ``out_dir`` (default: the run directory) and returns the JSON's content.
    """
    import json

    from .solver import CASES, NetworkClosure, NewtonClosure, solve

    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if cells < 4:
        raise ValueError(f"cells must be >= 4, got {cells}")
    model, basis, cfg = load_closure(run_dir)
    if basis.dim != 1:
        raise ValueError(f"{run_dir} trained a dim={basis.dim} closure; the solver is 1D (train with dim=1)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        kwargs = {"cells": cells} if t_end is None else {"cells": cells, "t_end": t_end}
        problem = CASES[case](basis, **kwargs)
        ref = solve(problem, basis, NewtonClosure(basis, cfg.gamma))
        net = solve(problem, basis, NetworkClosure(model, basis, cfg.gamma))
        results[case] = {
            "cells": cells,
            "t_end": problem.t_end,
            "steps": ref.steps,
            "rel_l2": _rel(net.u, ref.u),
            "rel_l2_density": _rel(net.u[:, 0], ref.u[:, 0]),
            "newton_closure_seconds": ref.closure_seconds,
            "network_closure_seconds": net.closure_seconds,
            "mass_newton": float(ref.u[:, 0].sum() * problem.dx),
            "mass_network": float(net.u[:, 0].sum() * problem.dx),
        }
        if plots:
            _plot_solution(out / f"solve_{case}.png", problem.x, ref.u, net.u, case)
    text = json.dumps(results, indent=2) + "\n"
    io.atomic_write(out / "solve.json", lambda tmp: Path(tmp).write_text(text))
    return results


def _plot_solution(path: Path, x: Tensor, ref: Tensor, net: Tensor, case: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(min(ref.shape[1], 3)):
        ax1.plot(x, ref[:, k], color=f"C{k}", label=f"u{k} Newton")
        ax1.plot(x, net[:, k], "--", color=f"C{k}", alpha=0.8, label=f"u{k} network")
        ax2.plot(x, net[:, k] - ref[:, k], color=f"C{k}", label=f"u{k}")
    ax1.set_title(f"{case}: moments at t_end")
    ax2.set_title("network − Newton")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
