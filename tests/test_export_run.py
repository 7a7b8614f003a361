"""`dlrt export RUN_DIR`: a `dlrt train` or `dlrt finetune` run's model as a file that reproduces it."""

from __future__ import annotations

import json

import pytest
import torch

from dlrt import cli
from dlrt.training import train
from dlrt.training.config import load_config
from dlrt.training.export_run import load_finetune_run, load_train_run
from dlrt.training.finetune import finetune

from .test_finetune import tiny_cfg
from .test_training import small


@pytest.fixture
def train_run(data_root, tmp_path):
    return train(small(data_root, tmp_path, epochs=1, name="r")).run_dir


def _program_output(path, *inputs):
    with torch.no_grad():
        return torch.export.load(str(path)).module()(*inputs)


def test_export_a_train_run(train_run, tmp_path, capsys):
    assert cli.main(["export", str(train_run)]) == 0
    path = train_run / "model.pt2"
    out = capsys.readouterr().out
    assert out.startswith(f"{path} (") and "conv1: conv" in out and "fc1: linear" in out
    # The program reproduces the checkpoint's model on images of the run's test set, at another batch size.
    model, (x,) = load_train_run(train_run, 5)
    cfg = load_config(train_run / "config.yaml")
    assert cfg.model == "lenet5"
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(_program_output(path, x), want, atol=1e-5, rtol=1e-5)
    # Nothing is overwritten: a second export to the same file is refused and leaves it as it was.
    before = path.read_bytes()
    assert cli.main(["export", str(train_run)]) == 2
    assert "exists: nothing is overwritten" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.slow
def test_export_a_train_run_as_an_aoti_package(train_run, capsys):
    """`dlrt export RUN --format aoti`: the compiled package lands in the run directory and reproduces the run's
    model on test images at a batch size other than the export's."""
    assert cli.main(["export", str(train_run), "--format", "aoti"]) == 0
    path = train_run / "model.aoti.pt2"
    assert capsys.readouterr().out.startswith(f"{path} (")
    assert not list(train_run.glob(".*.tmp"))
    model, (x,) = load_train_run(train_run, 5)
    with torch.no_grad():
        want = model(x)
        got = torch._inductor.aoti_load_package(str(path))(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_export_a_train_run_as_safetensors_with_the_measured_rule(train_run, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "lenet.safetensors"
    args = ["export", str(train_run), "--format", "safetensors", "--rule", "measured", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "µs, factored" in printed  # each layer's two timings are reported
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["dlrt_export"])
    assert meta["rule"] == "measured"
    layers = meta["layers"]
    assert layers and all(set(info["seconds"]) == {"dense", "factored"} for info in layers.values())
    for info in layers.values():  # the form written is the one the timings picked
        faster = min(info["seconds"], key=info["seconds"].get)
        assert info["form"] == faster


def test_export_refuses_what_is_not_a_run(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--batch", "1"]) == 2
    assert "batch must be an int ≥ 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("merged", [True, False])
def test_export_a_geolora_finetune_run(tmp_path, merged):
    result = finetune(tiny_cfg(tmp_path, max_steps=4, epochs=1, name="geo", plots=False))
    run = result.run_dir
    args = ["export", str(run)] + ([] if merged else ["--unmerged"])
    assert cli.main(args) == 0
    model, (ids, mask) = load_finetune_run(run, 3, merged)
    assert ids.shape == mask.shape == (3, result.summary["config"]["max_length"])
    with torch.no_grad():
        want = model(ids, mask)
    assert want.shape == (3, 2)
    torch.testing.assert_close(_program_output(run / "model.pt2", ids, mask), want, atol=1e-5, rtol=1e-5)
    # The adapter is not a no-op: the base model alone computes something else.
    from dlrt.training.config import FinetuneConfig
    from dlrt.training.finetune import build_task

    base = build_task(load_config(run / "config.yaml", cls=FinetuneConfig)).model.eval()
    with torch.no_grad():
        assert (base(input_ids=ids, attention_mask=mask).logits - want).abs().max() > 1e-4


def test_export_refuses_a_full_finetune_run(tmp_path, capsys):
    run = finetune(tiny_cfg(tmp_path, method="full", max_steps=2, epochs=1, name="full", plots=False)).run_dir
    assert cli.main(["export", str(run)]) == 2
    assert "full fine-tuning run" in capsys.readouterr().err
    assert not (run / "model.pt2").exists()


def test_train_run_model_is_the_trained_one(train_run):
    """load_train_run loads the checkpoint: its test loss is the one the run recorded."""
    import csv

    from dlrt.training.loop import build_data, evaluate

    model, _ = load_train_run(train_run, 2)
    cfg = load_config(train_run / "config.yaml")
    loss, acc = evaluate(model, build_data(cfg)[1], cfg.eval_batch_size, torch.device("cpu"))
    with open(train_run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert loss == pytest.approx(float(last["test_loss"]), rel=1e-5)
    assert acc == pytest.approx(float(last["test_acc"]))
