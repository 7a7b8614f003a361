"""Results tables of the export and language-model pages: the exported model's speed (``docs/export.md``) and
pre-training (``docs/language-models.md``) (``TABLES`` in ``results.py``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from results_common import int_text, lr_text, pct_text, read_json


def inference(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """benchmarks/inference.py: the exported model's speed-up over dense (MiniLM: merged and unmerged over the base)."""
    header = ["model", "test acc", "compression", "form", "batch", "eager", "torch.compile", "onnxruntime"]
    header += ["compiled / eager", ".pt2 size (MB)"]
    rows = []

    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}×"

    for model, r in read_json(paths[0])["models"].items():
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
                        "–" if r["test_acc"] is None else f"{pct_text(r['test_acc'])} %",
                        "–" if model == "minilm" or r["compression"] is None else f"{pct_text(r['compression'], 1)} %",
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


def pretraining(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """benchmarks/pretraining.py: per method and seed, the figure and its ratio to dense of the same run."""
    header = ["method", "seed", "val. ppl", "projection weights", "optimizer state", "peak memory", "s/step"]
    header.append("steps to dense's final loss")

    def cell(r: dict[str, Any], key: str, text: str) -> str:
        ratio = (r.get("ratio_to_dense") or {}).get(key)
        return text if r["method"] == "dense" or ratio is None else f"{text} (×{ratio:.2f})"

    rows = []
    for r in read_json(paths[0])["records"]:
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
                cell(r, "projection_params", int_text(r["projection_params"])),
                cell(r, "optimizer_state_bytes", f"{r['optimizer_state_bytes'] / 1e6:.2f} MB"),
                cell(r, "peak_bytes", f"{r['peak_bytes'] / 1e6:.1f} MB"),
                cell(r, "s_per_step", f"{r['s_per_step']:.3f}"),
                str(r.get("steps_to_dense_final_loss") or "not reached"),
            ]
        )
    return header, rows


def pretraining_seeds(paths: list[Path]) -> tuple[list[str], list[list[str]]]:
    """benchmarks/pretraining.py over several seeds: per method and setting, the mean over seeds and the ratios
    to dense of the same seed (seconds only where timed in the same run)."""
    header = ["method", "lr", "τ", "seeds", "val. ppl (mean ± sd)", "× dense", "projection weights", "optimizer state"]
    header += ["peak memory", "s/step", "steps to dense's final loss"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in read_json(paths[0])["records"]:
        if r["status"] == "completed":
            groups.setdefault((r["method"], r.get("lr"), r.get("tau")), []).append(r)

    def ratio(rs: list[dict[str, Any]], key: str) -> str:
        values = [(r.get("ratio_to_dense") or {}).get(key) for r in rs]
        values = [v for v in values if v is not None]
        return f"×{statistics.fmean(values):.2f}" if values else "–"

    rows = []
    order = sorted(groups, key=lambda k: (k[0] != "dense", k[0], k[1] or 0, k[2] or 0))  # dense first
    for method, lr, tau in order:
        rs = groups[(method, lr, tau)]
        ppl = [r["val_ppl"] for r in rs]
        spread = f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
        dense = all(r.get("reference") for r in rs)  # the dense runs the ratios refer to
        rank = rs[0].get("fixed_rank") or rs[0].get("projection_rank")
        reached = [r.get("steps_to_dense_final_loss") for r in sorted(rs, key=lambda r: r["seed"])]
        rows.append(
            [
                f"{method} (reference)" if dense else f"{method} (rank {rank})" if rank else method,
                "–" if lr is None else lr_text(lr),
                "–" if tau is None else f"{tau:g}",
                " ".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                f"{statistics.fmean(ppl):.2f}{spread}",
                "1" if dense else ratio(rs, "val_ppl"),
                int_text(statistics.fmean(r["projection_params"] for r in rs))
                + ("" if dense else f" ({ratio(rs, 'projection_params')})"),
                f"{statistics.fmean(r['optimizer_state_bytes'] for r in rs) / 1e6:.2f} MB"
                + ("" if dense else f" ({ratio(rs, 'optimizer_state_bytes')})"),
                f"{statistics.fmean(r['peak_bytes'] for r in rs) / 1e6:.1f} MB"
                + ("" if dense else f" ({ratio(rs, 'peak_bytes')})"),
                f"{statistics.fmean(r['s_per_step'] for r in rs):.3f}"
                + ("" if dense else f" ({ratio(rs, 's_per_step')})"),
                " / ".join(str(s) if s else "not reached" for s in reached),
            ]
        )
    return header, rows
