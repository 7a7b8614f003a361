"""Results tables of the training pages: step time, data parallel, FeDLRT, robustness, the rank rule's start,
Tucker, closures, the geometric optimizers and the checkpoints' overhead (``TABLES`` in ``results.py``)."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from results_common import FINETUNE_LRS, int_text, lr_text, pct_text, read_json, read_jsonl

#: The ε of `dlrt robustness` in benchmarks/robustness.py (pixel units); the results file does not repeat them.
ROBUSTNESS_EPS = (0.01, 0.03, 0.05, 0.1)


def _sd(values: list[float]) -> float:
    return stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------ step time
def lenet_step_time(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = read_json(paths[0])
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


def step_time(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = read_json(paths[0])
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


def ddp_scaling(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by = {(r["model"], r["variant"], r["world"]): r for r in read_jsonl(paths[0])}
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
                int_text(low),
                int_text(dense),
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


def ddp_equivalence(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    by = {(r["model"], r["variant"], r["world"]): r for r in read_jsonl(paths[0])}
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


def federated(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in read_jsonl(paths[0]):
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
            b = fmean(r["bytes_client_round"] for r in rs)
            m = fmean(r["macs_client_round"] for r in rs)
            bb = fmean(r["bytes_client_round"] for r in base) if base else float("nan")
            bm = fmean(r["macs_client_round"] for r in base) if base else float("nan")
            rows.append(
                [
                    where,
                    _FED_NAMES[label],
                    str(len(rs)),
                    pct_text(fmean(r["test_acc"] for r in rs)),
                    f"{b / 1e6:.3f}",
                    f"{bb / b:.1f}×",
                    f"{m / 1e9:.3f}",
                    f"{bm / m:.1f}×",
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ robustness
def robustness(paths: list[Path], longer: bool) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for r in read_jsonl(paths[0]):
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
                " / ".join(f"{100 * fmean(r[attack][i] for r in rs):.1f}" for i in range(len(ROBUSTNESS_EPS)))
                for attack in ("fgsm", "pgd")
            ]
            compr = fmean(r["compression"] for r in rs)
            cond = [r["cond_mean"] for r in rs if r.get("cond_mean") is not None and r["cond_mean"] == r["cond_mean"]]
            rows.append(
                [
                    where,
                    label,
                    str(len(rs)),
                    pct_text(fmean(r["clean_acc"] for r in rs)),
                    *attacked,
                    "0" if method == "dense" else f"{100 * compr:.1f} %",
                    f"{fmean(cond):.2f}" if cond else "—",
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ rank rule: the start
def rank_start(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in read_jsonl(paths[0]):
        start = "full" if str(r["rank"]) == "1.0" else str(r["rank"])
        key = (r["model"], r["conv"], r["tau"], r["tau_mode"], r.get("tau_grad"), r["epochs"])
        groups.setdefault(key, {}).setdefault(start, []).append(r)

    def ranks(rs: list[dict[str, Any]]) -> str:
        first = rs[0]["ranks"]
        parts = []
        for name, value in first.items():
            if isinstance(value, list):
                mean = [fmean(r["ranks"][name][i] for r in rs) for i in range(len(value))]
                parts.append("(" + ",".join(f"{m:.0f}" for m in mean) + ")")
            else:
                parts.append(f"{fmean(r['ranks'][name] for r in rs):.1f}")
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
                    pct_text(fmean(r["final_acc"] for r in rs)),
                    f"{100 * fmean(r['compression'] for r in rs):.1f}",
                    f"{fmean(r['epoch_seconds'][0] for r in rs):.1f}",
                    ranks(rs),
                ]
            )
            where = ""
    return header, rows


# ------------------------------------------------------------------ Tucker
def _tucker_groups(path: Path) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in read_jsonl(path):
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


def tucker(paths: list[Path], model: str, epochs: int) -> tuple[list[str], list[list[str]]]:
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
                f"{fmean(accs):.2f} ± {_sd(accs):.2f}" + ("" if len(rs) == 3 else f" ({len(rs)} seeds)"),
                int_text(fmean(r["conv_params"] for r in rs)),
                _tucker_ranks(seed0["ranks"], method),
            ]
        rows.append(row)
    return header, rows


def tucker_timing(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for path in sorted(paths, key=lambda p: -read_json(p)["threads"]):
        d = read_json(path)
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
def closure(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    runs = sorted(
        read_jsonl(paths[0]),
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


def optimizers_part(paths: list[Path], part: str) -> tuple[list[str], list[list[str]]]:
    p = read_json(paths[0])["parts"][part]
    rows = []
    for method, best in p["best"].items():
        steps = best.get("steps_to_target")
        row = [_OPT_NAMES.get(method, method), f"{best['lr']:g}", "not reached" if steps is None else str(steps)]
        row.append(f"{best['final_rel_loss']:.2e}" if part == "a" else pct_text(best["test_acc"]) + " %")
        rows.append(row)
    last = "final rel. loss" if part == "a" else "test acc."
    target = f"{p['problem']['target']:g}" if part == "a" else f"{p['setting']['target']:g}"
    return ["method", "best lr", f"steps to {target}", last], rows


def optimizers_c(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    c = read_json(paths[0])["parts"]["c"]
    names = {"adalora/adamw": "AdaLoRA", "geolora/geo-adam": "GeoLoRA, **geo-adam**"}
    header = ["method", *(lr_text(lr) for lr in FINETUNE_LRS), "adapter params at the best lr"]
    rows = []
    for method, s in c["summary"].items():
        per = s["per_lr"]
        seeds = sorted({seed for v in per.values() for seed in v["seeds"]})
        name = names.get(method, "GeoLoRA, " + method.split("/")[1])
        if len(seeds) < 3:
            name += f" (seeds {' / '.join(map(str, seeds))} only)"
        cells = [
            " / ".join(pct_text(a) for a in per[str(lr)]["accs"]) if str(lr) in per else "—" for lr in FINETUNE_LRS
        ]
        best = per.get(str(s["best_lr"]), {})
        params = best.get("adapter_params")
        rows.append([name, *cells, "—" if params is None else f"{int_text(params)} (mean; {lr_text(s['best_lr'])})"])
        means = [per[str(lr)]["mean"] if str(lr) in per else None for lr in FINETUNE_LRS]
        top = max(m for m in means if m is not None)
        rows.append(
            ["", *("" if m is None else (f"**{pct_text(m)}**" if m == top else pct_text(m)) for m in means), ""]
        )
    return header, rows


def optimizers_d(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = read_json(paths[0])["parts"]["d"]
    rows = []
    for c in d["configs"]:
        cfg = dict(kv.split("=") for kv in c["config"].split(","))
        low, full = c["low"], c["full"]
        rows.append(
            [
                f"{cfg['optimizer']} {cfg['lr']}, {cfg.get('coefficient_steps', '1')}",
                " / ".join(str(v) for v in low["ranks"].values()),
                " / ".join(str(v) for v in full["ranks"].values()),
                pct_text(low["test_acc"]) + " %",
                pct_text(full["test_acc"]) + " %",
            ]
        )
    header = ["optimizer, lr, coefficient steps", "ranks from 2 (conv1/conv2/fc1)", "ranks from full"]
    return [*header, "test acc. from 2", "from full"], rows


# ------------------------------------------------------------------ checkpoints
def checkpoint_overhead(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    d = read_json(paths[0])
    header = ["checkpoint_every", "checkpoints", "kB each", "median write (ms)", "writes (s)", "CSV (s)"]
    header += ["run (s)", "share of the run"]
    rows = [
        [
            str(r["checkpoint_every"]),
            str(r["checkpoints"]),
            int_text(r["checkpoint_bytes"] / 1e3),
            f"{r['median_checkpoint_ms']:.1f}",
            f"{r['checkpoint_seconds']:.2f}",
            f"{r['csv_seconds']:.2f}",
            f"{r['wall_seconds']:.1f}",
            f"{pct_text(r['overhead_share'])} %",
        ]
        for r in d["results"]
    ]
    return header, rows
