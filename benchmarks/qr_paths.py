"""Householder against Cholesky QR for the narrow blocks of an augmentation on the CPU (linalg.HOUSEHOLDER_MAX_COLUMNS).

For ``n`` rows and ``r0 = k`` columns each of basis and new directions, times
``dlrt.linalg.augment_basis_qr`` with narrow blocks sent to Householder QR (the
default) and with every block on the Cholesky-QR path (the threshold set to 0),
interleaved, one thread, and prints the median ratio Cholesky / Householder.

    python benchmarks/qr_paths.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import environment, load_average
from dlrt import linalg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[256, 768, 1536, 4096])
    p.add_argument("--columns", type=int, nargs="+", default=[4, 8, 16, 32], help="r0 = k")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/qr_paths.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    before = load_average("before")
    default = linalg.HOUSEHOLDER_MAX_COLUMNS
    rows = []
    for n in args.rows:
        for k in args.columns:
            if 2 * k > n:
                continue
            U0, X = linalg.orth(torch.randn(n, k)), torch.randn(n, k)
            times: dict[int, list[float]] = {default: [], 0: []}
            for _ in range(args.repeats):
                for threshold in times:
                    linalg.HOUSEHOLDER_MAX_COLUMNS = threshold
                    t0 = time.perf_counter()
                    linalg.augment_basis_qr(U0, X)
                    times[threshold].append(time.perf_counter() - t0)
            linalg.HOUSEHOLDER_MAX_COLUMNS = default
            med = {t: statistics.median(v[10:]) for t, v in times.items()}  # the first calls warm up
            rows.append({"rows": n, "columns": 2 * k, "default_us": med[default] * 1e6, "cholesky_us": med[0] * 1e6})
            print(f"n {n:5d}, {2 * k:3d} columns: default {med[default] * 1e6:7.1f} us, all-Cholesky "
                  f"{med[0] * 1e6:7.1f} us, ratio {med[0] / med[default]:.2f}")  # fmt: skip
    record = {"environment": environment(args), "load_before": list(before), "threshold": default, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
