"""What checkpointing costs a run: the share of `dlrt train`'s wall time spent writing checkpoints.

Runs the demo (`dlrt train` with its defaults: LeNet5 on MNIST, 3 epochs) once per
``--every`` value, timing every checkpoint write (``Driver._save``: the model, the
optimizer and the position, written to a temporary file, synced and renamed) and every
rewrite of the CSV files, and reports each as a share of the run's wall time, with the
checkpoint's size. The shares are ratios within one run, so a busy machine changes them
little; the runs themselves are not interleaved.

    python benchmarks/checkpoint_overhead.py --every 500 100 20 --out benchmarks/results/checkpoint_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import environment, load_average
from dlrt.training import TrainConfig, train
from dlrt.training import driver as driver_module
from dlrt.training.config import CHECKPOINT_EVERY


def measure(every: int | None, overrides: dict[str, Any], runs_dir: str) -> dict[str, Any]:
    saves: list[float] = []
    rows: list[float] = []
    real_save, real_rows = driver_module.Driver._save, driver_module.RunWriter.write_rows

    def save(self: Any) -> None:
        t0 = time.perf_counter()
        real_save(self)
        saves.append(time.perf_counter() - t0)

    def write_rows(self: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        real_rows(self, *args)
        rows.append(time.perf_counter() - t0)

    driver_module.Driver._save, driver_module.RunWriter.write_rows = save, write_rows  # type: ignore[method-assign]
    try:
        cfg = TrainConfig(
            runs_dir=runs_dir, progress=False, plots=False, tensorboard=False, checkpoint_every=every, **overrides
        )
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
    finally:
        driver_module.Driver._save, driver_module.RunWriter.write_rows = real_save, real_rows  # type: ignore[method-assign]
    epochs = result.summary["epochs_completed"]
    size = (result.run_dir / driver_module.CHECKPOINT).stat().st_size
    return {
        "checkpoint_every": every,
        "wall_seconds": wall,
        "epochs": epochs,
        "test_acc": result.summary["test_acc"],
        "checkpoints": len(saves),
        "checkpoint_seconds": sum(saves),
        "median_checkpoint_ms": 1e3 * statistics.median(saves),
        "csv_seconds": sum(rows),
        "checkpoint_bytes": size,
        "overhead_share": (sum(saves) + sum(rows)) / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, nargs="+", default=[CHECKPOINT_EVERY], help="checkpoint_every values")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further dlrt train keys")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from dlrt.training.config import apply_overrides

    overrides = apply_overrides({}, args.set)
    if args.threads is not None:
        overrides["threads"] = args.threads
    results = []
    load_before = load_average("before")
    with tempfile.TemporaryDirectory() as tmp:
        for every in args.every:
            r = measure(every, overrides, tmp)
            results.append(r)
            print(
                f"checkpoint_every={every}: {r['checkpoints']} checkpoints of {r['checkpoint_bytes'] / 1e3:.0f} kB, "
                f"median {r['median_checkpoint_ms']:.1f} ms; checkpoints {r['checkpoint_seconds']:.2f} s + CSV "
                f"{r['csv_seconds']:.2f} s of {r['wall_seconds']:.1f} s = {100 * r['overhead_share']:.2f} %",
                flush=True,
            )
    default = [r for r in results if r["checkpoint_every"] == CHECKPOINT_EVERY]
    checks = [
        {"name": "checkpoints at the default interval take < 2 % of the run", "value": r["overhead_share"],
         "ok": r["overhead_share"] < 0.02}
        for r in default
    ]  # fmt: skip
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']} ({100 * c['value']:.2f} %)")
    if args.out:
        env = {**environment(args), "loadavg_before": list(load_before), "loadavg_after": list(load_average("after"))}
        out = {"environment": env, "settings": overrides, "results": results, "checks": checks}
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
