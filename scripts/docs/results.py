"""Results tables of the documentation site, generated from the files in ``benchmarks/results/``.

A page asks for a table with a marker ``<!-- results: NAME -->``; the site's build hook
(``scripts/docs/hooks.py``) replaces it with ``render(NAME)``: the table, then one line that
says which file it came from, the command that wrote it, the date it was measured (the date
of the file's last commit, or its modification date while uncommitted) and the machine.
Nothing here imports torch or dlrt: the tables are read from the files, never re-run.

This file holds what every table shares (``Table``, the caption, the registry ``TABLES``, ``render``); the
functions that turn a file's records into rows live beside it, grouped by the pages they serve:
``results_training.py`` (step time, data parallel, FeDLRT, robustness, rank start, Tucker, closures,
optimizers, checkpoints), ``results_finetune.py`` (GeoLoRA), ``results_inference.py`` (export, pre-training),
all over ``results_common.py`` (reading and formatting). They are imported by name, so this folder must be
on ``sys.path`` while this file is imported: running it does that, so does MkDocs while it loads
``hooks.py``, and the tests insert it.

    python scripts/docs/results.py                 # the names of all tables
    python scripts/docs/results.py step-time       # print one table as Markdown
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results_common import read_json, read_jsonl
from results_finetune import (
    DEFAULT_RUN_SEEDS,
    FIXED_RANK_SEEDS,
    FT_ALL,
    FT_BUDGETS,
    FT_CONVENTION,
    FT_FASHION,
    FT_INITS,
    FT_LORA,
    FT_QV,
    FT_SECOND_MOMENT_RUNS,
    finetune_budget,
    finetune_default,
    finetune_default_paired,
    finetune_init,
    finetune_second_moment,
    finetune_sweep,
    finetune_timing,
)
from results_inference import inference, pretraining, pretraining_seeds
from results_training import (
    checkpoint_overhead,
    closure,
    ddp_equivalence,
    ddp_scaling,
    federated,
    lenet_step_time,
    optimizers_c,
    optimizers_d,
    optimizers_part,
    rank_start,
    robustness,
    step_time,
    tucker,
    tucker_timing,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

#: What the README says these benchmarks ran on, where the results files do not record it.
PROJECT_MACHINE = "the project's 2-core CPU machine"
#: Where the Tucker comparison ran (its files do not record it).
TUCKER_MACHINE = "2 CPU cores (the project's machine)"


@dataclass(frozen=True)
class Table:
    """One generated table: the files it reads and how it turns them into rows."""

    files: tuple[str, ...]
    build: Callable[[list[Path]], tuple[list[str], list[list[str]]]]
    command: str | None = None  # when the files do not record the command that wrote them
    machine: str | None = None  # what the README says the runs were measured on, when the files do not say
    part: str | None = None  # the part of a results file with several parts (benchmarks/optimizers.py)


# ------------------------------------------------------------------ helpers
def _shell(command: str) -> str:
    """The command as a reader would type it: `python benchmarks/…`, without this machine's paths."""
    command = re.sub(r"^\S*python3?\s+", "python ", command.strip())
    command = re.sub(r"^benchmarks/", "python benchmarks/", command)
    return re.sub(r"(?<=\s)/\S*/benchmarks/results/", "benchmarks/results/", command)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ where and when
def measured_on(path: Path) -> str:
    """The date of the commit that last changed ``path`` (its modification date while uncommitted)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path.relative_to(ROOT))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(path.relative_to(ROOT))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out, dirty = "", "?"
    if out and not dirty:
        return f"{out} (committed)"
    day = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    return f"{day} (file modified, not committed)"


def _records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.suffix == ".jsonl" else [read_json(path)]


def _environments(path: Path, part: str | None = None) -> list[dict[str, Any]]:
    """Every place in a results file that records how it was run (top level, per part, per run)."""
    if part is not None:  # one part of a file that several invocations filled (benchmarks/optimizers.py)
        section = read_json(path)["parts"][part]
        return [section, section["environment"]]
    found = []
    for record in _records(path):
        found.append(record)
        for key in ("run", "environment"):
            if isinstance(record.get(key), dict):
                found.append(record[key])
        for part in (record.get("parts") or {}).values():
            if isinstance(part, dict) and isinstance(part.get("environment"), dict):
                found.append(part["environment"])
    return found


def commands(paths: list[Path], part: str | None = None) -> list[str]:
    seen: list[str] = []
    for path in paths:
        for env in _environments(path, part):
            for key in ("command", "second_command"):
                if isinstance(env.get(key), str) and _shell(env[key]) not in seen:
                    seen.append(_shell(env[key]))
            for extra in env.get("extra_commands") or []:
                if _shell(extra) not in seen:
                    seen.append(_shell(extra))
    return seen


def machine(paths: list[Path], said: str | None, part: str | None = None) -> str:
    """The machine as the files record it (platform, torch, threads, load), after what the README says."""
    platforms, torches, threads, loads = set(), set(), set(), []
    for path in paths:
        for env in _environments(path, part):
            if env.get("platform"):
                m = re.match(r"(\w+)-.*?-(x86_64|aarch64|arm64)", env["platform"])
                platforms.add(f"{m[1]} {m[2]}" if m else env["platform"])
            for key in ("torch_version", "torch"):
                if isinstance(env.get(key), str):
                    torches.add(env[key])
            for key in ("num_threads", "threads"):
                if isinstance(env.get(key), int):
                    threads.add(env[key])
            for key in ("loadavg_before", "load_before"):
                if isinstance(env.get(key), list) and env[key]:
                    loads.append(env[key][0])
    parts = []
    if platforms:
        parts.append(", ".join(sorted(platforms)))
    if torches:
        parts.append("torch " + ", ".join(sorted(torches)))
    if threads:
        parts.append(" or ".join(str(t) for t in sorted(threads)) + " thread" + ("s" if max(threads) > 1 else ""))
    if loads:
        lo, hi = min(loads), max(loads)
        parts.append(f"load average {lo:.2g} before" if lo == hi else f"load average {lo:.2g}–{hi:.2g} before")
    recorded = "; ".join(parts)
    if said and recorded:
        return f"{said} ({recorded})"
    return said or recorded or "not recorded in the results file"


def caption(table: Table, paths: list[Path]) -> str:
    files = ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths)
    cmds = commands(paths, table.part) or ([table.command] if table.command else [])
    dates = sorted({measured_on(p) for p in paths})
    cmd = "; ".join(f"`{c}`" for c in cmds) if cmds else "not recorded"
    return (
        f"<small>Generated at build time from {files}. Command: {cmd}. "
        f"Measured: {', '.join(dates)}. Machine: {machine(paths, table.machine, table.part)}.</small>"
    )


TABLES: dict[str, Table] = {
    "pretraining": Table(("pretraining.json",), pretraining, machine=PROJECT_MACHINE),
    "pretraining-seeds": Table(("pretraining_1000.json",), pretraining_seeds, machine=PROJECT_MACHINE),
    "lenet-step-time": Table(("lenet_step_time.json",), lenet_step_time, machine=PROJECT_MACHINE),
    "step-time": Table(("step_time.json",), step_time, machine=PROJECT_MACHINE),
    "checkpoint-overhead": Table(("checkpoint_overhead.json",), checkpoint_overhead, machine=PROJECT_MACHINE),
    "inference": Table(("inference.json",), inference),
    "ddp-scaling": Table(("ddp_scaling.jsonl",), ddp_scaling, machine=PROJECT_MACHINE),
    "ddp-equivalence": Table(("ddp_scaling.jsonl",), ddp_equivalence, machine=PROJECT_MACHINE),
    "federated": Table(
        ("federated.jsonl",), federated, command="python benchmarks/federated.py (the options of each setting below)"
    ),
    "robustness": Table(
        ("robustness.jsonl",),
        lambda p: robustness(p, longer=False),
        command="python benchmarks/robustness.py --betas 0.075 0.3 --attack-limit 500 (vgg_small: --model vgg_small "
        "--datasets fashion-mnist --tau 0.3)",
    ),
    "robustness-longer": Table(
        ("robustness.jsonl",),
        lambda p: robustness(p, longer=True),
        command="python benchmarks/robustness.py --epochs 3|5 [--tau 0.15] --betas 0.075 --attack-limit 500",
    ),
    "tucker-lenet5": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: tucker(p, "lenet5", 1),
        command="python benchmarks/tucker_vs_matrix.py --epochs 1",
        machine=TUCKER_MACHINE,
    ),
    "tucker-vgg-small": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: tucker(p, "vgg_small", 1),
        command="python benchmarks/tucker_vs_matrix.py --model vgg_small --epochs 1 --limit 30000 "
        "--matrix-taus 0.1 0.2 0.3 --tucker-taus 0.1 0.2 0.3 --fixed-fractions 0.1 0.2 0.4",
        machine=TUCKER_MACHINE,
    ),
    "tucker-lenet5-3-epochs": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: tucker(p, "lenet5", 3),
        command="python benchmarks/tucker_vs_matrix.py --datasets fashion-mnist --epochs 3 --matrix-taus 0.45 "
        "--tucker-taus 0.25 0.3 --fixed-fractions",
        machine=TUCKER_MACHINE,
    ),
    "tucker-timing": Table(
        ("tucker_vs_matrix_timing_threads2.json", "tucker_vs_matrix_timing_threads1.json"),
        tucker_timing,
        machine=TUCKER_MACHINE,
    ),
    "rank-start": Table(
        ("rank_start.jsonl",),
        rank_start,
        command="python benchmarks/rank_start.py [--taus 0.2] [--conv tucker] [--model mlp --small 5 --taus 0.1]",
        machine=PROJECT_MACHINE + ", two runs at a time (one thread each)",
    ),
    "closure": Table(("closure.jsonl",), closure, machine="a shared 2-core machine (load 6–12)"),
    "finetune-all": Table(FT_ALL, finetune_sweep),
    "finetune-qv": Table(FT_QV, finetune_sweep),
    "finetune-all-gradient": Table(tuple(f"finetune_all_seed{s}_gradient_rule.json" for s in range(3)), finetune_sweep),
    "finetune-convention": Table(FT_CONVENTION, finetune_sweep),
    "finetune-fashion": Table(FT_FASHION, finetune_sweep),
    "finetune-budget": Table(
        tuple(dict.fromkeys(f for task, _, files in FT_BUDGETS for f in [*files, *FT_LORA[task]])),
        finetune_budget,
        machine=PROJECT_MACHINE + ", one thread per run",
    ),
    "finetune-second-moment": Table(
        tuple(FT_SECOND_MOMENT_RUNS), finetune_second_moment, machine=PROJECT_MACHINE + ", one thread per run"
    ),
    "finetune-init": Table(
        tuple(dict.fromkeys(f for task, _, files in FT_INITS for f in [*files, *FT_LORA[task]])),
        finetune_init,
        machine=PROJECT_MACHINE + ", one thread per run",
    ),
    "finetune-default": Table(
        (
            "finetune_default_seed0.json",
            *(
                f"finetune_default_seed0_{v}.json"
                for v in (
                    "head_lr_ratio02",
                    "head_lr_ratio01",
                    "head_lr_ratio1",
                    "head_lr_ratio02_init_random",
                    "coordinates_lr2e-4_head1e-3",
                    "lr2.5e-3_head1e-3",
                    "fixed_rank8_head_lr_ratio02",
                )
            ),
            *(f"finetune_default_seed{s}{v}.json" for s in DEFAULT_RUN_SEEDS[1:] for v in ("", "_head_lr_ratio02")),
            *(f"finetune_default_seed{s}_fixed_rank8.json" for s in FIXED_RANK_SEEDS),
        ),
        finetune_default,
    ),
    "finetune-default-paired": Table(
        (
            *(f"finetune_default_seed{s}{v}.json" for s in DEFAULT_RUN_SEEDS for v in ("", "_head_lr_ratio02")),
            *(f"finetune_default_seed{s}_fixed_rank8.json" for s in FIXED_RANK_SEEDS),
        ),
        finetune_default_paired,
    ),
    "finetune-timing": Table(
        tuple(f"finetune_all_timing_b{b}{t}.json" for t in ("_threads1", "") for b in (16, 32)), finetune_timing
    ),
    "optimizers-a": Table(("optimizers.json",), lambda p: optimizers_part(p, "a"), part="a"),
    "optimizers-b": Table(("optimizers.json",), lambda p: optimizers_part(p, "b"), part="b"),
    "optimizers-c": Table(("optimizers.json",), optimizers_c, part="c"),
    "optimizers-d": Table(("optimizers.json",), optimizers_d, part="d"),
}


def render(name: str) -> str:
    """The Markdown of table ``name``: the table, then its caption."""
    if name not in TABLES:
        raise KeyError(f"no results table {name!r}; known: {', '.join(sorted(TABLES))}")
    table = TABLES[name]
    paths = [RESULTS / f for f in table.files]
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"results table {name!r} needs {', '.join(missing)}")
    header, rows = table.build(paths)
    return markdown(header, rows) + "\n\n" + caption(table, paths)


def main(argv: list[str]) -> int:
    if not argv:
        print("\n".join(sorted(TABLES)))
        return 0
    for name in argv:
        print(render(name) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
