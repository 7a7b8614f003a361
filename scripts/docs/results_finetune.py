"""Results tables of the GeoLoRA page (``docs/methods/geolora.md``): the fine-tuning sweeps, their timing, and
GeoLoRA's budgets and initialisations against LoRA (``TABLES`` in ``results.py``)."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from results_common import FINETUNE_LRS, int_text, lr_text, pct_text, read_json

# ------------------------------------------------------------------ fine-tuning
_FT_NAMES = {"geolora": "GeoLoRA (defaults)", "lora": "PEFT LoRA r 8", "adalora": "PEFT AdaLoRA", "full": "full"}


def _finetune_runs(paths: list[Path]) -> dict[tuple[str, int, float], dict[str, Any]]:
    runs = {}
    for path in paths:
        for r in read_json(path)["runs"]:
            if r["status"] == "completed":
                runs[(r["method"], r["config"]["seed"], r["lr"])] = r
    return runs


def finetune_sweep(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    runs = _finetune_runs(paths)
    header = ["method", "seed", *(lr_text(lr) for lr in FINETUNE_LRS), "adapter params (best lr)"]
    rows = []
    for method in [m for m in ("geolora", "lora", "adalora") if any(k[0] == m for k in runs)]:
        seeds = sorted({k[1] for k in runs if k[0] == method})
        cells, means = [], []
        for lr in FINETUNE_LRS:
            accs = [runs[(method, s, lr)]["test_acc"] if (method, s, lr) in runs else None for s in seeds]
            cells.append(" / ".join("—" if a is None else pct_text(a) for a in accs) if any(accs) else "—")
            got = [a for a in accs if a is not None]
            means.append(fmean(got) if len(got) == len(seeds) and len(seeds) > 1 else None)
        full = [lr for lr in FINETUNE_LRS if all((method, s, lr) in runs for s in seeds)]
        best = max(full, key=lambda lr: fmean(runs[(method, s, lr)]["test_acc"] for s in seeds)) if full else None
        params = (
            " / ".join(int_text(runs[(method, s, best)]["adapter_params"]) for s in seeds) if best is not None else "—"
        )
        rows.append([_FT_NAMES[method], " / ".join(map(str, seeds)), *cells, params])
        if len(seeds) > 1 and any(m is not None for m in means):
            top = max(m for m in means if m is not None)
            rows.append(
                ["", "mean"]
                + ["" if m is None else (f"**{pct_text(m)}**" if m == top else pct_text(m)) for m in means]
                + [""]
            )
    return header, rows


def finetune_default(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """The default run's GeoLoRA and LoRA, and GeoLoRA's variants of it (the keys they set), per seed."""
    rows = []
    for r in (r for path in paths for r in read_json(path)["runs"]):
        name = _FT_NAMES.get(r["method"], r["method"]).replace(" (defaults)", "")
        rows.append(
            [
                str(r["config"]["seed"]),
                name + "".join(f", `{item}`" for item in r.get("set", []) if not item.startswith(("lr=", "modules_"))),
                lr_text(r["lr"]),
                lr_text(r["lr"] * r["config"]["modules_to_save_lr_ratio"]),
                pct_text(r["test_acc"]) + " %",
                f"{r['total_rank']} (at most {r['max_total_rank']})",
                int_text(r["adapter_params"]),
            ]
        )
    return ["seed", "method", "lr", "the head's lr", "test accuracy", "final total rank", "adapter params"], rows


def seed_text(seeds: list[int]) -> str:
    """``0–4`` for a run of consecutive seeds, ``0 / 2 / 5`` otherwise."""
    return f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else " / ".join(map(str, seeds))


def finetune_default_paired(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """GeoLoRA's default run and each variant of it run on two seeds or more, paired with LoRA's default run on
    the same seeds: the means, and the mean of the per-seed differences with its standard error."""
    lora: dict[int, float] = {}
    geo: dict[tuple[str, ...], dict[int, float]] = {}
    for r in (r for path in paths for r in read_json(path)["runs"]):
        if r["status"] != "completed":
            continue
        if r["method"] == "lora":
            lora[r["config"]["seed"]] = r["test_acc"]
        elif r["method"] == "geolora":
            geo.setdefault(tuple(r.get("set", [])), {})[r["config"]["seed"]] = r["test_acc"]
    rows = []
    for keys, by_seed in sorted(geo.items(), key=lambda kv: (len(kv[0]), kv[0])):
        seeds = sorted(s for s in by_seed if s in lora)
        if len(seeds) < 2:
            continue
        diffs = [by_seed[s] - lora[s] for s in seeds]
        spread = stdev(diffs) / len(diffs) ** 0.5
        rows.append(
            [
                ", ".join(f"`{k}`" for k in keys) or "defaults",
                seed_text(seeds),
                pct_text(fmean(by_seed[s] for s in seeds)),
                pct_text(fmean(lora[s] for s in seeds)),
                " / ".join(f"{100 * d:+.2f}" for d in diffs),
                f"{100 * fmean(diffs):+.2f} ± {100 * spread:.2f}",
                f"{sum(d >= 0 for d in diffs)} of {len(diffs)}",
            ]
        )
    header = ["GeoLoRA", "seeds", "GeoLoRA mean", "LoRA mean", "GeoLoRA − LoRA per seed", "mean ± s.e."]
    return [*header, "GeoLoRA ≥ LoRA"], rows


def finetune_timing(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for path in paths:
        d = read_json(path)
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


def finetune_second_moment(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Per task, method, geo-adam's second moment (from ``--geolora-set``) and lr: the accuracy of every seed
    and their mean (GeoLoRA's per-rank and per-coordinate second moments against LoRA)."""
    tasks = {"fashion-mnist": "Fashion-MNIST CNN", "rotten-tomatoes": "Rotten Tomatoes, all linear"}
    cells: dict[tuple[str, str, str, float], dict[int, dict[str, Any]]] = {}
    for path in paths:
        d = read_json(path)
        methods = FT_SECOND_MOMENT_RUNS[path.name]
        sets = dict(kv.split("=", 1) for kv in d["args"].get("geolora_set") or [])
        task = tasks[d["args"].get("task") or "rotten-tomatoes"]
        for r in d["runs"]:
            if r["status"] != "completed" or r["method"] not in methods:
                continue
            setting = "–"
            if r["method"] == "geolora":
                setting = sets.get("second_moment", "rank") + (
                    f", head at {float(sets['modules_to_save_lr_ratio']):g} × lr"
                    if "modules_to_save_lr_ratio" in sets
                    else ""
                )
            cells.setdefault((task, r["method"], setting, r["lr"]), {})[r["config"]["seed"]] = r
    header = ["task", "method", "second moment", "lr", "seeds", "test acc. per seed", "mean", "adapter params (mean)"]
    rows = []
    for (task, method, setting, lr), by_seed in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "geolora", kv[0][1:])
    ):
        seeds = sorted(by_seed)
        accs = [by_seed[s]["test_acc"] for s in seeds]
        rows.append(
            [
                task,
                _FT_NAMES[method].replace(" (defaults)", ""),
                setting,
                lr_text(lr),
                " / ".join(map(str, seeds)) if len(seeds) <= 3 else f"{seeds[0]}–{seeds[-1]}",
                " / ".join(pct_text(a) for a in accs),
                pct_text(fmean(accs)),
                int_text(fmean(by_seed[s]["adapter_params"] for s in seeds)),
            ]
        )
    return header, rows


# ------------------------------------------------------------------ the files the tables read
FT_ALL = (
    *(f"finetune_all_seed{s}.json" for s in range(3)),
    "finetune_all_seed0_adalora.json",
    "finetune_all_seed0_adalora_low.json",
    "finetune_all_seed0_lora.json",
)
#: Seed 0's GeoLoRA at 5e-3 under the parameter budget (the default since) replaces its sweep's run, which had the
#: rank budget; seeds 1 and 2 ran under the parameter budget throughout.
FT_CONVENTION = (
    "finetune_convention_all_seed0.json",
    "finetune_convention_all_seed0_param_budget.json",
    "finetune_convention_all_seed1.json",
    "finetune_convention_all_seed2.json",
)
FT_FASHION = tuple(f"finetune_fashion_seed{s}.json" for s in range(3))
FT_QV = tuple(f"finetune_qv_seed{s}.json" for s in range(3))
#: The seeds of `dlrt finetune`'s default run (`--default-run`), with and without the head at LoRA's rate,
#: and the seeds of its variant with every adapter held at rank 8.
DEFAULT_RUN_SEEDS = (0, 1, 2, 3, 4)
FIXED_RANK_SEEDS = (0, 1)
#: geo-adam's second moment per rank (the default) and per coordinate, with LoRA on the same seeds: each file
#: with the methods the table takes from it (the Rotten Tomatoes sweep files also hold GeoLoRA under older rules).
FT_SECOND_MOMENT_RUNS = {
    **{f: ("geolora", "lora") for f in FT_FASHION},
    **{f"finetune_fashion_seed{s}_lr5e-3.json": ("geolora", "lora") for s in range(3, 10)},
    **{f"finetune_fashion_seed{s}_coordinates.json": ("geolora",) for s in range(10)},
    **{f"finetune_fashion_seed{s}_lora_lr1e-2.json": ("lora",) for s in range(10)},
    **{f"finetune_fashion_seed{s}_head_lr_ratio02.json": ("geolora",) for s in range(10)},
    **{f"finetune_all_seed{s}_param_budget.json": ("geolora",) for s in range(3)},
    **{f"finetune_all_seed{s}.json": ("lora",) for s in range(3)},
    **{f"finetune_all_seed0_coordinates_lr{lr}.json": ("geolora",) for lr in ("1e-4", "2e-4", "5e-4")},
    **{f"finetune_all_seed{s}_coordinates_lr2e-4.json": ("geolora",) for s in (1, 2)},
}


#: GeoLoRA's budget variants at its default lr (5e-3) against LoRA's best-lr mean, per task:
#: (task, budget, GeoLoRA's files, LoRA's files). The tables read every file named here.
FT_BUDGETS = (
    ("Rotten Tomatoes, all linear", "rank (288)", [f"finetune_all_seed{s}_gradient_rule.json" for s in range(3)]),
    ("Rotten Tomatoes, all linear", "params", [f"finetune_all_seed{s}_param_budget.json" for s in range(3)]),
    (
        "Rotten Tomatoes, all linear",
        "params, energy order",
        [f"finetune_all_seed{s}_param_budget_energy.json" for s in range(3)],
    ),
    ("Convention party, all linear", "rank (288)", ["finetune_convention_all_seed0.json"]),
    ("Convention party, all linear", "params", list(FT_CONVENTION[1:])),
    ("Fashion-MNIST CNN", "rank (24)", list(FT_FASHION)),
    ("Fashion-MNIST CNN", "params", [f"finetune_fashion_seed{s}_param_budget.json" for s in range(3)]),
)
FT_LORA = {
    "Rotten Tomatoes, all linear": [*(f"finetune_all_seed{s}.json" for s in range(3)), "finetune_all_seed0_lora.json"],
    "Convention party, all linear": [FT_CONVENTION[0], *FT_CONVENTION[2:]],
    "Fashion-MNIST CNN": list(FT_FASHION),
}


def _geolora_against_lora(
    by_name: dict[str, Path], task: str, files: list[str]
) -> tuple[list[int], list[float], list[int], float, float, int]:
    """GeoLoRA at 5e-3 in ``files`` against LoRA's runs of ``task`` on the same seeds: the seeds, GeoLoRA's
    accuracies and adapter parameters per seed, LoRA's best lr, its mean accuracy and adapter parameters."""
    geo = _finetune_runs([by_name[f] for f in files])
    lora = _finetune_runs([by_name[f] for f in FT_LORA[task]])
    seeds = sorted({k[1] for k in geo if k[0] == "geolora" and k[2] == 5e-3})
    accs = [geo[("geolora", s, 5e-3)]["test_acc"] for s in seeds]
    params = [geo[("geolora", s, 5e-3)]["adapter_params"] for s in seeds]
    lrs = [lr for lr in FINETUNE_LRS if all(("lora", s, lr) in lora for s in seeds)]
    best_lr = max(lrs, key=lambda lr: fmean(lora[("lora", s, lr)]["test_acc"] for s in seeds))
    best = fmean(lora[("lora", s, best_lr)]["test_acc"] for s in seeds)
    return seeds, accs, params, best_lr, best, lora[("lora", seeds[0], lrs[0])]["adapter_params"]


def finetune_budget(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by_name = {p.name: p for p in paths}
    header = ["task", "GeoLoRA budget", "GeoLoRA at 5e-3 (seed 0 / 1 / 2)", "mean", "adapter params"]
    header += ["LoRA best lr: mean", "GeoLoRA − LoRA"]
    rows = []
    for task, budget, files in FT_BUDGETS:
        _, accs, params, _, best, lora_params = _geolora_against_lora(by_name, task, files)
        rows.append(
            [
                task,
                budget,
                " / ".join(pct_text(a) for a in accs),
                pct_text(fmean(accs)),
                f"{int_text(max(params))} (LoRA {int_text(lora_params)})",
                pct_text(best),
                f"{100 * (fmean(accs) - best):+.2f}",
            ]
        )
    return header, rows


#: GeoLoRA's adapter initialisations at its default lr (5e-3), all else at the defaults (the parameter budget),
#: against LoRA's best-lr mean on the same seeds: (task, init, GeoLoRA's files). LoRA's files: FT_LORA.
FT_INITS = (
    (
        "Rotten Tomatoes, all linear",
        "gradient (default)",
        [f"finetune_all_seed{s}_param_budget.json" for s in range(3)],
    ),
    ("Rotten Tomatoes, all linear", "random", [f"finetune_all_seed{s}_init_random.json" for s in range(3)]),
    (
        "Rotten Tomatoes, all linear",
        "random + 10 % warm-up",
        [f"finetune_all_seed{s}_init_random_warmup.json" for s in range(3)],
    ),
    ("Convention party, all linear", "gradient (default)", list(FT_CONVENTION[1:])),
    ("Convention party, all linear", "random", ["finetune_convention_all_seed0_init_random.json"]),
    ("Fashion-MNIST CNN", "gradient (default)", [f"finetune_fashion_seed{s}_param_budget.json" for s in range(3)]),
    ("Fashion-MNIST CNN", "random", [f"finetune_fashion_seed{s}_init_random.json" for s in range(3)]),
)


def finetune_init(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by_name = {p.name: p for p in paths}
    header = ["task", "init", "seeds", "GeoLoRA at 5e-3", "mean", "adapter params", "LoRA best lr: mean, same seeds"]
    header += ["GeoLoRA − LoRA"]
    rows = []
    for task, init, files in FT_INITS:
        seeds, accs, params, best_lr, best, _ = _geolora_against_lora(by_name, task, files)
        rows.append(
            [
                task,
                f"`{init.split()[0]}`" + init[len(init.split()[0]) :],
                " / ".join(map(str, seeds)),
                " / ".join(pct_text(a) for a in accs),
                pct_text(fmean(accs)),
                " / ".join(int_text(p) for p in params),
                f"{pct_text(best)} ({lr_text(best_lr)})",
                f"{100 * (fmean(accs) - best):+.2f}",
            ]
        )
    return header, rows
