"""Data-parallel DLRT against dense DDP: throughput and bytes communicated per step, 1 vs 2 processes (gloo, CPU).

For the paper's MLP (784-500-500-500-500-10) and LeNet5 on MNIST at the lottery-table
τ = 0.11 configuration (``bug``, SGD lr 0.05 as in configs/lenet5_mnist.yaml and the
authors' table, τ 0.11; the layers start at the ranks the
lottery table reports: LeNet5 conv1/conv2/fc1 14/20/20 at τ 0.11, the MLP fc1–fc4
40/51/52/56 at τ 0.1, the MLP row nearest 0.11), and the dense model of the same
architecture under ``torch.nn.parallel.DistributedDataParallel``:

* throughput: global samples per second, median over the timed steps, with the same
  global batch (``--batch-size``) split over the processes, every process with
  ``--threads`` threads (default 1: one core per process, so 2 processes use the 2 cores
  one process leaves idle; a 2-thread process suffers badly when other jobs share the cores);
* bytes per step: DLRT's all-reduces and broadcasts counted by the optimizer
  (``opt.communicator.bytes``: the payload each process hands to gloo); DDP's from its
  parameters' gradient sizes (it all-reduces every gradient once per step);
* at 8 and 64 processes: the bytes a ring all-reduce sends per process,
  ``2 (N − 1) / N × payload``, from the measured payload (the payload does not depend on N);
* equivalence (float64): 2 processes × batch ``B/2`` against 1 process × batch ``B``
  for ``--check-steps`` steps from the full rank (the paper's start; τ cuts from the
  first step, so the ranks change): largest loss difference and whether the ranks agree.

Run (about 5 minutes on 2 idle cores)::

    python benchmarks/ddp_scaling.py
    python benchmarks/ddp_scaling.py --summarize      # the table of the last run

Results: ``benchmarks/results/ddp_scaling.jsonl`` (one JSON line per measurement) and
the table in ``benchmarks/results/ddp_scaling.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
#: Ranks of the lottery tables in the README (LeNet5 τ 0.11; the MLP's nearest row, τ 0.1).
LOTTERY_RANKS = {"lenet5": {"conv1": 14, "conv2": 20, "fc1": 20}, "mlp": {"fc1": 40, "fc2": 51, "fc3": 52, "fc4": 56}}


def build(model_name: str, lowrank: bool, dtype: torch.dtype, full_rank: bool = False) -> nn.Module:
    import dlrt
    from dlrt.models import get_model

    torch.manual_seed(0)
    kwargs = {"in_features": 784} if model_name == "mlp" else {"in_channels": 1}
    model = get_model(model_name, num_classes=10, **kwargs).to(dtype)
    if lowrank and full_rank:  # the paper's full start: the truncation cuts from the first step on
        dlrt.convert(model, rank=1.0, exclude=["head"])
    elif lowrank:
        ranks = LOTTERY_RANKS[model_name]
        dlrt.convert(model, rank=max(ranks.values()), exclude=["head"])
        for name, layer in dlrt.lowrank_layers(model):
            layer.init_from_matrix(layer.matrix(), rank=ranks[name])
    return model


def mnist(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from dlrt.data import get_dataset

    data = get_dataset("mnist", "train")
    items = [data[i] for i in range(n)]
    return torch.stack([x for x, _ in items]).to(dtype), torch.tensor([int(y) for _, y in items])


def run_steps(model, opt, data, steps, batch, rank, world, *, first=0, comm_loss=False):
    """Train ``steps`` steps on consecutive global batches; this process takes rows ``rank::world``.

    Returns the seconds of every step and the global batch's loss after each (``comm_loss``).
    """
    x_all, y_all = data
    times, losses = [], []
    for k in range(first, first + steps):
        lo = (k * batch) % (len(x_all) - batch + 1)
        x, y = x_all[lo : lo + batch][rank::world], y_all[lo : lo + batch][rank::world]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        loss = opt.step(closure)
        times.append(time.perf_counter() - t0)
        if comm_loss:
            value = loss.detach().clone().reshape(1)
            if world > 1:
                torch.distributed.all_reduce(value)
                value /= world
            losses.append(float(value))
    return times, losses


def measure(model_name: str, variant: str, rank: int, world: int, args: dict) -> dict[str, Any]:
    import dlrt

    dtype = torch.float32
    data = mnist(args["batch_size"] * (args["steps"] + args["warmup"]), dtype)
    model = build(model_name, variant == "dlrt", dtype)
    if variant == "dlrt":
        opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.05, tau=0.11)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
    run_steps(net, opt, data, args["warmup"], args["batch_size"], rank, world)
    comm = getattr(opt, "communicator", None)
    before = dict(comm.bytes) if comm is not None else None
    calls = dict(comm.calls) if comm is not None else None
    if world > 1:
        torch.distributed.barrier()
    times, _ = run_steps(net, opt, data, args["steps"], args["batch_size"], rank, world, first=args["warmup"])
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    record: dict[str, Any] = {
        "model": model_name,
        "variant": variant,
        "world": world,
        "threads": torch.get_num_threads(),
        "batch_global": args["batch_size"],
        "steps": args["steps"],
        "median_step_s": statistics.median(times),
        "samples_per_s": args["batch_size"] / statistics.median(times),
        "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if variant == "dlrt":
        record["ranks"] = dlrt.ranks(model)
        if comm is not None:
            record["bytes_per_step"] = {k: (comm.bytes[k] - before[k]) / args["steps"] for k in comm.bytes}
            record["collectives_per_step"] = {k: (comm.calls[k] - calls[k]) / args["steps"] for k in comm.calls}
    elif world > 1:
        record["bytes_per_step"] = {"all_reduce": grad_bytes, "broadcast": 0}
    return record


def equivalence(model_name: str, rank: int, world: int, args: dict) -> dict[str, Any]:
    """float64: losses and ranks of ``--check-steps`` steps of ``bug`` on the global batch ``--batch-size``."""
    import dlrt

    # One thread in both runs: building the model (SVDs) at another thread count differs at ~1e-8 in its loss.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = mnist(args["batch_size"] * args["check_steps"], torch.float64)
    model = build(model_name, True, torch.float64, full_rank=args["check_rank"] == "full")
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.05, tau=0.11)
    ranks = []
    losses = []
    for k in range(args["check_steps"]):
        _, loss = run_steps(model, opt, data, 1, args["batch_size"], rank, world, first=k, comm_loss=True)
        losses += loss
        ranks.append(list(dlrt.ranks(model).values()))
    torch.set_num_threads(threads)
    return {"model": model_name, "variant": "equivalence", "world": world, "losses": losses, "ranks": ranks}


def worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(args["threads"])
    try:
        if world > 1:
            torch.distributed.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=300),
            )
        records = []
        for model_name in args["models"]:
            for variant in ("dlrt", "dense-ddp"):
                records.append(measure(model_name, variant, rank, world, args))
                if rank == 0:
                    print(json.dumps(records[-1]), flush=True)
            records.append(equivalence(model_name, rank, world, args))
        if rank == 0:
            Path(out).write_text("\n".join(json.dumps(r) for r in records) + "\n")
        if world > 1:
            # Free the DDP reducers before the group goes: a teardown with them alive aborted once in gloo.
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        raise


def launch(world: int, args: dict, out: Path) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, port, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(args["timeout"])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a worker of the {world}-process run failed (exit codes {[p.exitcode for p in procs]})")
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def ring_bytes(payload: float, n: int) -> float:
    """Bytes one process sends in a ring all-reduce of ``payload`` bytes over ``n`` processes."""
    return 2 * (n - 1) / n * payload


def summarize(records: list[dict]) -> str:
    lines = []
    by = {(r["model"], r["variant"], r["world"]): r for r in records}
    models = sorted({r["model"] for r in records})
    lines.append(
        f"{'model':<7} {'variant':<10} {'samples/s 1p':>13} {'samples/s 2p':>13} {'2p/1p':>6} "
        f"{'payload B/step':>15} {'vs DDP':>7} {'sent/proc N=2':>14} {'N=8':>12} {'N=64':>12} {'collect./step':>14}"
    )
    checks = []
    for m in models:
        dense = by[(m, "dense-ddp", 2)]["bytes_per_step"]["all_reduce"]
        for v in ("dlrt", "dense-ddp"):
            one, two = by[(m, v, 1)], by[(m, v, 2)]
            payload = sum(two["bytes_per_step"].values())
            calls = sum(two.get("collectives_per_step", {"all_reduce": 1}).values())
            lines.append(
                f"{m:<7} {v:<10} {one['samples_per_s']:>13.0f} {two['samples_per_s']:>13.0f} "
                f"{two['samples_per_s'] / one['samples_per_s']:>6.2f} {payload:>15,.0f} {dense / payload:>6.1f}x "
                f"{ring_bytes(payload, 2):>14,.0f} {ring_bytes(payload, 8):>12,.0f} {ring_bytes(payload, 64):>12,.0f} "
                f"{calls:>14.1f}"
            )
        dl = by[(m, "dlrt", 2)]
        ratio = dense / sum(dl["bytes_per_step"].values())
        checks.append((f"{m}: low-rank bytes/step >= 5x fewer than dense DDP", ratio >= 5, f"{ratio:.1f}x"))
        e1, e2 = by[(m, "equivalence", 1)], by[(m, "equivalence", 2)]
        diff = max(abs(a - b) for a, b in zip(e1["losses"], e2["losses"]))
        same_ranks = e1["ranks"] == e2["ranks"]
        changed = len({tuple(r) for r in e1["ranks"]}) > 1
        checks.append(
            (
                f"{m}: 2 processes x batch {by[(m, 'dlrt', 2)]['batch_global'] // 2} = 1 x "
                f"{by[(m, 'dlrt', 2)]['batch_global']} (float64, {len(e1['losses'])} steps, loss to 1e-6, same ranks)",
                diff <= 1e-6 and same_ranks,
                f"max |Δloss| {diff:.1e}, ranks equal: {same_ranks}, ranks changed: {changed}, "
                f"ranks {e1['ranks'][0]} -> {e1['ranks'][-1]}",
            )
        )
    lines.append("")
    for name, ok, value in checks:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {name} ({value})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=("mlp", "lenet5"))
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-steps", type=int, default=10, help="float64 steps of the equivalence check")
    p.add_argument(
        "--check-rank",
        default="full",
        choices=("full", "lottery"),
        help="start of the equivalence check: full rank (the ranks change from the first step) or the table's",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=RESULTS / "ddp_scaling.jsonl")
    p.add_argument("--summarize", action="store_true", help="print the table of --out and stop")
    a = p.parse_args(argv)
    if a.summarize:
        records = [json.loads(line) for line in a.out.read_text().splitlines() if line.strip()]
        print(summarize(records))
        return 0
    args = {k: v for k, v in vars(a).items() if k not in ("out", "summarize")}
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    records = []
    for world in (1, 2):
        records += launch(world, args, a.out.with_suffix(f".world{world}.tmp"))
        a.out.with_suffix(f".world{world}.tmp").unlink()
    header = {
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "args": args,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(json.dumps({**r, "run": header}) for r in records) + "\n")
    table = summarize(records)
    loads = f"load average before {load_before[0]:.1f}, after {header['load_after'][0]:.1f} (2 cores)"
    a.out.with_suffix(".txt").write_text(f"$ {header['command']}\n{loads}\n{table}\n")
    print(table)
    print(f"wrote {a.out} and {a.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
