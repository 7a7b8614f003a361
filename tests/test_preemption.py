"""Runs that survive preemption: checkpoints every N steps or M minutes, SIGTERM, SIGKILL, torchrun (issue 29).

The in-process tests stop a run where they choose (a crash inside a step, a signal
at a step) and check what is on disk and that a resume ends where an uninterrupted
run ends, bit for bit. The slow ones start real `dlrt train` processes, kill them
with SIGKILL at random moments, or SIGTERM one torchrun worker; every process they
start is bounded by a timeout and killed when the test ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dlrt
from dlrt import io as dlrt_io
from dlrt.training import TrainConfig, train
from dlrt.training import driver as driver_module

from .test_driver import checkpoint_state, comparable, tiny

pytest.importorskip("yaml")
pytest.importorskip("sklearn")  # the digits dataset


def six_steps(tmp_path, **kw) -> TrainConfig:
    """2 epochs of 6 steps (96 digits, batch 16)."""
    return tiny(tmp_path, batch_size=16, **kw)


def assert_same_final(a: Path, b: Path) -> None:
    """Same model, optimizer, position and CSV rows (timings aside) in two run directories."""
    ta, ma = checkpoint_state(a)
    tb, mb = checkpoint_state(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert ma["optimizer"] == mb["optimizer"] and ma["layers"] == mb["layers"]
    for key in ("epoch", "batch", "step", "scheduler"):
        assert ma["extra"][key] == mb["extra"][key], key
    from dlrt.training.loop import read_steps

    for read in (dlrt.training.read_metrics, read_steps):
        ra, rb = read(a), read(b)
        assert [comparable(r) for r in ra] == [comparable(r) for r in rb]


def spy_saves(monkeypatch) -> list[int]:
    """The step of every checkpoint written from now on."""
    steps: list[int] = []
    real = dlrt_io.save

    def save(path, model, opt=None, **kw):
        steps.append(kw["extra"]["step"])
        return real(path, model, opt, **kw)

    monkeypatch.setattr(dlrt_io, "save", save)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = train(six_steps(tmp_path_factory.mktemp("ref"), name="full", checkpoint_every=None))
    assert result.status == "completed"
    return result.run_dir


# ------------------------------------------------------------------ checkpoint_every / checkpoint_minutes
def test_checkpoint_every_saves_on_schedule_and_does_not_change_the_run(reference, tmp_path, monkeypatch):
    saves = spy_saves(monkeypatch)
    result = train(six_steps(tmp_path, name="every", checkpoint_every=4))
    # the start, every 4 steps since the last checkpoint, and every epoch end (which resets the count)
    assert saves == [0, 4, 6, 10, 12]
    assert_same_final(reference, result.run_dir)


@pytest.mark.parametrize("crash_at", range(1, 13))
def test_a_crash_inside_a_step_loses_at_most_checkpoint_every_steps(reference, tmp_path, monkeypatch, crash_at):
    """A process that dies inside step ``crash_at`` (nothing saved then): the checkpoint on disk is at most
    ``checkpoint_every`` steps old, and the resumed run ends as the uninterrupted one."""
    every = 3
    calls = {"n": 0}
    real_step = dlrt.DLRTOptimizer.step

    def dying(self, closure=None):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise SystemExit("killed")  # unwinds through the driver: no handler saves anything
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", dying)
    cfg = six_steps(tmp_path, name="cut", checkpoint_every=every)
    with pytest.raises(SystemExit):
        train(cfg)
    done = crash_at - 1
    _, meta = checkpoint_state(cfg_run(cfg))
    assert 0 <= done - meta["extra"]["step"] < every
    monkeypatch.undo()
    assert train(resume_dir=cfg_run(cfg)).status == "completed"
    assert_same_final(reference, cfg_run(cfg))


def cfg_run(cfg: TrainConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def test_checkpoint_minutes_saves_when_the_clock_says_so(reference, tmp_path, monkeypatch):
    """25 s per step on a fake clock and checkpoint_minutes=1: a checkpoint at the first step boundary 60 s
    after the last one (epoch ends save anyway and restart the count)."""
    now = {"t": 1000.0}
    monkeypatch.setattr(driver_module, "_clock", lambda: now["t"])
    real_step = dlrt.DLRTOptimizer.step

    def step(self, closure=None):
        now["t"] += 25.0
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", step)
    saves = spy_saves(monkeypatch)
    result = train(six_steps(tmp_path, name="minutes", checkpoint_every=None, checkpoint_minutes=1))
    assert saves == [0, 3, 6, 9, 12]
    assert_same_final(reference, result.run_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [("checkpoint_every", 0), ("checkpoint_every", -2), ("checkpoint_every", 1.5), ("checkpoint_every", True)]
    + [("checkpoint_minutes", v) for v in (0, -1.0, float("nan"), float("inf"))],
)
def test_checkpoint_intervals_are_validated(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        six_steps(tmp_path, **{key: value})
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ signals, float64, temporary files
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_mid_epoch_checkpoints_there_and_resumes_bit_identically(tmp_path, monkeypatch, dtype, sig):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        full = train(six_steps(tmp_path, name="full", checkpoint_every=None))
        calls = {"n": 0}
        real_step = dlrt.DLRTOptimizer.step

        def step(self, closure=None):
            out = real_step(self, closure)
            calls["n"] += 1
            if calls["n"] == 4:  # inside the first epoch: step 4 of its 6
                signal.raise_signal(getattr(signal, sig))
            return out

        monkeypatch.setattr(dlrt.DLRTOptimizer, "step", step)
        cut = train(six_steps(tmp_path, name="cut", checkpoint_every=None))
        monkeypatch.setattr(dlrt.DLRTOptimizer, "step", real_step)
        assert cut.status == "interrupted"
        tensors, meta = checkpoint_state(cut.run_dir)
        assert (meta["extra"]["step"], meta["extra"]["batch"]) == (4, 4)  # where it stopped, not the epoch start
        assert tensors["model/fc1.S"].dtype == dtype
        assert train(resume_dir=cut.run_dir).status == "completed"
        assert_same_final(full.run_dir, cut.run_dir)
    finally:
        torch.set_default_dtype(previous)


def test_a_killed_writes_temporary_file_is_removed_on_resume(reference, tmp_path, monkeypatch):
    """What a SIGKILL during a checkpoint write leaves (a fresh, half-written temporary file beside the last
    checkpoint) is never read: the resume removes it and continues from the complete checkpoint."""
    cfg = six_steps(tmp_path, name="cut", checkpoint_every=None)
    calls = {"n": 0}
    real_step = dlrt.DLRTOptimizer.step

    def step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 8:
            raise SystemExit("killed")
        return real_step(self, closure)

    monkeypatch.setattr(dlrt.DLRTOptimizer, "step", step)
    with pytest.raises(SystemExit):
        train(cfg)
    monkeypatch.undo()
    run = cfg_run(cfg)
    half = run / ".checkpoint.safetensors.k1ll3d0x.tmp"
    half.write_bytes((run / "checkpoint.safetensors").read_bytes()[:100])
    rows = run / ".metrics.csv.k1ll3d0x.tmp"
    rows.write_text("epoch,st")
    assert train(resume_dir=run).status == "completed"
    assert not half.exists() and not rows.exists()
    assert_same_final(reference, run)


# ------------------------------------------------------------------ real processes
def dlrt_train(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dlrt", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


#: The `dlrt train` keys of the real-process tests: an MLP on the digits, one thread, no extras.
DIGITS_ARGS = [
    "dataset=digits",
    "model=mlp",
    "rank=4",
    "eval_batch_size=500",
    "optimizer=sgd",
    "lr=0.05",
    "tau=0.2",
    "threads=1",
    "device=cpu",
    "progress=false",
    "tensorboard=false",
    "plots=false",
]
KILL_ARGS = [
    *DIGITS_ARGS,
    "epochs=2",
    "batch_size=16",
    "limit=640",  # 40 steps per epoch: enough for six kills with resumes on a fast, idle machine
    "momentum=0.9",
    "checkpoint_every=1",  # a write after every step: kills land inside writes as often as between them
]


@pytest.mark.slow
def test_sigkill_at_random_points_always_leaves_one_complete_checkpoint_and_resumes_exactly(tmp_path):
    runs = tmp_path / "runs"
    code, out = finish(dlrt_train([*KILL_ARGS, f"runs_dir={runs}", "name=full"]))
    assert code == 0, out
    run = runs / "cut"
    rng = random.Random(29)
    proc = dlrt_train([*KILL_ARGS, f"runs_dir={runs}", "name=cut"])
    kills = inside_writes = 0

    def temporaries() -> set[str]:
        return {p.name for p in run.glob(".checkpoint.safetensors.*.tmp")}

    try:
        while kills < 6:
            deadline = time.monotonic() + 60
            while not (run / "checkpoint.safetensors").is_file() and proc.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            before = temporaries()  # a killed write's leftover, until the resumed process removes it
            if kills % 2:  # every other kill: the moment a new checkpoint write has begun
                while proc.poll() is None and not (temporaries() - before):
                    assert time.monotonic() < deadline + 60, "no checkpoint write began"
            if proc.poll() is not None:  # it finished before this kill
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
            inside_writes += bool(temporaries() - before)
            # Whatever the moment: one complete checkpoint that loads into the model the config builds.
            from dlrt.training.loop import build_model, load_config

            model = build_model(load_config(run / "config.yaml"))
            extra = dlrt_io.load(run / "checkpoint.safetensors", model)
            assert 0 <= extra["step"] <= 80
            proc = dlrt_train(["--resume", str(run)])
        code, out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, out
    assert kills >= 3, "the run ended before most of the kills"
    assert inside_writes >= 1, "no kill landed inside a checkpoint write"
    assert not list(run.glob(".*.tmp")), "a temporary file outlived the resume"
    assert_same_final(runs / "full", run)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_torchrun_worker_stops_both_at_one_step_and_the_checkpoint_resumes(tmp_path):
    from .test_distributed import free_port

    runs = tmp_path / "runs"
    args = [
        *DIGITS_ARGS,
        "epochs=3",
        "batch_size=8",  # all 1,797 digits: 113 steps per epoch of 2 × 8, a few seconds
        "dist_timeout=60",
        f"runs_dir={runs}",
    ]

    def torchrun(extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "-m", "dlrt", "train", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    code, out = finish(torchrun([*args, "name=full"]))
    assert code == 0, out
    assert out.count("completed:") == 1, out  # only rank 0 speaks
    run = runs / "cut"
    agent = torchrun([*args, "name=cut"])
    try:
        deadline = time.monotonic() + 90
        # wait for the run's start checkpoint, then let it take some steps
        while not (run / "checkpoint.safetensors").is_file():
            assert agent.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        time.sleep(1.0)
        workers = {_rank_of(p): p for p in _children(agent.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)
        code, out = finish(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    # rank 0 alone speaks: the signal reached rank 1, the stop was agreed at the next step
    assert out.count("interrupted by a stop signal to another process at step") == 1, out
    assert f"continue with `torchrun --nproc_per_node 2 -m dlrt train --resume {run}`" in out
    assert f"interrupted: {run}" in out  # the command's last line: rank 0 was not stopped before it
    _, meta = checkpoint_state(run)
    stopped = meta["extra"]["step"]
    assert 0 < stopped < 3 * 113 and meta["extra"]["world_size"] == 2
    code, out = finish(torchrun(["--resume", str(run)]))
    assert code == 0, out
    assert_same_final(runs / "full", run)


# ------------------------------------------------------------------ the other driver commands
@pytest.mark.parametrize(
    ("method", "stop_at"),
    [("geolora", 7), ("lora", 7), ("full", 7), ("adalora", 7), ("adalora", 21)],
)
def test_finetune_resumes_bit_identically_after_sigterm(tmp_path, monkeypatch, method, stop_at):
    """Every method of `dlrt finetune`; AdaLoRA at step 7 (importance scores being averaged) and at step 21
    (after its final budget mask): its rank allocator's state rides in the checkpoint."""
    pytest.importorskip("peft")
    from dlrt.training.finetune import finetune

    from .test_finetune import tiny_cfg

    full = finetune(tiny_cfg(tmp_path, method=method, name="full", plots=False))
    assert full.status == "completed"
    calls = {"n": 0}

    def hook(step):
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(signal.SIGTERM)

    from dlrt.training import driver as drv

    real_init = drv.Driver.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.step_hooks.append(hook)

    monkeypatch.setattr(drv.Driver, "__init__", init)
    cut = finetune(tiny_cfg(tmp_path, method=method, name="cut", plots=False))
    monkeypatch.undo()
    assert cut.status == "interrupted" and cut.summary["steps"] == stop_at
    resumed = finetune(resume_dir=cut.run_dir)
    assert resumed.status == "completed" and resumed.summary["steps"] == 24
    assert_same_final(full.run_dir, cut.run_dir)
    # the frozen pretrained weights are left out of the checkpoint (the resume rebuilt them from the source)
    tensors, _ = checkpoint_state(cut.run_dir)
    assert any("word_embeddings" in k for k in tensors) == (method == "full")
    assert resumed.summary["test_acc"] == full.summary["test_acc"]
    assert resumed.summary["ranks"] == full.summary["ranks"]


def test_closure_train_resumes_bit_identically_after_sigterm(tmp_path, monkeypatch):
    from dlrt.kinetic import ClosureConfig, make_basis, sample, save_data
    from dlrt.kinetic.train import train_closure

    data = tmp_path / "m2.safetensors"
    save_data(data, sample(make_basis("monomial", 2, 1), 400, bound=4.0, min_eig=1e-2, seed=0))

    def cfg(name):
        return ClosureConfig(
            data_path=str(data), width=12, depth=2, epochs=2, batch_size=64, dtype="float64",
            runs_dir=str(tmp_path), name=name, progress=False, plots=False,
        )  # fmt: skip

    full = train_closure(cfg("full"))
    assert full.status == "completed"
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cut = train_closure(cfg("cut"))
    monkeypatch.undo()
    assert cut.status == "interrupted" and cut.summary["steps"] == 4
    assert train_closure(resume_dir=cut.run_dir).status == "completed"
    assert_same_final(full.run_dir, cut.run_dir)
