"""FeDLRT deployed on Flower: one SuperLink and two SuperNodes on 127.0.0.1, the run submitted with ``flwr run``.

The app is the one shipped in ``examples/flower_app`` (docs/federated.md). The slow
test starts every process itself, in its own session, with Flower's home and the
user's home pointed into ``tmp_path``, bounds every wait by a timeout and kills
every process it started, and their children, when it ends.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
#: Seconds from starting the processes to the run's summary.json (about a minute on a loaded 2-core machine:
#: Flower starts a fresh Python process, which imports torch, for every message a SuperNode handles).
RUN_TIMEOUT = 240.0


def _app_run_config() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: flwr's dependency
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_shipped_app_config_holds_every_federated_key_at_its_default():
    from dlrt.federated.flower import config_from_run_config
    from dlrt.training.config import FederatedConfig

    run_config = _app_run_config()
    assert sorted(run_config) == sorted(FederatedConfig().to_dict())
    assert config_from_run_config(run_config) == FederatedConfig(engine="flower")


def test_flower_accepts_the_shipped_app():
    pytest.importorskip("flwr")
    from flwr.cli.config_utils import load_and_validate

    # check_module=True: Flower looks for the components' names in dlrt/federated/flower.py without importing it.
    config, _ = load_and_validate(APP / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "dlrt.federated.flower:server_app",
        "clientapp": "dlrt.federated.flower:client_app",
    }


# ------------------------------------------------------------------ processes
def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install 'flwr[simulation]==1.42.0'")
    return str(path)


def _processes() -> dict[int, tuple[int, int]]:
    """Every live process on this machine: pid -> (parent pid, process group), from /proc (empty without it)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if state not in ("Z", "X"):
            out[int(stat.parent.name)] = (int(ppid), int(pgrp))
    return out


def _groups(procs: list[subprocess.Popen]) -> set[int]:
    """The process groups of ``procs`` and of all their descendants (Flower starts some in their own session)."""
    table = _processes()
    groups = {p.pid for p in procs if p.poll() is None}  # start_new_session: each leads its own group
    todo = [p.pid for p in procs if p.pid in table]
    while todo:
        pid = todo.pop()
        groups.add(table[pid][1])
        todo += [child for child, (parent, _) in table.items() if parent == pid]
    return groups - {os.getpgrp()}


def _killpg(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            continue


def _stop(procs: list[subprocess.Popen]) -> set[int]:
    """SIGTERM to every process group started, SIGKILL to those left after 10 s; returns the groups."""
    groups = _groups(procs)
    _killpg(groups, signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    groups |= _groups(procs)
    left = {group for _, group in _processes().values()} | {p.pid for p in procs if p.poll() is None}
    _killpg(groups & left, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10.0)
    return groups


def _alive(groups: set[int], timeout: float = 10.0) -> list[int]:
    """The processes still in ``groups`` after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, (_, group) in _processes().items() if group in groups]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _tail(path: Path, n: int = 30) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return f"--- {path.name}\n" + "\n".join(lines[-n:])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


@pytest.mark.slow
def test_superlink_and_two_supernodes_on_loopback_run_one_round(data_root, tmp_path):
    pytest.importorskip("flwr")
    from dlrt.federated import federate
    from dlrt.training.config import FederatedConfig

    superlink = _executable("flower-superlink")
    supernode = _executable("flower-supernode")
    flwr = _executable("flwr")
    overrides = {
        "clients": 2,
        "rounds": 1,
        "model": "mlp",
        "dataset": "mnist",
        "data_root": str(data_root),
        "limit": 96,
        "local_steps": 2,
        "grad_batches": 1,
        "min_clients": 2,
        "threads": 1,
        "timeout": 120.0,
        "runs_dir": str(tmp_path / "runs"),
        "name": "deploy",
        "plots": False,
    }
    (tmp_path / "overrides.toml").write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in overrides.items()))
    home, flwr_home = tmp_path / "home", tmp_path / "flwr"
    home.mkdir()
    flwr_home.mkdir()
    link_port, *node_ports = _free_ports(3)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: the environment's bin first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "HOME": str(home), "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.1"  # seconds; Flower polls for a new message every 1 s by default
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "supernode0", "supernode1", "flwr-run")}
    commands = {
        "superlink": [
            superlink,
            "--insecure",
            "--host=127.0.0.1",
            f"--port={link_port}",
            "--disable-runtime-dependency-installation",
        ],
        **{
            f"supernode{k}": [
                supernode,
                "--insecure",
                f"--superlink=127.0.0.1:{link_port}",
                "--host=127.0.0.1",
                f"--port={node_ports[k]}",
                f"--node-config=partition-id={k} num-partitions=2",
            ]
            for k in range(2)
        },
    }
    run_dir = tmp_path / "runs" / "deploy"
    procs: list[subprocess.Popen] = []

    def failure(what: str) -> str:
        return what + "\n" + "\n".join(_tail(path) for path in logs.values())

    t0 = time.monotonic()
    try:
        for name, command in commands.items():
            with logs[name].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        # The reference: the same config in this process, while the SuperNodes start.
        reference = federate(FederatedConfig(**{**overrides, "progress": False}), write=False)
        while True:
            try:
                socket.create_connection(("127.0.0.1", link_port), timeout=1.0).close()
                break
            except OSError:
                assert procs[0].poll() is None, failure("the SuperLink exited")
                assert time.monotonic() - t0 < 60.0, failure("the SuperLink did not listen within 60 s")
                time.sleep(0.2)
        with logs["flwr-run"].open("w") as log:
            submit = subprocess.Popen(
                [flwr, "run", str(APP), "test", "--run-config", str(tmp_path / "overrides.toml")],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(submit)
            assert submit.wait(timeout=60.0) == 0, failure("flwr run failed")
        assert "Successfully started run" in logs["flwr-run"].read_text(), failure("flwr run started no run")
        while not (run_dir / "summary.json").exists():
            dead = [name for name, p in zip(commands, procs) if p.poll() is not None]
            assert not dead, failure(f"{dead} exited before the run ended")
            assert time.monotonic() - t0 < RUN_TIMEOUT, failure(f"no summary.json within {RUN_TIMEOUT:g} s")
            time.sleep(0.5)
        summary = json.loads((run_dir / "summary.json").read_text())
        with (run_dir / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
    finally:
        groups = _stop(procs)
    assert not _alive(groups), "processes of the deployment outlived the test"

    assert summary["status"] == "completed" and summary["engine"] == "flower"
    assert summary["rounds"] == 1 and len(rows) == 1
    assert summary["dropped"] == {} and summary["rejected"] == {} and summary["abandoned_rounds"] == []
    row = rows[0]
    assert (int(row["clients"]), int(row["dropped"]), int(row["rejected"])) == (2, 0, 0)
    assert math.isfinite(summary["test_acc"]) and 0.0 <= summary["test_acc"] <= 1.0
    # The deployed run is the in-process run: Flower carries the payloads and adds nothing.
    expected = reference.rows[0]
    for key in ("test_acc", "test_loss", "train_loss", "bytes_client", "macs_client", "total_rank"):
        assert float(row[key]) == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
