"""The training driver: exact resume after Ctrl-C, SIGTERM or SIGUSR1 anywhere, steps.csv, plots without
matplotlib, CLI validation."""

from __future__ import annotations

import builtins
import json
import math
import signal
import sys

import pytest
import torch

import dlrt
from dlrt import cli
from dlrt import io as dlrt_io
from dlrt.training import TrainConfig, read_metrics, train

pytest.importorskip("yaml")
pytest.importorskip("sklearn")  # the digits dataset


def tiny(tmp_path, **kw) -> TrainConfig:
    """MLP on 96 digits: 3 steps per epoch, 2 epochs, a cosine schedule; well under a second."""
    base = dict(
        dataset="digits",
        model="mlp",
        rank=4,
        epochs=2,
        batch_size=32,
        eval_batch_size=500,
        limit=96,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        tau=0.2,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
        tensorboard=False,
        plots=False,
    )
    return TrainConfig(**{**base, **kw})


def checkpoint_state(run_dir):
    from safetensors import safe_open

    path = str(run_dir / "checkpoint.safetensors")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["dlrt"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def assert_same_run(a, b):
    ta, ma = checkpoint_state(a)
    tb, mb = checkpoint_state(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert ma["optimizer"] == mb["optimizer"]
    assert ma["layers"] == mb["layers"]
    assert (ma["extra"]["epoch"], ma["extra"]["batch"]) == (mb["extra"]["epoch"], mb["extra"]["batch"])
    assert ma["extra"]["scheduler"] == mb["extra"]["scheduler"]
    assert ma["extra"]["step"] == mb["extra"]["step"] == 6
    from dlrt.training.loop import read_steps

    for read in (read_metrics, read_steps):  # the CSV files, rewritten from the checkpoint on resume
        ra, rb = read(a), read(b)
        assert len(ra) == len(rb) == 2  # metrics: 2 epochs; steps (log_every=10): the start and the last step
        for x, y in zip(ra, rb, strict=True):
            assert comparable(x) == comparable(y)


def comparable(row):
    """A CSV row without its timing, NaN written as a string (NaN != NaN)."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k != "seconds"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    result = train(tiny(tmp, name="full"))
    assert result.status == "completed"
    return result.run_dir


def _interrupt(how):
    if how == "signal":  # what Ctrl-C does: SIGINT arrives while this code runs
        signal.raise_signal(signal.SIGINT)
    elif how == "twice":  # Ctrl-C pressed twice: the second one stops the run right here
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    elif how == "sigterm":  # a scheduler's preemption, `kill`, torchrun's agent
        signal.raise_signal(signal.SIGTERM)
    elif how == "sigterm-twice":  # a second SIGTERM is no second Ctrl-C: the run still stops at a safe point
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
    elif how == "sigusr1":  # sent by some schedulers ahead of the kill
        signal.raise_signal(signal.SIGUSR1)
    else:
        raise KeyboardInterrupt


# (what to patch, on which call): calls 1..6 of a step-level function are the 6 steps of the run.
POINTS = [
    ("opt.step", 2),  # after a step, before the scheduler: the batch must not be replayed
    ("opt.step", 3),  # the last step of epoch 1
    ("scheduler.step", 4),
    ("save", 1),  # during the checkpoint of the start
    ("save", 2),  # during the epoch-1 checkpoint write: the epoch must not be retrained
    ("metrics.csv", 1),  # writing epoch 1's row
    ("metrics.csv", 2),  # writing the last row
    ("evaluate", 1),
    ("evaluate", 2),
]


@pytest.mark.parametrize("how", ["signal", "twice", "raise", "sigterm", "sigterm-twice", "sigusr1"])
@pytest.mark.parametrize(("point", "k"), POINTS)
def test_resume_after_ctrl_c_anywhere_is_exact(reference, tmp_path, monkeypatch, point, k, how):
    calls = {"n": 0}

    def after(real):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs) if point in ("opt.step", "scheduler.step") else None
            calls["n"] += 1
            if calls["n"] == k:
                _interrupt(how)
            return out if point in ("opt.step", "scheduler.step") else real(*args, **kwargs)

        return wrapper

    if point == "opt.step":
        monkeypatch.setattr(dlrt.DLRTOptimizer, "step", after(dlrt.DLRTOptimizer.step))
    elif point == "scheduler.step":
        cls = torch.optim.lr_scheduler.CosineAnnealingLR
        monkeypatch.setattr(cls, "step", after(cls.step))
    elif point == "save":
        monkeypatch.setattr(dlrt_io, "save", after(dlrt_io.save))
    elif point == "metrics.csv":
        real_write = dlrt_io.atomic_write
        counted = after(real_write)

        def atomic_write(path, write):
            return counted(path, write) if str(path).endswith("metrics.csv") else real_write(path, write)

        monkeypatch.setattr(dlrt_io, "atomic_write", atomic_write)
    else:  # evaluation switches the model to eval mode first
        monkeypatch.setattr(torch.nn.Module, "eval", after(torch.nn.Module.eval))

    # what was installed before (SIG_IGN for SIGINT when started in the background by a shell)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
    cut = train(tiny(tmp_path, name="cut"))
    assert calls["n"] >= k
    monkeypatch.undo()
    if cut.status == "completed":  # the interrupt came after the last safe point
        result = cut
    else:
        assert cut.status == "interrupted"
        result = train(resume_dir=cut.run_dir)
    assert result.status == "completed"
    assert_same_run(reference, result.run_dir)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)] == handlers  # restored


# ------------------------------------------------------------------ steps.csv
def test_steps_csv_has_the_ranks_of_every_layer_every_log_every_steps(tmp_path, monkeypatch):
    after_step = []  # ranks after each optimizer step, as the run goes
    real_step = dlrt.DLRTOptimizer.step

    def spy(self, closure=None):
        out = real_step(self, closure)
        after_step.append([layer.rank for layer in self.lowrank_layers])
        return out

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", spy)
    result = train(tiny(tmp_path, rank=12, tau=0.3, epochs=3, log_every=2, plots=True))
    from dlrt.training.loop import read_steps

    rows = read_steps(result.run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 9]  # the start, every 2 steps and the last of 9
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert len(after_step) == 9 and len({tuple(r) for r in after_step}) > 1  # the ranks moved
    start = rows.pop(0)  # before any step: the converted ranks, no loss yet
    assert list(start["ranks"].values()) == [12, 12, 12, 12] and math.isnan(start["loss"])
    for row in rows:
        assert list(row["ranks"]) == ["fc1", "fc2", "fc3", "fc4"]
        assert list(row["ranks"].values()) == after_step[row["step"] - 1]
        assert row["total_rank"] == sum(row["ranks"].values())
    assert (result.run_dir / "rank_steps.png").stat().st_size > 0


# ------------------------------------------------------------------ plots without matplotlib
def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    with pytest.warns(RuntimeWarning, match=r"pip install matplotlib.*pip install dlrt\[cli\]"):
        result = train(tiny(tmp_path, epochs=1, plots=True))
    assert result.status == "completed"
    assert not list(result.run_dir.glob("*.png"))
    assert "pip install matplotlib" in capsys.readouterr().err


# ------------------------------------------------------------------ validation
def _float_keys(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_numeric_key_must_be_finite(value):
    from dlrt.training.config import FinetuneConfig

    for cls in (TrainConfig, FinetuneConfig):
        keys = _float_keys(cls)
        assert {"lr", "tau", "weight_decay", "warmup"} <= set(keys)
        for key in keys:
            with pytest.raises(ValueError, match=rf"^{key} must be a finite number, got {value}$"):
                cls(**{key: value})


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("train", ["tau=nan"], "tau must be a finite number, got nan"),
        ("train", ["lr=inf"], "lr must be a finite number, got inf"),
        ("train", ["dataset=mnist", "data_root={tmp}/no-data"], "no-data"),  # fails while building the data
        ("finetune", ["lr=nan"], "lr must be a finite number, got nan"),
    ],
)
def test_cli_run_that_fails_validation_leaves_no_run_directory(tmp_path, capsys, command, args, message):
    runs = tmp_path / "runs"
    argv = [command, f"runs_dir={runs}", "name=r", *(a.format(tmp=tmp_path) for a in args)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlrt {command}: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_config_choices_come_from_the_registries(monkeypatch):
    from dlrt.integrators import INTEGRATORS
    from dlrt.models import _REGISTRY
    from dlrt.optim import RULES

    monkeypatch.setitem(INTEGRATORS, "mine", INTEGRATORS["bug"])
    monkeypatch.setitem(RULES, "myrule", RULES["sgd"])
    monkeypatch.setitem(_REGISTRY, "mynet", _REGISTRY["mlp"])
    cfg = TrainConfig(integrator="mine", optimizer="myrule", model="mynet")
    assert (cfg.integrator, cfg.optimizer, cfg.model) == ("mine", "myrule", "mynet")
    with pytest.raises(ValueError, match="model='nonet' is not one of .*mynet"):
        TrainConfig(model="nonet")
    with pytest.raises(ValueError, match="unknown dataset 'nodata'; valid names: mnist"):
        TrainConfig(dataset="nodata")


def test_cli_run_missing_an_optional_package_is_one_line_and_no_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError, as when it is not installed
    runs = tmp_path / "runs"
    argv = ["finetune", f"runs_dir={runs}", "name=r", "method=lora", "model=tiny-bert", "max_steps=1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlrt finetune: method='lora' needs PEFT: pip install peft") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_cli_names_a_missing_module(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(cli, "_train", fail)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlrt train: this run needs the package 'yaml', which is not installed; install")


def test_a_second_ctrl_c_stops_at_once(capsys):
    from dlrt.training.signals import Interrupts

    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as interrupts:
        signal.raise_signal(signal.SIGINT)  # the first only asks for a stop at the next safe point
        assert interrupts.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "press Ctrl-C again to stop now" in capsys.readouterr().err


def test_batch_order_is_the_shuffling_dataloaders(tmp_path):
    """The epoch order is DataLoader(shuffle=True)'s under the same seed: earlier runs keep their batches."""
    from dlrt.training.driver import Driver, RunWriter, Task, classify, seed_for

    data = torch.utils.data.TensorDataset(torch.arange(50).float()[:, None], torch.arange(50))
    model = torch.nn.Linear(1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task, writer = Task(model, data, None, None, classify), RunWriter(None, [])
    driver = Driver(
        task, opt, writer, device=torch.device("cpu"), epochs=2, batch_size=8, eval_batch_size=8, seed=3, ranks=dict
    )
    for epoch in range(2):
        gen = torch.Generator().manual_seed(seed_for(3, epoch))
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=gen)
        expected = [y.tolist() for _, y in loader]
        assert [y.tolist() for _, y in driver._batches(epoch, 0)] == expected
        assert [y.tolist() for _, y in driver._batches(epoch, 2)] == expected[2:]  # resumed mid-epoch
