"""Results tables of the documentation site, generated from the files in ``benchmarks/results/``.

A page asks for a table with a marker ``<!-- results: NAME -->``; the site's build hook
(``scripts/docs/hooks.py``) replaces it with ``render(NAME)``: the table, then one line that
says which file it came from, the command that wrote it, the date it was measured (the date
of the file's last commit, or its modification date while uncommitted) and the machine.
Nothing here imports torch or dlrt: the tables are read from the files, never re-run.

    python scripts/docs/results.py                 # the names of all tables
    python scripts/docs/results.py step-time       # print one table as Markdown
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

#: What the README says these benchmarks ran on, where the results files do not record it.
PROJECT_MACHINE = "the project's 2-core CPU machine"
#: Where the Tucker comparison ran (its files do not record it).
TUCKER_MACHINE = "2 CPU cores (the project's machine)"
#: The ε of `dlrt robustness` in benchmarks/robustness.py (pixel units); the results file does not repeat them.
ROBUSTNESS_EPS = (0.01, 0.03, 0.05, 0.1)


@dataclass(frozen=True)
class Table:
    """One generated table: the files it reads and how it turns them into rows."""

    files: tuple[str, ...]
    build: Callable[[list[Path]], tuple[list[str], list[list[str]]]]
    command: str | None = None  # when the files do not record the command that wrote them
    machine: str | None = None  # what the README says the runs were measured on, when the files do not say
    part: str | None = None  # the part of a results file with several parts (benchmarks/optimizers.py)


# ------------------------------------------------------------------ helpers
def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(values)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def _int(x: float) -> str:
    return f"{round(x):,d}"


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


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
    return _jsonl(path) if path.suffix == ".jsonl" else [_json(path)]


def _environments(path: Path, part: str | None = None) -> list[dict[str, Any]]:
    """Every place in a results file that records how it was run (top level, per part, per run)."""
    if part is not None:  # one part of a file that several invocations filled (benchmarks/optimizers.py)
        section = _json(path)["parts"][part]
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


# ------------------------------------------------------------------ step time
def _lenet_step_time(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = _json(paths[0])
    names = {
        "dense": "dense",
        "bug": "`bug`",
        "parallel": "`parallel`",
        "parallel-conv1-dense": "`parallel`, conv1 left dense (`exclude=[head,conv1]`)",
    }
    steps = 469  # MNIST's 60,000 training images in batches of 128
    rows = [
        [names.get(k, k), f"{s:.4f}", f"{d['ratio_to_dense'][k]:.2f}", f"{s * steps:.1f}"]
        for k, s in d["medians_s"].items()
    ]
    return ["variant", "s/step", "vs dense", f"s/epoch ({steps} steps)"], rows


def _step_time(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = _json(paths[0])
    header = [
        "width",
        "dense s/step",
        "plain s/step",
        "parallel / plain",
        "bug / plain",
        "fixed / plain",
        "parallel, 4 coefficient steps / plain",
        "parallel / dense",
    ]
    rows = []
    for r in d["results"]:
        m, p = r["median_s"], r["ratio_to_plain"]
        rows.append(
            [
                str(r["width"]),
                f"{m['dense']:.3g}",
                f"{m['plain']:.3g}",
                f"{p['parallel']:.2f}",
                f"{p['bug']:.2f}",
                f"{p['fixed']:.2f}",
                f"{p['parallel-s4']:.2f}",
                f"{r['ratio_to_dense']['parallel']:.3g}",
            ]
        )
    return header, rows


# ------------------------------------------------------------------ data parallel
def _ring(payload: float, n: int) -> float:
    return 2 * (n - 1) / n * payload


def _kb(x: float) -> str:
    return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.0f} kB"


def _ddp_scaling(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by = {(r["model"], r["variant"], r["world"]): r for r in _jsonl(paths[0])}
    header = [
        "model",
        "bytes/step low-rank",
        "dense DDP",
        "ratio",
        "per process at N = 8 / 64 (ring)",
        "collectives/step",
        "samples/s, 1 → 2 processes, low-rank",
        "dense (DDP)",
    ]
    names = {"lenet5": "LeNet5", "mlp": "MLP 784-500×4-10"}
    rows = []
    for model in sorted({m for m, _, _ in by}):
        lr1, lr2 = by[(model, "dlrt", 1)], by[(model, "dlrt", 2)]
        dd1, dd2 = by[(model, "dense-ddp", 1)], by[(model, "dense-ddp", 2)]
        low, dense = sum(lr2["bytes_per_step"].values()), sum(dd2["bytes_per_step"].values())
        calls = sum(lr2.get("collectives_per_step", {}).values())
        rows.append(
            [
                names.get(model, model),
                _int(low),
                _int(dense),
                f"**{dense / low:.1f}×**",
                f"{_kb(_ring(low, 8))} / {_kb(_ring(low, 64))} (DDP {_kb(_ring(dense, 8))} / {_kb(_ring(dense, 64))})",
                f"{calls:g} (DDP 1)",
                f"{lr1['samples_per_s']:.0f} → {lr2['samples_per_s']:.0f} "
                f"({lr2['samples_per_s'] / lr1['samples_per_s']:.2f}×)",
                f"{dd1['samples_per_s']:.0f} → {dd2['samples_per_s']:.0f} "
                f"({dd2['samples_per_s'] / dd1['samples_per_s']:.2f}×)",
            ]
        )
    return header, rows


def _ddp_equivalence(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by = {(r["model"], r["variant"], r["world"]): r for r in _jsonl(paths[0])}
    rows = []
    for model in sorted({m for m, _, _ in by}):
        one, two = by[(model, "equivalence", 1)], by[(model, "equivalence", 2)]
        diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
        first, last = one["ranks"][0], one["ranks"][-1]
        rows.append(
            [
                model,
                str(len(one["losses"])),
                f"{'/'.join(map(str, first))} → {'/'.join(map(str, last))}",
                f"{diff:.1e}",
                "yes" if one["ranks"] == two["ranks"] else "**no**",
            ]
        )
    header = ["model", "steps", "ranks (1 process)", "largest loss difference", "same ranks at every step"]
    return header, rows


# ------------------------------------------------------------------ federated
_DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_FED_ORDER = ("fedavg", "fedlin", "fedlrt-full", "fedlrt-simplified", "fedlrt-none")
_FED_NAMES = {
    "fedavg": "FedAvg",
    "fedlin": "FedLin",
    "fedlrt-full": "FeDLRT, full correction",
    "fedlrt-simplified": "FeDLRT, simplified",
    "fedlrt-none": "FeDLRT, no correction",
}


def _fed_setting(r: dict[str, Any]) -> tuple:
    # Runs recorded before the gradient rank rule truncated by the relative rule.
    rule = r.get("tau_mode", "relative")
    return (r["model"], r["dataset"], r["clients"], str(r["alpha"]), r["rounds"], r["local_steps"], r["lr"], rule)


def _federated(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in _jsonl(paths[0]):
        label = r["method"] if r["method"] != "fedlrt" else f"fedlrt-{r['correction']}"
        groups.setdefault((*_fed_setting(r), r.get("grad_batches", 4)), {}).setdefault(label, []).append(r)

    def order(key: tuple) -> tuple:
        model, _, _, alpha, rounds, _, lr, rule, anchors = key
        return (model != "mlp", rounds, alpha != "iid", lr, rule != "gradient", anchors is None)

    header = ["setting", "method", "seeds", "final acc. %", "MB / client / round", "vs FedAvg"]
    header += ["GMAC / client / round", "vs FedAvg"]
    rows = []
    for key in sorted(groups, key=order):
        model, dataset, clients, alpha, rounds, steps, lr, rule, anchors = key
        by_method = groups[key]
        # FedAvg computes no anchor gradients and truncates nothing: a setting that differs only in them (or in
        # the server's rank rule) shares its FedAvg runs.
        base = by_method.get("fedavg") or next(
            (m["fedavg"] for k, m in groups.items() if k[:-2] == key[:-2] and "fedavg" in m), None
        )
        split = "IID" if alpha == "iid" else f"Dirichlet α {alpha}"
        where = (
            f"**{'MLP' if model == 'mlp' else 'LeNet5'} on {_DATASETS.get(dataset, dataset)}, {clients} clients, "
            f"{split}, lr {lr:g}, "
            f"{rounds} rounds × {steps} local steps"
            + (", exact anchor gradients" if anchors is None else "")
            + f", {rule} rank rule**"
        )
        for label in sorted(by_method, key=_FED_ORDER.index):
            rs = by_method[label]
            b = _mean(r["bytes_client_round"] for r in rs)
            m = _mean(r["macs_client_round"] for r in rs)
            bb = _mean(r["bytes_client_round"] for r in base) if base else float("nan")
            bm = _mean(r["macs_client_round"] for r in base) if base else float("nan")
            rows.append(
                [
                    where,
                    _FED_NAMES[label],
                    str(len(rs)),
                    _pct(_mean(r["test_acc"] for r in rs)),
                    f"{b / 1e6:.3f}",
                    f"{bb / b:.1f}×",
                    f"{m / 1e9:.3f}",
                    f"{bm / m:.1f}×",
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ robustness
def _robustness(paths: list[Path], longer: bool) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for r in _jsonl(paths[0]):
        if r["status"] != "completed" or (r["epochs"] > 1) != longer:
            continue
        setting = (r["model"], r["dataset"], r["epochs"], r["tau"])
        groups.setdefault(setting, {}).setdefault((r["method"], r["beta"]), []).append(r)
    eps = " / ".join(f"{e:g}" for e in ROBUSTNESS_EPS)
    header = ["setting", "method", "seeds", "clean", f"FGSM ε {eps}", f"PGD-10 ε {eps}", "compr.", "cond"]
    names = {"lenet5": "LeNet5", "vgg_small": "vgg_small", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
    rows = []
    for setting in sorted(groups, key=lambda s: (s[0], s[1] != "mnist", s[2], -s[3]) if not longer else (s[2], s[1])):
        model, dataset, epochs, tau = setting
        where = f"**{names[model]}, {names[dataset]}, {epochs} ep., τ {tau:g}**"
        for method, beta in sorted(groups[setting], key=lambda k: (["dense", "dlrt", "robust"].index(k[0]), k[1])):
            rs = groups[setting][(method, beta)]
            label = {"dense": "dense", "dlrt": "DLRT β 0"}.get(method, f"robust β {beta:g}")
            attacked = [
                " / ".join(f"{100 * _mean(r[attack][i] for r in rs):.1f}" for i in range(len(ROBUSTNESS_EPS)))
                for attack in ("fgsm", "pgd")
            ]
            compr = _mean(r["compression"] for r in rs)
            cond = [r["cond_mean"] for r in rs if r.get("cond_mean") is not None and r["cond_mean"] == r["cond_mean"]]
            rows.append(
                [
                    where,
                    label,
                    str(len(rs)),
                    _pct(_mean(r["clean_acc"] for r in rs)),
                    *attacked,
                    "0" if method == "dense" else f"{100 * compr:.1f} %",
                    f"{_mean(cond):.2f}" if cond else "—",
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ rank rule: the start
def _rank_start(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in _jsonl(paths[0]):
        start = "full" if str(r["rank"]) == "1.0" else str(r["rank"])
        key = (r["model"], r["conv"], r["tau"], r["tau_mode"], r.get("tau_grad"), r["epochs"])
        groups.setdefault(key, {}).setdefault(start, []).append(r)

    def ranks(rs: list[dict[str, Any]]) -> str:
        first = rs[0]["ranks"]
        parts = []
        for name, value in first.items():
            if isinstance(value, list):
                mean = [_mean(r["ranks"][name][i] for r in rs) for i in range(len(value))]
                parts.append("(" + ",".join(f"{m:.0f}" for m in mean) + ")")
            else:
                parts.append(f"{_mean(r['ranks'][name] for r in rs):.1f}")
        return "/".join(parts) if not any(isinstance(v, list) for v in first.values()) else " ".join(parts)

    header = ["setting", "start", "seeds", "test acc. %", "compression %", "first epoch s", "final ranks (mean)"]
    rows = []
    for (model, conv, tau, rule, tau_grad, epochs), starts in sorted(groups.items(), key=str):
        grad = "" if tau_grad is None else f", tau_grad {tau_grad:g}"
        where = f"**{'LeNet5' if model == 'lenet5' else 'MLP'} ({conv}), τ {tau:g} ({rule}{grad}), {epochs} epochs**"
        for start in sorted(starts, key=lambda s: (s == "full", s)):
            rs = starts[start]
            rows.append(
                [
                    where,
                    "full rank" if start == "full" else f"rank {start}",
                    str(len(rs)),
                    _pct(_mean(r["final_acc"] for r in rs)),
                    f"{100 * _mean(r['compression'] for r in rs):.1f}",
                    f"{_mean(r['epoch_seconds'][0] for r in rs):.1f}",
                    ranks(rs),
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ Tucker
def _tucker_groups(path: Path) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in _jsonl(path):
        if r["status"] == "completed":
            key = (r.get("model", "lenet5"), r["epochs"], r["dataset"], r["method"], float(r["setting"]))
            groups.setdefault(key, []).append(r)
    return groups


def _tucker_ranks(ranks: dict[str, Any], method: str) -> str:
    if not ranks:
        return "—"
    if method == "tucker":
        return " ".join("(" + ",".join(map(str, v)) + ")" for v in ranks.values())
    return "/".join(str(v) for v in ranks.values()) if method == "matrix" else "—"


def _tucker(paths: list[Path], model: str, epochs: int) -> tuple[list[str], list[list[str]]]:
    groups = _tucker_groups(paths[0])
    datasets = [d for d in ("mnist", "fashion-mnist") if any(k[:3] == (model, epochs, d) for k in groups)]
    names = {"mnist": "MNIST", "fashion-mnist": "Fashion"}
    header = ["method"]
    for d in datasets:
        header += [f"{names[d]} acc. (mean ± sd)", "conv params", "ranks (seed 0)"]
    labels = {"dense": "dense", "matrix": "matrix τ {:g}", "tucker": "**Tucker τ {:g}**"}
    labels["fixed"] = "fixed Tucker f {:g}"
    settings = sorted(
        {(k[3], k[4]) for k in groups if k[:2] == (model, epochs)},
        key=lambda s: (["dense", "matrix", "tucker", "fixed"].index(s[0]), s[1]),
    )
    rows = []
    for method, setting in settings:
        row = [labels[method].format(setting)]
        for d in datasets:
            rs = groups.get((model, epochs, d, method, setting))
            if not rs:
                row += ["—", "—", "—"]
                continue
            accs = [100 * r["test_acc"] for r in rs]
            seed0 = min(rs, key=lambda r: r["seed"])
            row += [
                f"{_mean(accs):.2f} ± {_sd(accs):.2f}" + ("" if len(rs) == 3 else f" ({len(rs)} seeds)"),
                _int(_mean(r["conv_params"] for r in rs)),
                _tucker_ranks(seed0["ranks"], method),
            ]
        rows.append(row)
    return header, rows


def _tucker_timing(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for path in sorted(paths, key=lambda p: -_json(p)["threads"]):
        d = _json(path)
        s = d["seconds_per_step"]
        rows.append(
            [
                str(d["threads"]),
                f"{s['dense']:.4f}",
                f"{s['matrix']:.4f}",
                f"{s['tucker']:.4f}",
                f"**{d['tucker_over_matrix']:.2f}**",
                f"{d['tucker_over_dense']:.2f}",
            ]
        )
    return ["threads", "dense s/step", "matrix", "Tucker", "**Tucker / matrix**", "Tucker / dense"], rows


# ------------------------------------------------------------------ closures
def _closure(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    runs = sorted(
        _jsonl(paths[0]),
        key=lambda r: (r["order"], r["model"] != "icnn", r["width"], -r["epochs"], r.get("loss_u", 1.0)),
    )
    header = ["closure", "epochs", "u err", "α err", "h err", "speed-up vs Newton", "solver L² source"]
    header += ["solver L² periodic", "parameters (KiB f32)"]
    rows = []
    for r in runs:
        name = f"M{r['order']} " + ("ICNN" if r["model"] == "icnn" else "α-network (baseline)")
        name += f" w{r['width']}" + (f", u-loss ×{r['loss_u']:g}" if r.get("loss_u", 1.0) != 1.0 else "")
        s = r["solver"]
        rows.append(
            [
                name,
                str(r["epochs"]),
                f"{r['test_u_err']:.1e}",
                f"{r['test_alpha_err']:.1e}",
                f"{r['test_h_err']:.1e}",
                f"{r['speedup']:.1f}×",
                f"{s['source']['rel_l2']:.1e}",
                f"{s['periodic']['rel_l2']:.1e}",
                f"{r['parameters']:,d} ({r['model_bytes_float32'] / 1024:.1f})",
            ]
        )
    return header, rows


# ------------------------------------------------------------------ fine-tuning
_LRS = (1e-4, 5e-4, 1e-3, 5e-3)
_FT_NAMES = {"geolora": "GeoLoRA (defaults)", "lora": "PEFT LoRA r 8", "adalora": "PEFT AdaLoRA", "full": "full"}


def _finetune_runs(paths: list[Path]) -> dict[tuple[str, int, float], dict[str, Any]]:
    runs = {}
    for path in paths:
        for r in _json(path)["runs"]:
            if r["status"] == "completed":
                runs[(r["method"], r["config"]["seed"], r["lr"])] = r
    return runs


def _finetune_sweep(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    runs = _finetune_runs(paths)
    header = ["method", "seed", *(_lr(lr) for lr in _LRS), "adapter params (best lr)"]
    rows = []
    for method in [m for m in ("geolora", "lora", "adalora") if any(k[0] == m for k in runs)]:
        seeds = sorted({k[1] for k in runs if k[0] == method})
        cells, means = [], []
        for lr in _LRS:
            accs = [runs[(method, s, lr)]["test_acc"] if (method, s, lr) in runs else None for s in seeds]
            cells.append(" / ".join("—" if a is None else _pct(a) for a in accs) if any(accs) else "—")
            got = [a for a in accs if a is not None]
            means.append(_mean(got) if len(got) == len(seeds) and len(seeds) > 1 else None)
        full = [lr for lr in _LRS if all((method, s, lr) in runs for s in seeds)]
        best = max(full, key=lambda lr: _mean(runs[(method, s, lr)]["test_acc"] for s in seeds)) if full else None
        params = " / ".join(_int(runs[(method, s, best)]["adapter_params"]) for s in seeds) if best is not None else "—"
        rows.append([_FT_NAMES[method], " / ".join(map(str, seeds)), *cells, params])
        if len(seeds) > 1 and any(m is not None for m in means):
            top = max(m for m in means if m is not None)
            rows.append(
                ["", "mean"] + ["" if m is None else (f"**{_pct(m)}**" if m == top else _pct(m)) for m in means] + [""]
            )
    return header, rows


def _finetune_default(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = _json(paths[0])
    rows = []
    for r in d["runs"]:
        rows.append(
            [
                _FT_NAMES.get(r["method"], r["method"]).replace(" (defaults)", ""),
                _lr(r["lr"]),
                _pct(r["test_acc"]) + " %",
                f"{r['total_rank']} (at most {r['max_total_rank']})",
                _int(r["adapter_params"]),
            ]
        )
    return ["method", "lr", "test accuracy", "final total rank", "adapter params"], rows


def _finetune_timing(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for path in paths:
        d = _json(path)
        t, peak = d["timing"], d["peak_bytes"]
        where = {"qv": "query/value", "all": "all linear layers"}[d["args"]["targets"]]
        rows.append(
            [
                where,
                str(d["args"]["batch_size"]),
                str(d["args"].get("threads") or "all"),
                f"{t['geolora']:.3f}",
                f"{t['lora']:.3f}",
                f"{t['adalora']:.3f}",
                f"{t['geolora'] / t['lora']:.2f}× / {t['geolora'] / t['adalora']:.2f}×",
                " / ".join(f"{peak[m] / 2**20:.0f}" for m in ("geolora", "lora", "adalora")),
            ]
        )
    header = ["adapters on", "batch", "threads", "GeoLoRA s/step", "LoRA", "AdaLoRA", "GeoLoRA vs LoRA / AdaLoRA"]
    return [*header, "peak MiB (GeoLoRA / LoRA / AdaLoRA)"], rows


# ------------------------------------------------------------------ optimizers
_OPT_NAMES = {
    "autograd-adam": "autograd factorization, Adam",
    "autograd-heavyball": "autograd factorization, heavy-ball",
    "sgd": "`bug`, SGD",
    "sgd-momentum": "`bug`, per-entry SGD momentum",
    "adam": "`bug`, per-entry Adam",
    "geo-heavyball": "`bug`, geo-heavyball",
    "geo-adam": "`bug`, geo-adam",
    "abc/sgd-momentum": "`abc`, per-entry SGD momentum",
    "abc/geo-heavyball": "`abc`, geo-heavyball",
}


def _optimizers_part(paths: list[Path], part: str) -> tuple[list[str], list[list[str]]]:
    p = _json(paths[0])["parts"][part]
    rows = []
    for method, best in p["best"].items():
        steps = best.get("steps_to_target")
        row = [_OPT_NAMES.get(method, method), f"{best['lr']:g}", "not reached" if steps is None else str(steps)]
        row.append(f"{best['final_rel_loss']:.2e}" if part == "a" else _pct(best["test_acc"]) + " %")
        rows.append(row)
    last = "final rel. loss" if part == "a" else "test acc."
    target = f"{p['problem']['target']:g}" if part == "a" else f"{p['setting']['target']:g}"
    return ["method", "best lr", f"steps to {target}", last], rows


def _optimizers_c(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    c = _json(paths[0])["parts"]["c"]
    names = {"adalora/adamw": "AdaLoRA", "geolora/geo-adam": "GeoLoRA, **geo-adam**"}
    header = ["method", *(_lr(lr) for lr in _LRS), "adapter params at the best lr"]
    rows = []
    for method, s in c["summary"].items():
        per = s["per_lr"]
        seeds = sorted({seed for v in per.values() for seed in v["seeds"]})
        name = names.get(method, "GeoLoRA, " + method.split("/")[1])
        if len(seeds) < 3:
            name += f" (seeds {' / '.join(map(str, seeds))} only)"
        cells = [" / ".join(_pct(a) for a in per[str(lr)]["accs"]) if str(lr) in per else "—" for lr in _LRS]
        best = per.get(str(s["best_lr"]), {})
        params = best.get("adapter_params")
        rows.append([name, *cells, "—" if params is None else f"{_int(params)} (mean; {_lr(s['best_lr'])})"])
        means = [per[str(lr)]["mean"] if str(lr) in per else None for lr in _LRS]
        top = max(m for m in means if m is not None)
        rows.append(["", *("" if m is None else (f"**{_pct(m)}**" if m == top else _pct(m)) for m in means), ""])
    return header, rows


def _optimizers_d(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = _json(paths[0])["parts"]["d"]
    rows = []
    for c in d["configs"]:
        cfg = dict(kv.split("=") for kv in c["config"].split(","))
        low, full = c["low"], c["full"]
        rows.append(
            [
                f"{cfg['optimizer']} {cfg['lr']}, {cfg.get('coefficient_steps', '1')}",
                " / ".join(str(v) for v in low["ranks"].values()),
                " / ".join(str(v) for v in full["ranks"].values()),
                _pct(low["test_acc"]) + " %",
                _pct(full["test_acc"]) + " %",
            ]
        )
    header = ["optimizer, lr, coefficient steps", "ranks from 2 (conv1/conv2/fc1)", "ranks from full"]
    return [*header, "test acc. from 2", "from full"], rows


# ------------------------------------------------------------------ registry
_FT_ALL = (
    *(f"finetune_all_seed{s}.json" for s in range(3)),
    "finetune_all_seed0_adalora.json",
    "finetune_all_seed0_adalora_low.json",
    "finetune_all_seed0_lora.json",
)
_FT_CONVENTION = ("finetune_convention_all_seed0.json",)
_FT_FASHION = tuple(f"finetune_fashion_seed{s}.json" for s in range(3))
_FT_QV = tuple(f"finetune_qv_seed{s}.json" for s in range(3))


#: GeoLoRA's budget variants at its default lr (5e-3) against LoRA's best-lr mean, per task:
#: (task, budget, GeoLoRA's files, LoRA's files). The tables read every file named here.
_FT_BUDGETS = (
    ("Rotten Tomatoes, all linear", "rank (288)", [f"finetune_all_seed{s}_gradient_rule.json" for s in range(3)]),
    ("Rotten Tomatoes, all linear", "params", [f"finetune_all_seed{s}_param_budget.json" for s in range(3)]),
    (
        "Rotten Tomatoes, all linear",
        "params, energy order",
        [f"finetune_all_seed{s}_param_budget_energy.json" for s in range(3)],
    ),
    ("Convention party, all linear", "rank (288)", ["finetune_convention_all_seed0.json"]),
    ("Convention party, all linear", "params", ["finetune_convention_all_seed0_param_budget.json"]),
    ("Fashion-MNIST CNN", "rank (24)", list(_FT_FASHION)),
    ("Fashion-MNIST CNN", "params", [f"finetune_fashion_seed{s}_param_budget.json" for s in range(3)]),
)
_FT_LORA = {
    "Rotten Tomatoes, all linear": [*(f"finetune_all_seed{s}.json" for s in range(3)), "finetune_all_seed0_lora.json"],
    "Convention party, all linear": ["finetune_convention_all_seed0.json"],
    "Fashion-MNIST CNN": list(_FT_FASHION),
}


def _geolora_against_lora(
    by_name: dict[str, Path], task: str, files: list[str]
) -> tuple[list[int], list[float], list[int], float, float, int]:
    """GeoLoRA at 5e-3 in ``files`` against LoRA's runs of ``task`` on the same seeds: the seeds, GeoLoRA's
    accuracies and adapter parameters per seed, LoRA's best lr, its mean accuracy and adapter parameters."""
    geo = _finetune_runs([by_name[f] for f in files])
    lora = _finetune_runs([by_name[f] for f in _FT_LORA[task]])
    seeds = sorted({k[1] for k in geo if k[0] == "geolora" and k[2] == 5e-3})
    accs = [geo[("geolora", s, 5e-3)]["test_acc"] for s in seeds]
    params = [geo[("geolora", s, 5e-3)]["adapter_params"] for s in seeds]
    lrs = [lr for lr in _LRS if all(("lora", s, lr) in lora for s in seeds)]
    best_lr = max(lrs, key=lambda lr: _mean(lora[("lora", s, lr)]["test_acc"] for s in seeds))
    best = _mean(lora[("lora", s, best_lr)]["test_acc"] for s in seeds)
    return seeds, accs, params, best_lr, best, lora[("lora", seeds[0], lrs[0])]["adapter_params"]


def _finetune_budget(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by_name = {p.name: p for p in paths}
    header = ["task", "GeoLoRA budget", "GeoLoRA at 5e-3 (seed 0 / 1 / 2)", "mean", "adapter params"]
    header += ["LoRA best lr: mean", "GeoLoRA − LoRA"]
    rows = []
    for task, budget, files in _FT_BUDGETS:
        _, accs, params, _, best, lora_params = _geolora_against_lora(by_name, task, files)
        rows.append(
            [
                task,
                budget,
                " / ".join(_pct(a) for a in accs),
                _pct(_mean(accs)),
                f"{_int(max(params))} (LoRA {_int(lora_params)})",
                _pct(best),
                f"{100 * (_mean(accs) - best):+.2f}",
            ]
        )
    return header, rows


#: GeoLoRA's adapter initialisations at its default lr (5e-3), all else at the defaults (the parameter budget),
#: against LoRA's best-lr mean on the same seeds: (task, init, GeoLoRA's files). LoRA's files: _FT_LORA.
_FT_INITS = (
    (
        "Rotten Tomatoes, all linear",
        "gradient (default)",
        [f"finetune_all_seed{s}_param_budget.json" for s in range(3)],
    ),
    ("Rotten Tomatoes, all linear", "random", [f"finetune_all_seed{s}_init_random.json" for s in range(3)]),
    ("Convention party, all linear", "gradient (default)", ["finetune_convention_all_seed0_param_budget.json"]),
    ("Convention party, all linear", "random", ["finetune_convention_all_seed0_init_random.json"]),
    ("Fashion-MNIST CNN", "gradient (default)", [f"finetune_fashion_seed{s}_param_budget.json" for s in range(3)]),
    ("Fashion-MNIST CNN", "random", [f"finetune_fashion_seed{s}_init_random.json" for s in range(3)]),
)


def _finetune_init(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by_name = {p.name: p for p in paths}
    header = ["task", "init", "seeds", "GeoLoRA at 5e-3", "mean", "adapter params", "LoRA best lr: mean, same seeds"]
    header += ["GeoLoRA − LoRA"]
    rows = []
    for task, init, files in _FT_INITS:
        seeds, accs, params, best_lr, best, _ = _geolora_against_lora(by_name, task, files)
        rows.append(
            [
                task,
                f"`{init.split()[0]}`" + init[len(init.split()[0]) :],
                " / ".join(map(str, seeds)),
                " / ".join(_pct(a) for a in accs),
                _pct(_mean(accs)),
                " / ".join(_int(p) for p in params),
                f"{_pct(best)} ({_lr(best_lr)})",
                f"{100 * (_mean(accs) - best):+.2f}",
            ]
        )
    return header, rows


def _checkpoint_overhead(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = _json(paths[0])
    header = ["checkpoint_every", "checkpoints", "kB each", "median write (ms)", "writes (s)", "CSV (s)"]
    header += ["run (s)", "share of the run"]
    rows = [
        [
            str(r["checkpoint_every"]),
            str(r["checkpoints"]),
            _int(r["checkpoint_bytes"] / 1e3),
            f"{r['median_checkpoint_ms']:.1f}",
            f"{r['checkpoint_seconds']:.2f}",
            f"{r['csv_seconds']:.2f}",
            f"{r['wall_seconds']:.1f}",
            f"{_pct(r['overhead_share'])} %",
        ]
        for r in d["results"]
    ]
    return header, rows


def _inference(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """benchmarks/inference.py: the exported model's speed-up over dense (MiniLM: merged and unmerged over the base)."""
    header = ["model", "test acc", "compression", "form", "batch", "eager", "torch.compile", "onnxruntime"]
    header += ["compiled / eager", ".pt2 size (MB)"]
    rows = []

    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}×"

    for model, r in _json(paths[0])["models"].items():
        ref = r["reference"]
        forms = ["merged", "unmerged"] if model == "minilm" else ["flops", "measured"]
        for form in forms:
            for batch, e in r["batches"].items():
                shown = e["forms"][form].get("same_as", form)
                if form == "measured" and shown != form:
                    continue  # the same modules as another rule's: timed once, shown once
                speed = {b: v.get("speedup", {}).get(shown) for b, v in e["backends"].items()}
                comp = e["backends"].get("compile", {}).get("compile_vs_eager", {}).get(shown)
                files = r["files"].get(shown, {}).get("bytes", {})
                ref_pt2 = r["files"].get(ref, {}).get("bytes", {}).get("pt2")
                size = f"{ref_pt2 / 1e6:.2f} → {files['pt2'] / 1e6:.2f}" if files.get("pt2") and ref_pt2 else "–"
                rows.append(
                    [
                        model,
                        "–" if r["test_acc"] is None else f"{_pct(r['test_acc'])} %",
                        "–" if model == "minilm" or r["compression"] is None else f"{_pct(r['compression'], 1)} %",
                        f"{form} (vs {ref})",
                        batch,
                        x(speed.get("eager")),
                        x(speed.get("compile")),
                        x(speed.get("onnxruntime")),
                        x(comp),
                        size,
                    ]
                )
    return header, rows


def _pretraining(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """benchmarks/pretraining.py: per method and seed, the figure and its ratio to dense of the same run."""
    header = ["method", "seed", "val. ppl", "projection weights", "optimizer state", "peak memory", "s/step"]
    header.append("steps to dense's final loss")

    def cell(r: dict[str, Any], key: str, text: str) -> str:
        ratio = (r.get("ratio_to_dense") or {}).get(key)
        return text if r["method"] == "dense" or ratio is None else f"{text} (×{ratio:.2f})"

    rows = []
    for r in _json(paths[0])["records"]:
        if r["status"] != "completed":
            rows.append([r["method"], str(r["seed"]), r["status"], "", "", "", "", ""])
            continue
        rank = r.get("fixed_rank") or r.get("projection_rank")
        name = f"{r['method']} (rank {rank})" if rank else r["method"]
        rows.append(
            [
                name,
                str(r["seed"]),
                cell(r, "val_ppl", f"{r['val_ppl']:.2f}"),
                cell(r, "projection_params", _int(r["projection_params"])),
                cell(r, "optimizer_state_bytes", f"{r['optimizer_state_bytes'] / 1e6:.2f} MB"),
                cell(r, "peak_bytes", f"{r['peak_bytes'] / 1e6:.1f} MB"),
                cell(r, "s_per_step", f"{r['s_per_step']:.3f}"),
                str(r.get("steps_to_dense_final_loss") or "not reached"),
            ]
        )
    return header, rows


TABLES: dict[str, Table] = {
    "pretraining": Table(("pretraining.json",), _pretraining, machine=PROJECT_MACHINE),
    "lenet-step-time": Table(("lenet_step_time.json",), _lenet_step_time, machine=PROJECT_MACHINE),
    "step-time": Table(("step_time.json",), _step_time, machine=PROJECT_MACHINE),
    "checkpoint-overhead": Table(("checkpoint_overhead.json",), _checkpoint_overhead, machine=PROJECT_MACHINE),
    "inference": Table(("inference.json",), _inference),
    "ddp-scaling": Table(("ddp_scaling.jsonl",), _ddp_scaling, machine=PROJECT_MACHINE),
    "ddp-equivalence": Table(("ddp_scaling.jsonl",), _ddp_equivalence, machine=PROJECT_MACHINE),
    "federated": Table(
        ("federated.jsonl",), _federated, command="python benchmarks/federated.py (the options of each setting below)"
    ),
    "robustness": Table(
        ("robustness.jsonl",),
        lambda p: _robustness(p, longer=False),
        command="python benchmarks/robustness.py --betas 0.075 0.3 --attack-limit 500 (vgg_small: --model vgg_small "
        "--datasets fashion-mnist --tau 0.3)",
    ),
    "robustness-longer": Table(
        ("robustness.jsonl",),
        lambda p: _robustness(p, longer=True),
        command="python benchmarks/robustness.py --epochs 3|5 [--tau 0.15] --betas 0.075 --attack-limit 500",
    ),
    "tucker-lenet5": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: _tucker(p, "lenet5", 1),
        command="python benchmarks/tucker_vs_matrix.py --epochs 1",
        machine=TUCKER_MACHINE,
    ),
    "tucker-vgg-small": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: _tucker(p, "vgg_small", 1),
        command="python benchmarks/tucker_vs_matrix.py --model vgg_small --epochs 1 --limit 30000 "
        "--matrix-taus 0.1 0.2 0.3 --tucker-taus 0.1 0.2 0.3 --fixed-fractions 0.1 0.2 0.4",
        machine=TUCKER_MACHINE,
    ),
    "tucker-lenet5-3-epochs": Table(
        ("tucker_vs_matrix.jsonl",),
        lambda p: _tucker(p, "lenet5", 3),
        command="python benchmarks/tucker_vs_matrix.py --datasets fashion-mnist --epochs 3 --matrix-taus 0.45 "
        "--tucker-taus 0.25 0.3 --fixed-fractions",
        machine=TUCKER_MACHINE,
    ),
    "tucker-timing": Table(
        ("tucker_vs_matrix_timing_threads2.json", "tucker_vs_matrix_timing_threads1.json"),
        _tucker_timing,
        machine=TUCKER_MACHINE,
    ),
    "rank-start": Table(
        ("rank_start.jsonl",),
        _rank_start,
        command="python benchmarks/rank_start.py [--taus 0.2] [--conv tucker] [--model mlp --small 5 --taus 0.1]",
        machine=PROJECT_MACHINE + ", two runs at a time (one thread each)",
    ),
    "closure": Table(("closure.jsonl",), _closure, machine="a shared 2-core machine (load 6–12)"),
    "finetune-all": Table(_FT_ALL, _finetune_sweep),
    "finetune-qv": Table(_FT_QV, _finetune_sweep),
    "finetune-all-gradient": Table(
        tuple(f"finetune_all_seed{s}_gradient_rule.json" for s in range(3)), _finetune_sweep
    ),
    "finetune-convention": Table(_FT_CONVENTION, _finetune_sweep),
    "finetune-fashion": Table(_FT_FASHION, _finetune_sweep),
    "finetune-budget": Table(
        tuple(dict.fromkeys(f for task, _, files in _FT_BUDGETS for f in [*files, *_FT_LORA[task]])),
        _finetune_budget,
        machine=PROJECT_MACHINE + ", one thread per run",
    ),
    "finetune-init": Table(
        tuple(dict.fromkeys(f for task, _, files in _FT_INITS for f in [*files, *_FT_LORA[task]])),
        _finetune_init,
        machine=PROJECT_MACHINE + ", one thread per run",
    ),
    "finetune-default": Table(("finetune_default_seed0.json",), _finetune_default),
    "finetune-timing": Table(
        tuple(f"finetune_all_timing_b{b}{t}.json" for t in ("_threads1", "") for b in (16, 32)), _finetune_timing
    ),
    "optimizers-a": Table(("optimizers.json",), lambda p: _optimizers_part(p, "a"), part="a"),
    "optimizers-b": Table(("optimizers.json",), lambda p: _optimizers_part(p, "b"), part="b"),
    "optimizers-c": Table(("optimizers.json",), _optimizers_c, part="c"),
    "optimizers-d": Table(("optimizers.json",), _optimizers_d, part="d"),
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
