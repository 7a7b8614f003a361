"""What every timing benchmark records beside its numbers: the environment, the load, the target checks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def load_average(when: str) -> tuple[float, float, float]:
    """The load average; before a run, a warning when other processes would skew the timings."""
    load = os.getloadavg()
    if when == "before" and load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} before the run; other processes will skew the timings")
    return load


def print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        value = f" ({c['value']:.3f})" if isinstance(c["value"], float) else ""
        print(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}{value}")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """The command, versions, platform, threads and arguments of this run (for the results JSON)."""
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write_results(args: argparse.Namespace, record: dict[str, Any]) -> int:
    """Write ``record`` as JSON to ``args.out``; the exit status: 1 under ``--strict`` when a check failed."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if args.strict and not all(c["ok"] for c in record["checks"]) else 0


def run_sweep(
    script: str,
    specs: list[dict[str, Any]],
    out: Path,
    key: Callable[[dict[str, Any]], tuple],
    describe: Callable[[dict[str, Any]], str],
    jobs: int,
) -> None:
    """Run ``python script --one SPEC`` for each spec whose ``key`` is not in ``out`` (JSON lines), ``jobs`` at a time.

    Each worker prints ``RESULT {json}`` as its last such line; the record is appended to
    ``out`` (so an interrupted sweep continues where it stopped) and ``describe(record)``
    printed. A worker that fails is reported with the end of its stderr and skipped.
    """
    done = {key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()} if out.is_file() else set()
    todo = [s for s in specs if key(s) not in done]
    print(f"{len(todo)} runs to do ({jobs} at a time), results appended to {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    def launch(spec: dict[str, Any]) -> None:
        proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"FAILED {spec.get('name', spec)}:\n{proc.stderr[-2000:]}", flush=True)
            return
        record = json.loads(lines[-1][len("RESULT ") :])
        with out.open("a") as f:  # one short line per write: appends from threads do not interleave
            f.write(json.dumps(record) + "\n")
        print(describe(record), flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(launch, todo))


def add_sweep_arguments(p: argparse.ArgumentParser, *, runs_dir: str, out: Path, epochs: int) -> None:
    """The arguments every :func:`run_sweep` benchmark takes: the worker's ``--one``, the grid, the pool, the files."""
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", default="lenet5", choices=("lenet5", "vgg_small"))
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--runs-dir", default=runs_dir)
    p.add_argument("--out", type=Path, default=out, help="results, one JSON line per run")
    p.add_argument("--summarize", action="store_true", help="print the table and targets, write the PNG")
