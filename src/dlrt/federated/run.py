"""``dlrt federated``: the round loop over an engine, the accounting, and the run directory."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from ..training.config import FederatedConfig, TrainConfig
from .partition import dataset_tensors, partition
from .protocol import Client, Payload, RoundRecord, Server, lowrank_layers, run_round

__all__ = ["FIELDS", "FederatedResult", "InProcess", "build_clients", "run_rounds", "sample_clients"]

#: Columns of a federated run's ``metrics.csv`` (one row per round). Traffic and multiply-adds are per
#: participating client (means over the clients sampled that round), and cumulative over all clients.
FIELDS = [
    "round",
    "test_loss",
    "test_acc",
    "train_loss",
    "clients",
    "dropped",
    "rejected",
    "total_rank",
    "ranks",
    "floats_down",
    "floats_up",
    "bytes_client",
    "macs_client",
    "bytes_total",
    "macs_total",
    "seconds",
]


@dataclass
class FederatedResult:
    """What :func:`~.command.federate` returns: the run directory (None without one), how it ended, its summary."""

    run_dir: Path | None
    status: str  # "completed" | "interrupted"
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def _train_config(cfg: FederatedConfig) -> TrainConfig:
    """The ``dlrt train`` config whose data and model builders this run shares."""
    return TrainConfig(
        dataset=cfg.dataset,
        data_root=cfg.data_root,
        model=cfg.model,
        rank=cfg.rank,
        max_rank=cfg.max_rank,
        min_rank=cfg.min_rank,
        exclude=list(cfg.exclude),
        dense=cfg.method != "fedlrt",
        optimizer="sgd",
        lr=cfg.lr,
        tau=cfg.tau,
        tau_mode=cfg.tau_mode,
        init=cfg.init,
        limit=cfg.limit,
        seed=cfg.seed,
        device=cfg.device,
    )


def build_global_model(cfg: FederatedConfig, device: torch.device) -> nn.Module:
    """The starting global model: ``dlrt train``'s model, converted for FeDLRT with ``dlrt.convert``'s
    ``init=cfg.init`` (``"scaled"`` by default: each layer keeps its dense initialisation's scale)."""
    from ..training.loop import build_model

    return build_model(_train_config(cfg)).to(device)


def client_shards(cfg: FederatedConfig, train_set: Any) -> list[torch.utils.data.TensorDataset]:
    """Every client's samples: the seeded IID or Dirichlet split of the training set."""
    x, y = dataset_tensors(train_set)
    parts = partition(y, cfg.clients, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    return [torch.utils.data.TensorDataset(x[idx], y[idx]) for idx in parts]


def build_clients(
    cfg: FederatedConfig, model: nn.Module, shards: list[torch.utils.data.TensorDataset], device: torch.device
) -> dict[int, Client]:
    """One :class:`Client` per shard, all computing on ``model`` (a copy of the global model)."""
    return {
        c: Client(
            model,
            shard,
            client_id=c,
            method=cfg.method,
            correction=cfg.correction,
            lr=cfg.lr,
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            grad_batches=cfg.grad_batches,
            seed=cfg.seed,
            device=device,
        )
        for c, shard in enumerate(shards)
    }


def sample_clients(cfg: FederatedConfig, rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded sample of ``participation × clients`` of them."""
    if cfg.sampled_clients == cfg.clients:
        return list(range(cfg.clients))
    from ..training.driver import seed_for

    gen = torch.Generator().manual_seed(seed_for(cfg.seed, rnd, -2))
    return sorted(torch.randperm(cfg.clients, generator=gen)[: cfg.sampled_clients].tolist())


class InProcess:
    """The engine without a network: calls each client's :meth:`~Client.handle` in turn.

    A client that raises is reported as not answering (its error text), as a
    client that drops out would be; ``faults`` lets tests make a client drop
    (``"drop"``) or send a corrupted update (a function of its reply) in given stages.
    """

    def __init__(self, clients: Mapping[int, Client]) -> None:
        self.clients = dict(clients)
        self.states: dict[int, dict[str, torch.Tensor]] = {c: {} for c in self.clients}
        self.faults: dict[tuple[int, str], Any] = {}
        self.round = 0

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def send(self, stage: str, payload: Payload, cids: list[int]) -> dict[int, Payload | str]:
        out: dict[int, Payload | str] = {}
        for c in cids:
            fault = self.faults.get((c, stage))
            if fault == "drop":
                out[c] = "dropped (injected)"
                continue
            try:
                reply = self.clients[c].handle(stage, payload, self.states[c], self.round)
            except (ValueError, RuntimeError, FloatingPointError) as err:
                out[c] = f"client error: {err}"
                continue
            out[c] = fault(reply) if callable(fault) else reply
        return out


def _bytes_per_float(model: nn.Module) -> int:
    p = next(iter(model.parameters()))
    return p.element_size()


def run_rounds(
    cfg: FederatedConfig,
    *,
    engine: Callable[[dict[int, Client]], Any] | None = None,
    transport: Any = None,
    write: bool = True,
) -> FederatedResult:
    """Run the rounds of ``cfg`` to the end or to Ctrl-C (:func:`~dlrt.federated.federate` picks the engine).

    The rounds go over ``transport`` when given (Flower's :class:`~.flower.GridTransport`),
    else this function builds the clients and calls them through ``engine(clients)``
    (default :class:`InProcess`; tests inject faults with it). ``write=False`` writes no
    run directory.
    """
    from ..distributed import speaks
    from ..training.driver import evaluate
    from ..training.loop import build_data
    from ..training.records import METRICS, write_csv
    from ..training.runs import open_run, setup
    from ..training.signals import StopSignals

    device = setup(cfg)
    tcfg = _train_config(cfg)
    train_set, test_set = build_data(tcfg)
    model = build_global_model(cfg, device)
    lowrank_layers(model)  # refuses Tucker layers before anything is written
    server = Server(model, method=cfg.method, correction=cfg.correction, tau=cfg.tau, tau_mode=cfg.tau_mode)
    if transport is None:
        shards = client_shards(cfg, train_set)
        transport = (engine or InProcess)(build_clients(cfg, copy.deepcopy(model), shards, device))
    run_dir, writer = open_run(cfg, FIELDS, record={"command": "federated", **cfg.to_dict()}, write=write)
    per_float = _bytes_per_float(model)
    rows: list[dict[str, Any]] = []
    records: list[RoundRecord] = []
    status = "completed"
    t0 = time.perf_counter()
    bytes_total = macs_total = 0.0
    stops = StopSignals()  # SIGTERM, SIGUSR1: as Ctrl-C, the rounds stop where they are
    with stops:
        try:
            with transport:
                for rnd in range(1, cfg.rounds + 1):
                    t_round = time.perf_counter()
                    transport.round = rnd
                    record = run_round(
                        server, transport.send, sample_clients(cfg, rnd), rnd=rnd, min_clients=cfg.min_clients
                    )
                    records.append(record)
                    sampled = max(len(record.sampled), 1)
                    down, up = sum(record.floats_down.values()), sum(record.floats_up.values())
                    macs = sum(record.macs.values())
                    bytes_total += (down + up) * per_float
                    macs_total += macs
                    ranks = {n: ly.rank for n, ly in server.layers.items()}
                    row: dict[str, Any] = {
                        "round": rnd,
                        "test_loss": float("nan"),
                        "test_acc": float("nan"),
                        "train_loss": (sum(record.losses.values()) / len(record.losses)) if record.losses else math.nan,
                        "clients": len(record.aggregated),
                        "dropped": len(record.dropped),
                        "rejected": len(record.rejected),
                        "total_rank": sum(ranks.values()),
                        "ranks": ranks,
                        "floats_down": down / sampled,
                        "floats_up": up / sampled,
                        "bytes_client": (down + up) * per_float / sampled,
                        "macs_client": macs / sampled,
                        "bytes_total": bytes_total,
                        "macs_total": macs_total,
                    }
                    if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                        row["test_loss"], row["test_acc"] = evaluate(model, test_set, cfg.eval_batch_size, device)
                    row["seconds"] = time.perf_counter() - t_round
                    rows.append(row)
                    if run_dir is not None:
                        write_csv(run_dir / METRICS, FIELDS, rows)
                    if cfg.progress:
                        print(_describe(row, record), flush=True)
        except KeyboardInterrupt as err:
            status = "interrupted"
            if stops.received is None and err.args and err.args[0]:  # a signal during a client's driver run
                stops.received = str(err.args[0])
            if server.in_round:  # stopped mid-round: the global model goes back to the last completed round
                server.abort()
    if status == "interrupted" and speaks():
        by = {None: "Ctrl-C", "SIGINT": "Ctrl-C"}.get(stops.received, stops.received)
        kept = f"round {len(rows)}" if rows else "the start"
        saved = f"the global model of {kept} is in {run_dir / 'checkpoint.safetensors'}; " if run_dir else ""
        print(f"interrupted by {by}: {saved}federated runs do not resume", flush=True)
    summary = _summary(cfg, server, rows, records, status, time.perf_counter() - t0, per_float)
    if run_dir is not None:
        io.save(run_dir / "checkpoint.safetensors", model)
        writer.write_summary(summary)
        if cfg.plots and rows:
            from .plots import plot_run

            writer.plot(lambda d: plot_run(d, rows, cfg))
    writer.close()
    return FederatedResult(run_dir, status, summary, rows)


def _describe(row: dict[str, Any], record: RoundRecord) -> str:
    acc = "" if math.isnan(row["test_acc"]) else f" test acc {100 * row['test_acc']:.2f}%"
    line = (
        f"round {row['round']}:{acc} train loss {row['train_loss']:.4f}, {row['clients']} clients, "
        f"rank {row['total_rank']}, {row['bytes_client'] / 1e6:.3f} MB and {row['macs_client'] / 1e9:.3f} GMAC "
        "per client"
    )
    if not record.completed:
        line += f"; round abandoned in stage {record.failed_stage} (too few replies), model unchanged"
    for c, why in sorted({**record.dropped, **record.rejected}.items()):
        kind = "dropped" if c in record.dropped else "rejected"
        line += f"\n  client {c} {kind}: {why}"
    return line


def _summary(
    cfg: FederatedConfig,
    server: Server,
    rows: list[dict[str, Any]],
    records: list[RoundRecord],
    status: str,
    seconds: float,
    per_float: int,
) -> dict[str, Any]:
    from .. import conversion

    evaluated = [r for r in rows if not math.isnan(r["test_acc"])]
    last = evaluated[-1] if evaluated else None
    return {
        "status": status,
        "method": cfg.method,
        "correction": cfg.correction if cfg.method == "fedlrt" else None,
        "engine": cfg.engine,
        "clients": cfg.clients,
        "rounds": len(rows),
        "test_acc": None if last is None else last["test_acc"],
        "best_test_acc": max((r["test_acc"] for r in evaluated), default=None),
        "accuracy": [r["test_acc"] for r in rows],
        "bytes_per_client": [r["bytes_client"] for r in rows],
        "macs_per_client": [r["macs_client"] for r in rows],
        "bytes_total": rows[-1]["bytes_total"] if rows else 0.0,
        "macs_total": rows[-1]["macs_total"] if rows else 0.0,
        "bytes_per_float": per_float,
        "ranks": {n: ly.rank for n, ly in server.layers.items()},
        "compression": conversion.compression(server.model) if server.layers else 0.0,
        "abandoned_rounds": [r.round for r in records if not r.completed],
        "dropped": {str(r.round): {str(c): w for c, w in r.dropped.items()} for r in records if r.dropped},
        "rejected": {str(r.round): {str(c): w for c, w in r.rejected.items()} for r in records if r.rejected},
        "wall_seconds": seconds,
    }
