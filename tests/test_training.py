"""Training pipeline and CLI on small generated MNIST files."""

import json
import math
from pathlib import Path

import pytest
import torch

import dlrt
from dlrt import cli
from dlrt.training import TrainConfig, load_config, read_metrics, train
from dlrt.training.config import FinetuneConfig

from .helpers import scheduled_lrs

pytest.importorskip("yaml")


def small(data_root, tmp_path, **kw):
    base = dict(
        dataset="mnist",
        data_root=str(data_root),
        model="lenet5",
        rank=8,
        epochs=2,
        batch_size=32,
        eval_batch_size=64,
        lr=0.05,
        tau=0.2,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: mlp\nlr: 0.1\nexclude: [head, fc1]\n")
    cfg = load_config(path, ["lr=0.2", "epochs=3", "max_rank=none", "augment=yes"])
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.max_rank, cfg.augment) == ("mlp", 0.2, 3, None, True)
    assert cfg.exclude == ["head", "fc1"]
    with pytest.raises(ValueError, match="unknown config key.*lrr.*valid keys: dataset"):
        load_config(None, ["lrr=1"])
    path.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        load_config(path)
    with pytest.raises(ValueError, match="epochs must be an integer"):
        load_config(None, ["epochs=2.5"])
    with pytest.raises(ValueError, match="integrator"):
        load_config(None, ["integrator=euler"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["lr"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_one_run_writes_every_artifact(data_root, tmp_path):
    result = train(small(data_root, tmp_path, epochs=1))
    assert result.status == "completed"
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "metrics.csv", "summary.json", "checkpoint.safetensors"} <= names
    assert {"ranks.png", "curves.png", "spectra.png"} <= names
    rows = read_metrics(result.run_dir)
    assert len(rows) == 1 and set(rows[0]["ranks"]) == {"conv1", "conv2", "fc1"}
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["params_dense"] == 431_080
    assert 0 < summary["compression"] < 1 and summary["ranks"] == rows[0]["ranks"]


def test_resume_after_interrupt_matches_an_uninterrupted_run(data_root, tmp_path, monkeypatch):
    full = train(small(data_root, tmp_path, name="full"))

    real_step = dlrt.DLRTOptimizer.step
    calls = {"n": 0}

    def interrupting_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch (3 batches per epoch)
            raise KeyboardInterrupt
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", interrupting_step)
    cut = train(small(data_root, tmp_path, name="cut"))
    assert cut.status == "interrupted" and len(read_metrics(cut.run_dir)) == 1
    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", real_step)
    resumed = train(resume_dir=cut.run_dir)
    assert resumed.status == "completed"

    a, b = read_metrics(full.run_dir), read_metrics(resumed.run_dir)
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "total_rank", "ranks", "compression"):
            assert ra[key] == rb[key], key
    from safetensors.torch import load_file

    ta = load_file(str(full.run_dir / "checkpoint.safetensors"))
    tb = load_file(str(resumed.run_dir / "checkpoint.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_existing_run_name_is_not_overwritten(data_root, tmp_path):
    train(small(data_root, tmp_path, epochs=1, name="r"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(small(data_root, tmp_path, epochs=1, name="r"))


def test_divergence_stops_with_a_report(data_root, tmp_path):
    result = train(small(data_root, tmp_path, epochs=1, lr=1e30, momentum=0.0))
    assert result.status == "diverged"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert "non-finite" in summary["message"] and "step" in summary["message"]


def test_dense_baseline_and_cli_report(data_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = [f"data_root={data_root}", f"runs_dir={runs}", "epochs=1", "batch_size=32", "progress=false"]
    assert cli.main(["train", *args, "name=low", "rank=8"]) == 0
    assert cli.main(["train", *args, "name=dense", "dense=true"]) == 0
    assert cli.main(["eval", str(runs / "low")]) == 0
    out = capsys.readouterr().out
    assert '"test_acc"' in out
    assert cli.main(["report", str(runs / "low"), str(runs / "dense"), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "bug tau=0.11" in out
    assert (tmp_path / "r.png").stat().st_size > 0
    assert cli.main(["train", "lrr=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_shipped_configs_parse():
    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        # configs/finetune_*.yaml are `dlrt finetune` configs (tests/test_finetune.py).
        load_config(path, cls=FinetuneConfig if path.name.startswith("finetune_") else TrainConfig)


@pytest.mark.slow
def test_lenet5_on_real_mnist_one_epoch(tmp_path):
    """LeNet5 on the real MNIST for one epoch: >= 97 % test accuracy at >= 80 % compression."""
    pytest.importorskip("mnist")
    config = Path(__file__).parents[1] / "configs" / "lenet5_mnist_1epoch.yaml"
    threads = torch.get_num_threads()
    try:
        result = train(load_config(config, [f"runs_dir={tmp_path}", "progress=false", "threads=2", "plots=false"]))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "completed"
    assert result.summary["test_acc"] >= 0.97
    assert result.summary["compression"] >= 0.80


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_train_schedule_with_warmup(schedule):
    from dlrt.training.loop import build_scheduler

    # 2 epochs of 5 steps; 20 % warm-up = 2 steps; schedule=step decays every epoch (5 steps)
    cfg = TrainConfig(lr=1.0, schedule=schedule, warmup=0.2, epochs=2, step_size=1, gamma=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = scheduled_lrs(opt, sched, 10)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    tail = {
        "cosine": [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)],
        "step": [1.0] * 5 + [0.5] * 3,
        "constant": [1.0] * 8,
    }
    assert lrs[2:] == pytest.approx(tail[schedule])
    with pytest.raises(ValueError, match=r"warmup is a share of the steps in \[0, 1\)"):
        TrainConfig(warmup=-0.1)


def test_train_schedule_without_warmup_is_torchs():
    # checkpoints written before `warmup` hold these schedulers' states; they must still load
    from dlrt.training.loop import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert isinstance(
        build_scheduler(TrainConfig(schedule="cosine"), opt, 5), torch.optim.lr_scheduler.CosineAnnealingLR
    )
    assert isinstance(build_scheduler(TrainConfig(schedule="step"), opt, 5), torch.optim.lr_scheduler.StepLR)
    assert build_scheduler(TrainConfig(schedule="constant"), opt, 5) is None


def test_geometric_optimizers_in_the_configs():
    from dlrt.training.loop import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = TrainConfig(model="mlp", dataset="digits", optimizer="geo-heavyball", integrator="abc", progress=False)
    lowrank = dlrt.convert(model, rank=3, exclude=["2"])
    opt = build_optimizer(cfg, lowrank)
    assert (opt.rule.name, opt.integrator.name, opt.param_groups[0]["momentum"]) == ("geo-heavyball", "abc", 0.9)
    cfg = TrainConfig(model="mlp", dataset="digits", optimizer="geo-heavyball", momentum=0.5, dense=True)
    dense = build_optimizer(cfg, torch.nn.Linear(3, 2))  # the flat-space method: torch's heavy ball
    assert isinstance(dense, torch.optim.SGD) and dense.param_groups[0]["momentum"] == 0.5
    cfg = TrainConfig(model="mlp", dataset="digits", optimizer="geo-adam", dense=True)
    assert type(build_optimizer(cfg, torch.nn.Linear(3, 2))) is torch.optim.Adam
    with pytest.raises(ValueError, match="momentum applies to optimizer sgd or geo-heavyball, not 'adam'"):
        TrainConfig(optimizer="adam", momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        TrainConfig(optimizer="geo-heavyball", momentum=1.0)
    with pytest.raises(ValueError, match="optimizer='geo-adam' trains GeoLoRA's low-rank adapters only"):
        FinetuneConfig(method="lora", optimizer="geo-adam")
    assert FinetuneConfig(method="geolora", optimizer="geo-adam", integrator="abc").optimizer == "geo-adam"
    # geo-adam's second moment: reaches the optimizer from both configs; refused for any other optimizer.
    cfg = TrainConfig(model="mlp", dataset="digits", optimizer="geo-adam", second_moment="coordinates")
    opt = build_optimizer(cfg, dlrt.convert(torch.nn.Sequential(torch.nn.Linear(20, 16)), rank=3))
    assert opt.param_groups[0]["second_moment"] == "coordinates"
    with pytest.raises(ValueError, match="second_moment='coordinates' applies to optimizer=geo-adam only, not 'adam'"):
        TrainConfig(optimizer="adam", second_moment="coordinates")
    with pytest.raises(ValueError, match="dense=true trains with torch.optim.Adam, which has none"):
        TrainConfig(optimizer="geo-adam", second_moment="coordinates", dense=True)
    with pytest.raises(ValueError, match="second_moment='entries' is not one of rank, coordinates"):
        FinetuneConfig(second_moment="entries")
    with pytest.raises(ValueError, match="applies to optimizer=geo-adam only, not 'adamw'"):
        FinetuneConfig(method="lora", second_moment="coordinates")


def test_tucker_run_logs_mode_ranks_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    kw = {"conv": "tucker", "tucker_modes": [0, 1], "tau": 0.3}
    full = train(small(data_root, tmp_path, name="full", **kw))
    assert full.status == "completed"
    rows = read_metrics(full.run_dir)
    # One rank per adapted mode (the spatial modes are not adapted here), and a total over them.
    assert set(rows[0]["ranks"]) == {"conv1/out", "conv1/in", "conv2/out", "conv2/in", "fc1"}
    assert rows[-1]["total_rank"] == sum(rows[-1]["ranks"].values())
    summary = json.loads((full.run_dir / "summary.json").read_text())
    conv2 = summary["ranks"]["conv2"]
    assert conv2[2:] == [5, 5] and [conv2[0], conv2[1]] == [
        rows[-1]["ranks"]["conv2/out"],
        rows[-1]["ranks"]["conv2/in"],
    ]
    assert any(r["ranks"]["conv2/out"] != 8 for r in rows), "the output mode's rank adapted from its start rank 8"

    real_step = dlrt.DLRTOptimizer.step
    calls = {"n": 0}

    def interrupting_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", interrupting_step)
    cut = train(small(data_root, tmp_path, name="cut", **kw))
    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", real_step)
    resumed = train(resume_dir=cut.run_dir)
    assert [r["ranks"] for r in read_metrics(resumed.run_dir)] == [r["ranks"] for r in rows]
    from safetensors.torch import load_file

    ta = load_file(str(full.run_dir / "checkpoint.safetensors"))
    tb = load_file(str(resumed.run_dir / "checkpoint.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_tucker_config_errors():
    with pytest.raises(ValueError, match="conv='cp' is not one of matrix, tucker"):
        TrainConfig(conv="cp")
    with pytest.raises(ValueError, match="tucker_modes applies to conv=tucker"):
        TrainConfig(tucker_modes=[0])
    with pytest.raises(ValueError, match="distinct mode indices in 0..3"):
        TrainConfig(conv="tucker", tucker_modes=[0, 4])
    with pytest.raises(ValueError, match="conv=tucker trains with integrator bug, parallel or fixed"):
        TrainConfig(conv="tucker", integrator="abc")
    with pytest.raises(ValueError, match="optimizer sgd, adam or adamw"):
        TrainConfig(conv="tucker", optimizer="geo-adam")
    assert load_config(None, ["conv=tucker", "tucker_modes=[1,0]"]).tucker_modes == [0, 1]


def test_mlp_hidden_widths(data_root, tmp_path):
    from dlrt.training.config import TrainConfig, load_config
    from dlrt.training.loop import build_model

    cfg = load_config(None, ["model=mlp", "hidden=[48,24]", "rank=4", f"data_root={data_root}"])
    model = build_model(cfg)
    shapes = [(name, layer.shape) for name, layer in __import__("dlrt").lowrank_layers(model)]
    assert shapes == [("fc1", (48, 784)), ("fc2", (24, 48))]
    assert model.head.in_features == 24
    for bad, match in (
        ({"hidden": []}, "non-empty list of positive ints"),
        ({"hidden": [64, 0]}, "non-empty list of positive ints"),
        ({"hidden": [64, True]}, "hidden must be an integer, got True"),
        ({"hidden": [64], "model": "lenet5"}, "hidden applies to model=mlp, not model='lenet5'"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{"model": "mlp", **bad})
