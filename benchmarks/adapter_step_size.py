"""How far each adapter method moves the weights per step at the same learning rate.

Under Adam every method's step is about lr per trainable entry, so what a given lr
means depends on the parameterisation: LoRA moves ``W`` through ``(α/r)·B A`` with
``A`` random, AdaLoRA through ``P Λ Q`` started near zero, GeoLoRA through
``(α/r)·U S Vᵀ`` with orthonormal bases grown from the gradient. This script runs
the first steps of each on the same batches (MiniLM-L6, Rotten Tomatoes, as
``finetune_vs_peft.py``) and prints ``‖ΔW‖₂ / ‖W₀‖₂`` of the adapted modules
after each step: the largest over modules and their mean.

Each ``--geolora`` value is one GeoLoRA run: comma-separated ``dlrt finetune`` overrides
on top of the defaults (an empty string: the defaults themselves).

Rerun::

    python benchmarks/adapter_step_size.py --lr 5e-3   # about 3 min: today's defaults and the pre-issue-13 ones
    python benchmarks/adapter_step_size.py --methods geolora --geolora "lora_alpha=64" "lora_alpha=128"
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from dlrt.training.config import FinetuneConfig, load_config
from dlrt.training.finetune import apply_method, build_task, step_closure

#: GeoLoRA's defaults before issue 13 (docs/geolora.md).
OLD_DEFAULTS = "optimizer=adamw,lora_alpha=128,tau=0.1,coefficient_steps=10,modules_to_save_lr_ratio=1"


def delta_weights(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ΔW, W₀)`` of every adapted module (GeoLoRA's or PEFT's)."""
    from dlrt.layers import LowRankAdapter

    pairs = []
    for module in model.modules():
        if isinstance(module, LowRankAdapter):
            pairs.append((module.delta_weight(), module.base_layer.weight))
        elif hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            pairs.append((module.get_delta_weight(module.active_adapters[0]), module.base_layer.weight))
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["lora", "adalora", "geolora"])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--geolora",
        nargs="+",
        default=["", OLD_DEFAULTS],
        help="one GeoLoRA run per value: comma-separated key=value overrides of dlrt finetune's defaults",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    task = build_task(FinetuneConfig(seed=args.seed))
    loader = torch.utils.data.DataLoader(
        task.train_set,
        batch_size=16,
        shuffle=True,
        collate_fn=task.collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = [b for _, b in zip(range(args.steps), loader)]
    runs = [(m, spec) for m in args.methods for spec in (args.geolora if m == "geolora" else [None])]
    table = {}
    for method, spec in runs:
        overrides = [f"method={method}", f"lr={args.lr}"] + [kv for kv in (spec or "").split(",") if kv]
        cfg = load_config(None, overrides, cls=FinetuneConfig)
        torch.manual_seed(args.seed)
        model, opt, after = apply_method(cfg, copy.deepcopy(task.model), total_steps=300)
        model.train()
        norms0 = [torch.linalg.matrix_norm(w0.detach().float(), 2) for _, w0 in delta_weights(model)]
        rows = []
        for i, batch in enumerate(batches):
            opt.step(step_closure(task, model, opt, batch))
            after(i)
            with torch.no_grad():
                rel = [
                    float(torch.linalg.matrix_norm(dw.float(), 2) / n0)
                    for (dw, _), n0 in zip(delta_weights(model), norms0, strict=True)
                ]
            rows.append((max(rel), sum(rel) / len(rel)))
        label = method if spec is None else f"{method} ({spec or 'defaults'})"
        table[label] = (cfg.lora_alpha, rows)
        print(f"{label}: " + ", ".join(f"{mx:.3f}" for mx, _ in rows), flush=True)

    print(f"\n‖ΔW‖₂ / ‖W₀‖₂ after k steps at lr {args.lr:g} (largest over the adapted modules / their mean)\n")
    ks = sorted({1, args.steps // 2, args.steps})
    print("| method | α | " + " | ".join(f"step {k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for label, (alpha, rows) in table.items():
        cells = " | ".join(f"{rows[k - 1][0]:.3f} / {rows[k - 1][1]:.3f}" for k in ks)
        print(f"| {label} | {alpha:g} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
