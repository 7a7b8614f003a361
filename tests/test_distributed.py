"""Data-parallel DLRT on torch.distributed: two gloo processes on 127.0.0.1 against one process (docs/distributed.md).

Every test spawns its processes itself, bounds them by a timeout and kills what is
still running when it ends. The reference is the same model trained in this
process, without a process group, on the global batch (float64).
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import dlrt
from dlrt.distributed import DistributedError

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 50
#: Seconds a test waits for its processes (spawning two interpreters that import torch takes a few).
JOIN_TIMEOUT = 120.0


# ------------------------------------------------------------------ the shared problem
def make_model(seed: int = 0) -> nn.Module:
    """A float64 MLP 20-48-48-5 whose two hidden-side layers are low-rank (rank 12); biases and head dense."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)).double()
    return dlrt.convert(model, rank=12, exclude=["4"])


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(640, 20, generator=g, dtype=torch.float64)
    teacher = torch.randn(20, 5, generator=g, dtype=torch.float64)
    return x, (x @ teacher).argmax(1)


def global_batch(step: int, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    start = (step * GLOBAL_BATCH) % len(x)
    return x[start : start + GLOBAL_BATCH], y[start : start + GLOBAL_BATCH]


def make_optimizer(model: nn.Module, integrator: str, tau: float = 0.15) -> dlrt.DLRTOptimizer:
    return dlrt.DLRTOptimizer(model, integrator=integrator, optimizer="sgd", lr=0.2, momentum=0.9, tau=tau)


def train_steps(model, opt, data, steps, *, first=0, shard=None):
    """Steps ``first .. first+steps-1``; each process takes ``shard = (rank, world)`` of the global batch.

    Returns the local loss and the ranks after every step.
    """
    losses, ranks = [], []
    for step in range(first, first + steps):
        x, y = global_batch(step, data)
        if shard is not None:
            x, y = x[shard[0] :: shard[1]], y[shard[0] :: shard[1]]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        ranks.append(list(dlrt.ranks(model).values()))
    return losses, ranks


def factors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ the workers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: dict, out_dir: str) -> None:
    """One process of a scenario; writes ``out_dir/<rank>.pt`` (results) or ``<rank>.err`` (a traceback)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=scenario.get("timeout", 60)),
        )
        try:
            result = _run_scenario(rank, scenario, out)
        finally:
            if not scenario.get("die"):  # (the group lost a member)
                dist.destroy_process_group()
        torch.save(result, out / f"{rank}.pt")
    except BaseException:
        (out / f"{rank}.err").write_text(traceback.format_exc())
        raise


def _run_scenario(rank: int, scenario: dict, out: Path) -> dict:
    data = make_data()
    if scenario["kind"] == "integrators":  # each integrator: 50 steps, rank 0 saves a checkpoint after 25
        result = {}
        for integrator in scenario["integrators"]:
            model = make_model(seed=rank)
            opt = make_optimizer(model, integrator)
            losses, ranks = train_steps(model, opt, data, 25, shard=(rank, WORLD))
            if rank == 0:
                dlrt.save(out / f"{integrator}.safetensors", model, opt)
            more = train_steps(model, opt, data, STEPS - 25, first=25, shard=(rank, WORLD))
            comm = opt.communicator
            result[integrator] = dict(
                losses=losses + more[0],
                ranks=ranks + more[1],
                factors=factors(model),
                bytes=dict(comm.bytes),
                calls=dict(comm.calls),
            )
        return result
    # Rank 1 starts from another initialisation: the optimizer broadcasts rank 0's model.
    model = make_model(seed=rank)
    # Rank 1 truncates with another tau: the ranks rank 0 decides are adopted (DLRTOptimizer._agree_ranks).
    tau = scenario.get("tau_rank1", 0.15) if rank == 1 else 0.15
    opt = make_optimizer(model, scenario["integrator"])
    if scenario.get("load"):
        dlrt.load(scenario["load"], model, opt)
    opt.lowrank_group["tau"] = tau  # (after the load, which restores the saved hyper-parameters)
    first, result = scenario.get("first", 0), {}
    losses, ranks = train_steps(model, opt, data, scenario["steps"], first=first, shard=(rank, WORLD))
    result.update(losses=losses, ranks=ranks, factors=factors(model))
    if scenario.get("perturb"):
        opt.check_consistency()  # agrees before the perturbation
        if rank == 1:
            with torch.no_grad():
                model[2].S.add_(1e-3)
        try:
            opt.check_consistency()
            result["check"] = None
        except DistributedError as err:
            result["check"] = str(err)
    if scenario.get("die"):  # rank 1 dies without a word; rank 0's next step must fail, not hang
        if rank == 1:
            torch.save(result, out / "1.pt")
            os._exit(3)
        t0 = time.perf_counter()
        try:
            train_steps(model, opt, data, 20, first=first + scenario["steps"], shard=(rank, WORLD))
            result["dead_peer"] = None
        except DistributedError as err:
            result["dead_peer"] = str(err)
        result["dead_peer_seconds"] = time.perf_counter() - t0
    return result


def run_processes(scenario: dict, tmp_path: Path) -> list[dict]:
    """Run ``scenario`` in two spawned processes; their results by rank (a failed one fails the test)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, scenario, str(tmp_path)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"processes {hung} still running after {JOIN_TIMEOUT} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [(tmp_path / f"{r}.err").read_text() for r in range(WORLD) if (tmp_path / f"{r}.err").exists()]
    assert not errors, "\n".join(errors)
    return [torch.load(tmp_path / f"{r}.pt") if (tmp_path / f"{r}.pt").exists() else None for r in range(WORLD)]


def assert_close_state(a: dict, b: dict, tol: float) -> None:
    """The same weights ``W = U S Vᵀ`` of every low-rank layer, cores and dense parameters, to ``tol``.

    The bases themselves are compared only through ``W``: where singular values
    coincide (a parallel step's zero block) the singular vectors are not unique,
    and one process and two differ in round-off, which picks among them.
    """
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        if key.endswith(".U") or key.endswith(".V"):
            continue
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)
        if key.endswith(".S"):
            name = key[:-2]
            W = [d[f"{name}.U"] @ d[key] @ d[f"{name}.V"].mT for d in (a, b)]
            torch.testing.assert_close(W[0], W[1], rtol=tol, atol=tol, msg=f"{name}: U S Vᵀ")


# ------------------------------------------------------------------ tests
INTEGRATORS = ["bug", "parallel", "abc", "fixed"]


def test_two_processes_follow_one_process_on_the_global_batch(tmp_path):
    """Per integrator, 50 steps (with rank changes but for `fixed`): both processes hold identical U, S, V and
    ranks, equal (1e-6) to one process on the global batch; the checkpoint rank 0 wrote at step 25 resumes in
    one process to the same end; one all-reduce per pass (plus bug's and abc's contracted blocks and the ranks)."""
    results = run_processes({"kind": "integrators", "integrators": INTEGRATORS}, tmp_path)
    data = make_data()
    for integrator in INTEGRATORS:
        r0, r1 = results[0][integrator], results[1][integrator]
        for key in r0["factors"]:  # bit-identical on both processes
            assert torch.equal(r0["factors"][key], r1["factors"][key]), (integrator, key)
        assert r0["ranks"] == r1["ranks"], integrator

        model = make_model()
        opt = make_optimizer(model, integrator)
        losses, ranks = train_steps(model, opt, data, STEPS)
        if integrator != "fixed":
            assert len({tuple(r) for r in ranks}) > 2, f"{integrator}: the ranks should change: {ranks}"
        assert r0["ranks"] == ranks, integrator
        mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal halves: the global batch's mean
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-6, atol=1e-6, msg=integrator)
        assert_close_state(r0["factors"], factors(model), 1e-6)

        resumed = make_model(seed=5)
        opt = make_optimizer(resumed, integrator)
        dlrt.load(tmp_path / f"{integrator}.safetensors", resumed, opt)
        assert opt.communicator is None and opt.steps == 25
        train_steps(resumed, opt, data, STEPS - 25, first=25)
        assert_close_state(r0["factors"], factors(resumed), 1e-6)

        # 2 all-reduces at construction (the model's layout); per step one per pass, the ranks, and for bug/abc
        # the contracted blocks of the new directions (parallel too: the gradient rank rule reads Ũᵀ G₀ Ṽ)
        per_step = {"bug": 3, "parallel": 3, "abc": 3, "fixed": 3}[integrator]
        assert r0["calls"]["all_reduce"] == 2 + STEPS * per_step, integrator
    # fixed keeps rank 12: the payload is known. Layers "0" (48×20) and "2" (48×48); dense: 2 biases of 48 and
    # the head's 5×48 + 5. K/L pass: S, G V, Gᵀ U of both layers, the dense grads, 10 presence flags and the
    # loss flag; S pass: the two S, the dense grads, 6 + 1 flags; the ranks: 2 layers × (r, −r) × 2 int64.
    dense = 48 + 48 + 5 * 48 + 5
    kl_pass = (144 + 48 * 12 + 20 * 12) + (144 + 48 * 12 + 48 * 12) + dense + 11
    s_pass = 144 + 144 + dense + 7
    construction = 8 * (2 * 2 + 2 * (4 + 10))  # counts of layers and parameters; ranks and sizes
    expected = construction + STEPS * (8 * (kl_pass + s_pass) + 8 * 8)
    assert results[0]["fixed"]["bytes"]["all_reduce"] == expected


@pytest.fixture(scope="module")
def resumed_in_two(tmp_path_factory):
    """One process trains `parallel` 20 steps and saves; two processes load it and train 30 more, rank 1 with
    another tau; then they run the consistency check, rank 1 changes a factor, checks again, and dies."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    data = make_data()
    model = make_model()
    opt = make_optimizer(model, "parallel")
    train_steps(model, opt, data, 20)
    dlrt.save(tmp_path / "start.safetensors", model, opt)
    losses, ranks = train_steps(model, opt, data, 30, first=20)
    assert len({tuple(r) for r in ranks}) > 1, ranks
    scenario = {
        "kind": "train",
        "integrator": "parallel",
        "load": str(tmp_path / "start.safetensors"),
        "first": 20,
        "steps": 30,
        "tau_rank1": 0.5,
        "perturb": True,
        "die": True,
        "timeout": 20,
    }
    return run_processes(scenario, tmp_path), losses, ranks, factors(model)


def test_single_process_checkpoint_resumes_in_two_and_rank_0_decides_the_ranks(resumed_in_two):
    """A one-process checkpoint continues in two processes. Rank 1 truncates with another tau: the ranks and
    factors rank 0 decided are adopted, so both end where one process with rank 0's tau ends. A factor changed on
    one process is reported by check_consistency, naming the layer."""
    (r0, r1), losses, ranks, reference = resumed_in_two
    assert r0["ranks"] == r1["ranks"] == ranks
    for key in r0["factors"]:
        assert torch.equal(r0["factors"][key], r1["factors"][key]), key
    assert_close_state(r0["factors"], reference, 1e-6)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-6, atol=1e-6)
    for r in (r0, r1):
        assert r["check"] is not None and "layer '2'" in r["check"] and "diverged" in r["check"]


def test_a_dead_peer_is_a_clear_error_not_a_hang(resumed_in_two):
    """Rank 1 dies; rank 0's next all-reduce fails, within the process-group timeout (20 s) at most."""
    (r0, _), *_ = resumed_in_two
    assert r0["dead_peer"] is not None, "rank 0 trained on without its peer"
    assert "peer process has probably died" in r0["dead_peer"] and "all-reduce" in r0["dead_peer"]
    assert r0["dead_peer_seconds"] < 30


def test_check_every_and_process_group_are_validated():
    model = make_model()
    with pytest.raises(ValueError, match="check_every"):
        dlrt.DLRTOptimizer(model, check_every=-1)
    with pytest.raises(ValueError, match="not initialised"):
        dlrt.DLRTOptimizer(model, process_group=object())
    assert dlrt.DLRTOptimizer(model).communicator is None  # no process group: single process, nothing sent


_GROUP_OUTLIVES_RUN = """
import json, os, sys, torch
from torch import nn
import dlrt
from dlrt import distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

with distributed.init_from_env(torch.device("cpu"), 60):
    fresh = "torch._dynamo" not in sys.modules
    dlrt.DLRTOptimizer(dlrt.convert(nn.Sequential(nn.Linear(8, 8)), rank=2), lr=0.1)  # imports torch._dynamo
    during = gloo_threads()
print(json.dumps({"fresh": fresh, "dynamo": "torch._dynamo" in sys.modules, "during": during, "after": gloo_threads()}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads through /proc")
def test_the_process_group_ends_with_the_run_when_torch_imports_dynamo_mid_run():
    """torch.optim imports torch._dynamo the first time an optimizer is built, and with it modules whose
    defaults hold ``group.WORLD``: imported mid-run, they kept the group's gloo threads alive past
    ``destroy_process_group``, and torchrun's processes aborted at exit after a completed run."""
    env = {
        **os.environ,
        **{"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", _GROUP_OUTLIVES_RUN], env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["fresh"] and seen["dynamo"], seen  # the optimizer did import torch._dynamo inside the run
    assert seen["during"], seen  # the group had gloo threads
    assert seen["after"] == [], seen


@pytest.mark.slow
def test_dlrt_train_under_torchrun_writes_exactly_one_run_directory(data_root, tmp_path):
    """`torchrun --nproc_per_node 2 -m dlrt train`: one run directory, written by rank 0, whose checkpoint
    resumes in one process; both processes print the same evaluation."""
    pytest.importorskip("yaml")
    runs = tmp_path / "runs"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "dlrt",
        "train",
        "dataset=mnist",
        f"data_root={data_root}",
        "model=mlp",
        "rank=8",
        "epochs=2",
        "batch_size=16",
        "eval_batch_size=20",
        "optimizer=sgd",
        "lr=0.05",
        "device=cpu",
        f"runs_dir={runs}",
        "progress=false",
        "tensorboard=false",
        "plots=false",
        "threads=1",
        "dist_timeout=60",
        "check_every=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    dirs = list(runs.iterdir())
    assert len(dirs) == 1, dirs
    run = dirs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    from dlrt.training import read_metrics
    from dlrt.training.loop import read_steps

    assert read_steps(run)[-1]["step"] == 6  # 96 images / (2 processes × 16) = 3 steps per epoch
    rows = read_metrics(run)
    assert len(rows) == 2 and math.isfinite(rows[-1]["test_loss"])
    assert out.count(f"completed: {run}") == 1  # rank 0 alone reports (the others print nothing)

    import yaml

    from dlrt.training import train

    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["epochs"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    result = train(resume_dir=run)  # one process continues the two-process run for a third epoch
    assert result.status == "completed" and result.summary["epochs_completed"] == 3
