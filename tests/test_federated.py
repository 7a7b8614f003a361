"""FeDLRT, FedAvg and FedLin (dlrt.federated): the round against centralised DLRT, the variance correction,
aggregation, faults, accounting, the split, the command, and the Flower simulation runtime."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from torch import nn

import dlrt
from dlrt.federated import (
    Client,
    InProcess,
    Server,
    check_reply,
    partition,
    pass_macs,
    run_round,
)
from dlrt.federated.protocol import _positions, dense_state, lowrank_layers, payload_floats

F64 = torch.float64


def small_model(rank: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    dlrt.convert(model, rank=rank, exclude=("4",))
    return model


def client_data(n: int, seed: int, shift: float = 0.0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=F64) + shift
    y = (x[:, 0] + x[:, 1] > 2 * shift).long() + (x[:, 2] > shift).long()
    return torch.utils.data.TensorDataset(x, y)


def make_clients(model: nn.Module, datasets, *, share: bool = True, **kw) -> dict[int, Client]:
    kw = {"method": "fedlrt", "correction": "full", "lr": 0.1, "local_steps": 4, "batch_size": 64, **kw}
    return {c: Client(model if share else copy.deepcopy(model), d, client_id=c, **kw) for c, d in enumerate(datasets)}


def weight(layer) -> torch.Tensor:
    return layer.U.detach() @ layer.S.detach() @ layer.V.detach().mT


def run_rounds(server: Server, engine: InProcess, rounds: int, participants, min_clients: int = 1):
    records = []
    for rnd in range(1, rounds + 1):
        engine.round = rnd
        records.append(run_round(server, engine.send, participants, rnd=rnd, min_clients=min_clients))
    return records


# --------------------------------------------------------------------------- the round
@pytest.mark.parametrize("correction", ["full", "simplified", "none"])
def test_one_client_equals_centralised_bug(correction):
    """One client, full batches: a round is one cycle of rank-adaptive BUG with local_steps coefficient steps.

    Both truncate by the relative rule: under the gradient rule the server's trend is the round's movement
    (all local steps), the centralised cycle's its last S-step's gradient."""
    steps, rounds, lr, tau = 3, 3, 0.5, 0.02
    data = client_data(48, seed=1)
    central = small_model()
    server = Server(copy.deepcopy(central), method="fedlrt", correction=correction, tau=tau, tau_mode="relative")
    clients = make_clients(copy.deepcopy(central), [data], correction=correction, lr=lr, local_steps=steps)
    x, y = data.tensors
    opt = dlrt.DLRTOptimizer(
        central, integrator="bug", optimizer="sgd", lr=lr, tau=tau, coefficient_steps=steps, tau_mode="relative"
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(central(x), y)
        loss.backward()
        return loss

    engine = InProcess(clients)
    for rnd in range(1, rounds + 1):
        for _ in range(steps):
            opt.step(closure)
        engine.round = rnd
        record = run_round(server, engine.send, [0], rnd=rnd)
        assert record.completed and record.aggregated == [0]
        for name, layer in lowrank_layers(central).items():
            mine = server.layers[name]
            assert mine.rank == layer.rank, (rnd, name)
            torch.testing.assert_close(weight(mine), weight(layer), rtol=0, atol=1e-10)
        for k, t in dense_state(central).items():
            torch.testing.assert_close(server.dense[k], t.detach(), rtol=0, atol=1e-10)
    assert any(layer.rank != 2 for layer in lowrank_layers(central).values())  # the ranks did move


def test_every_client_trains_from_the_same_augmented_bases(monkeypatch):
    seen = []
    original = Client._drive

    def record(self, opt, rnd):
        layers = lowrank_layers(self.model)
        seen.append(
            (
                {n: (ly.U.detach().clone(), ly.S.detach().clone(), ly.V.detach().clone()) for n, ly in layers.items()},
                {n: (ly.U.detach().clone(), ly.V.detach().clone()) for n, ly in server.layers.items()},
            )
        )
        return original(self, opt, rnd)

    monkeypatch.setattr(Client, "_drive", record)
    model = small_model()
    server = Server(copy.deepcopy(model), method="fedlrt", correction="simplified", tau=0.1)
    datasets = [client_data(30 + 10 * c, seed=c, shift=0.5 * c) for c in range(3)]
    engine = InProcess(make_clients(model, datasets, share=False, correction="simplified", grad_batches=1))
    run_rounds(server, engine, 2, range(3))
    assert len(seen) == 6
    for rnd in range(2):
        first, server_bases = seen[3 * rnd]
        for clients_view, _ in seen[3 * rnd + 1 : 3 * rnd + 3]:
            for name, (U, S, V) in first.items():
                assert torch.equal(clients_view[name][0], U) and torch.equal(clients_view[name][2], V)
                assert torch.equal(clients_view[name][1], S)
        for name, (U, V) in server_bases.items():
            assert torch.equal(first[name][0], U) and torch.equal(first[name][2], V)
            r_u = first[name][1].shape[0]
            assert r_u > 2  # augmented
            torch.testing.assert_close(U.mT @ U, torch.eye(r_u, dtype=F64), rtol=0, atol=1e-12)


def quadratic_problem():
    """Three clients with different least-squares targets; the model sits at the global minimiser."""
    gens = [torch.Generator().manual_seed(c) for c in range(3)]
    datasets = []
    for c, g in enumerate(gens):
        x = torch.randn(20 + 5 * c, 4, generator=g, dtype=F64) + c
        A = torch.randn(3, 4, generator=g, dtype=F64)
        datasets.append(torch.utils.data.TensorDataset(x, x @ A.mT))
    X = torch.cat([d.tensors[0] for d in datasets])
    Y = torch.cat([d.tensors[1] for d in datasets])
    W_star = torch.linalg.solve(X.mT @ X, X.mT @ Y).mT  # argmin Σ ½‖W x − y‖² over all samples
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).to(F64)
    dlrt.convert(model, rank=3, exclude=())
    layer = lowrank_layers(model)["0"]
    U, s, Vh = torch.linalg.svd(W_star, full_matrices=False)
    layer.set_factors(U, torch.diag(s), Vh.mT)
    return model, datasets, W_star


def mse(out, y):
    return 0.5 * (out - y).square().sum(-1).mean()


@pytest.mark.parametrize("correction", ["full", "none"])
def test_variance_correction_removes_client_drift(correction):
    model, datasets, W_star = quadratic_problem()
    server = Server(copy.deepcopy(model), method="fedlrt", correction=correction, tau=1e-12)
    clients = make_clients(model, datasets, correction=correction, lr=0.02, local_steps=10, loss=mse)
    run_rounds(server, InProcess(clients), 2, range(3))
    drift = float((weight(server.layers["0"]) - W_star).norm() / W_star.norm())
    if correction == "full":
        assert drift < 1e-12  # the corrected local gradient vanishes at the global stationary point
    else:
        assert drift > 1e-3  # heterogeneous clients pull the average away from it


def test_aggregation_does_not_depend_on_client_order():
    model = small_model()
    datasets = [client_data(20 + 7 * c, seed=c, shift=0.3 * c) for c in range(3)]
    clients = make_clients(copy.deepcopy(model), datasets, correction="full")
    servers = [Server(copy.deepcopy(model), method="fedlrt", correction="full", tau=0.1) for _ in range(2)]
    states = {c: {} for c in clients}
    for stage in servers[0].stage_names:
        payload = servers[0].broadcast(stage)
        replies = {c: clients[c].handle(stage, payload, states[c], 1) for c in clients}
        servers[0].aggregate(stage, replies)
        servers[1].aggregate(stage, dict(reversed(list(replies.items()))))
        if stage == "basis":  # the weighted mean, by hand
            n = torch.tensor([float(replies[c]["n"]) for c in clients], dtype=F64)
            gK = sum(replies[c]["gK/0"] * n[c] for c in clients) / n.sum()
            Ub = servers[0].layers["0"].U.detach()[:, 2:]
            assert torch.linalg.matrix_rank(torch.cat([servers[0].layers["0"].U.detach()[:, :2], Ub], 1)) == 4
            residual = gK - servers[0].layers["0"].U.detach() @ (servers[0].layers["0"].U.detach().mT @ gK)
            assert float(residual.norm()) < 1e-12 * max(1.0, float(gK.norm()))  # range(G V) ⊂ range(Û)
    for a, b in zip(servers[0].model.state_dict().values(), servers[1].model.state_dict().values()):
        assert torch.equal(a, b)


def test_dropped_and_malformed_clients_are_left_out():
    model = small_model()
    datasets = [client_data(24, seed=c, shift=0.2 * c) for c in range(4)]
    start = copy.deepcopy(model)

    def wrong_shape(reply):
        reply["gK/0"] = torch.zeros(3, 3, dtype=F64)
        return reply

    def not_finite(reply):
        reply["Shat/0"] = reply["Shat/0"].clone()
        reply["Shat/0"][0, 0] = float("nan")
        return reply

    def engine():
        e = InProcess(make_clients(copy.deepcopy(model), datasets, correction="simplified"))
        e.faults = {(1, "train"): "drop", (2, "basis"): wrong_shape, (3, "train"): not_finite}
        return e

    server = Server(copy.deepcopy(model), method="fedlrt", correction="simplified", tau=0.1)
    (record,) = run_rounds(server, engine(), 1, range(4))
    assert record.completed and record.aggregated == [0]
    assert set(record.dropped) == {1} and set(record.rejected) == {2, 3}
    assert "gK/0 has shape (3, 3)" in record.rejected[2] and "non-finite" in record.rejected[3]
    assert all(torch.isfinite(t).all() for t in server.model.state_dict().values())
    # 1 and 3 answered the basis stage well (their work counts), 2 did not; only 0 trained.
    assert record.macs[1] == record.macs[3] < record.macs[0] and 2 not in record.macs

    strict = Server(copy.deepcopy(model), method="fedlrt", correction="simplified", tau=0.1)
    (record,) = run_rounds(strict, engine(), 1, range(4), min_clients=2)
    assert not record.completed and record.failed_stage == "train"
    for a, b in zip(strict.model.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b)  # an abandoned round leaves the global model as it was


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"n": torch.tensor(3.0), "loss": torch.tensor(0.0), "macs": torch.tensor(0.0)}, "missing g"),
        ({"g": torch.ones(2), "n": torch.tensor(0.0), "loss": torch.tensor(0.0), "macs": torch.tensor(0.0)}, "n=0"),
        ({"g": torch.ones(2, dtype=torch.long), "n": torch.tensor(1.0), "loss": torch.tensor(0.0)}, "floating"),
        ({"g": torch.ones(2), "x": torch.ones(1), "n": torch.tensor(1.0), "loss": torch.tensor(0.0)}, "unexpected x"),
        ({"g": torch.tensor([1.0, float("inf")]), "n": torch.tensor(1.0), "loss": torch.tensor(0.0)}, "non-finite"),
        ("junk", "mapping"),
    ],
)
def test_check_reply_names_the_problem(reply, why):
    spec = {"g": (2,), "n": (), "loss": ()}
    if isinstance(reply, dict):
        reply = {k: v for k, v in reply.items() if k != "macs"}
    assert why in check_reply(reply, spec)
    assert check_reply({"g": torch.ones(2), "n": torch.tensor(1.0), "loss": torch.tensor(0.0)}, spec) is None


# --------------------------------------------------------------------------- accounting
def test_traffic_per_round_matches_the_algorithm():
    model = small_model()
    datasets = [client_data(16, seed=c) for c in range(2)]
    server = Server(copy.deepcopy(model), method="fedlrt", correction="full", tau=1e-12)
    layers = {n: (ly.U.shape[0], ly.V.shape[0], ly.rank) for n, ly in server.layers.items()}
    dense = sum(t.numel() for t in server.dense.values())
    (record,) = run_rounds(server, InProcess(make_clients(model, datasets)), 1, range(2))
    # basis: U, S, V and the dense weights down; G V, Gᵀ U and the dense gradients up. coef: Ū, V̄ down, ∇_Ŝ up.
    # train: the global ∇_Ŝ and dense gradients down; Ŝ and the dense weights up (every layer adds r directions).
    down = sum((n + m) * r + r * r + (n + m) * r + 4 * r * r for n, m, r in layers.values()) + 2 * dense
    up = sum((n + m) * r + 4 * r * r + 4 * r * r for n, m, r in layers.values()) + 2 * dense
    assert record.floats_down == {0: down, 1: down} and record.floats_up == {0: up, 1: up}

    avg = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    server = Server(avg, method="fedavg", correction="none")
    clients = make_clients(copy.deepcopy(avg), datasets, method="fedavg", correction="none")
    (record,) = run_rounds(server, InProcess(clients), 1, range(2))
    params = sum(p.numel() for p in avg.parameters())
    assert record.floats_down[0] == params and record.floats_up[0] == params


@pytest.mark.parametrize("kind", ["dense", "basis", "coef"])
def test_client_macs_match_counted_matmuls(kind):
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "dense":
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    else:
        model = small_model(rank=3)
        for layer in lowrank_layers(model).values():
            layer.contraction = "thin"
            layer.grad_request = frozenset({"K", "L"}) if kind == "basis" else frozenset()
            layer.U.requires_grad_(False)
            layer.V.requires_grad_(False)
    x = torch.randn(5, 8, dtype=F64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).square().sum().backward()
    positions = _positions(model, x.detach())
    assert 2 * pass_macs(model, positions, kind) * 5 == counter.get_total_flops()


def test_payload_floats_leave_out_the_reply_metadata():
    reply = {"a": torch.ones(2, 3), "n": torch.tensor(4.0), "loss": torch.tensor(1.0), "macs": torch.tensor(9.0)}
    assert payload_floats(reply) == 6


# --------------------------------------------------------------------------- the split
def test_iid_split_covers_every_sample_once_and_is_seeded():
    labels = torch.arange(103) % 10
    parts = partition(labels, 4, seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert [p.numel() for p in parts] == [26, 26, 26, 25]
    assert all(torch.equal(a, b) for a, b in zip(parts, partition(labels, 4, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(parts, partition(labels, 4, seed=4)))


def test_dirichlet_split_is_skewed_by_alpha_and_seeded():
    labels = torch.arange(2000) % 10

    def spread(alpha):
        parts = partition(labels, 5, alpha=alpha, seed=0)
        assert sorted(torch.cat(parts).tolist()) == list(range(2000))
        # the mean number of classes holding 80 % of a client's samples
        counts = [torch.bincount(labels[p], minlength=10).sort(descending=True).values.float() for p in parts]
        return sum(int((c.cumsum(0) / c.sum() < 0.8).sum()) + 1 for c in counts) / len(counts)

    assert spread(0.1) <= 3 < 7 <= spread(100.0)
    a, b = partition(labels, 5, alpha=0.1, seed=0), partition(labels, 5, alpha=0.1, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 5, alpha=0.0)
    with pytest.raises(ValueError, match="cannot give"):
        partition(labels[:3], 5)


# --------------------------------------------------------------------------- the command
def federated_args(data_root, tmp_path, *extra):
    return [
        "federated",
        "model=mlp",
        f"data_root={data_root}",
        "clients=2",
        "rounds=2",
        "local_steps=2",
        "batch_size=16",
        "grad_batches=1",
        "rank=4",
        "threads=1",
        f"runs_dir={tmp_path}",
        "name=fed",
        "plots=false",
        *extra,
    ]


def test_dlrt_federated_writes_a_run_directory(data_root, tmp_path, capsys):
    from dlrt.cli import main

    assert main(federated_args(data_root, tmp_path, "dirichlet_alpha=0.5")) == 0
    run = tmp_path / "fed"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["test_acc"]) <= 1 and float(r["bytes_client"]) > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "fedlrt" and summary["rounds"] == 2 and len(summary["bytes_per_client"]) == 2
    assert (run / "checkpoint.safetensors").is_file() and (run / "config.yaml").is_file()
    assert "round 2:" in capsys.readouterr().out
    assert main(federated_args(data_root, tmp_path)) == 2  # the name is taken: nothing is overwritten
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("method=fedprox", "method='fedprox' is not one of"),
        ("participation=0", "participation"),
        ("min_clients=3", "min_clients=3 exceeds"),
        ("lr=nan", "lr must be a finite number"),
        ("optimizer=adam", "optimizer='adam'"),
    ],
)
def test_dlrt_federated_refuses_bad_config(data_root, tmp_path, capsys, bad, message):
    from dlrt.cli import main

    assert main(federated_args(data_root, tmp_path, bad)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()


@pytest.mark.slow
def test_flower_simulation_gives_the_in_process_curve(data_root, tmp_path):
    pytest.importorskip("flwr")
    from dlrt.federated import federate
    from dlrt.training.config import FederatedConfig, load_config

    args = federated_args(data_root, tmp_path)[1:]
    inprocess = federate(load_config(None, [*args[:-2], "name=a", "plots=false", "progress=false"], FederatedConfig))
    flower = federate(
        load_config(None, [*args[:-2], "name=b", "plots=false", "progress=false", "engine=flower"], FederatedConfig)
    )
    assert flower.status == "completed" and len(flower.rows) == 2
    for a, b in zip(inprocess.rows, flower.rows):
        for key in ("test_acc", "test_loss", "train_loss", "bytes_client", "macs_client", "total_rank"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("how", ["ctrl-c", "SIGTERM", "SIGUSR1"])
def test_ctrl_c_or_sigterm_mid_round_keeps_the_last_completed_round(data_root, tmp_path, monkeypatch, capsys, how):
    import signal

    from dlrt.federated import federate
    from dlrt.training.config import FederatedConfig, load_config

    args = [*federated_args(data_root, tmp_path)[1:-2], "progress=false", "plots=false"]
    one = federate(load_config(None, [*args, "rounds=1", "name=one"], FederatedConfig))
    original = Client.handle

    def interrupt(self, stage, payload, state, rnd):
        if rnd == 2 and stage == "train":
            if how == "ctrl-c":
                raise KeyboardInterrupt
            signal.raise_signal(getattr(signal, how))  # (it would end the process were it not handled)
        return original(self, stage, payload, state, rnd)

    monkeypatch.setattr(Client, "handle", interrupt)
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)  # (what an earlier test's library may have installed)
    stopped = federate(load_config(None, [*args, "rounds=3", "name=stopped"], FederatedConfig))
    assert stopped.status == "interrupted" and [r["round"] for r in stopped.rows] == [1]
    by = "Ctrl-C" if how == "ctrl-c" else how
    assert f"interrupted by {by}: the global model of round 1 is in" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    from safetensors.torch import load_file

    a, b = load_file(one.run_dir / "checkpoint.safetensors"), load_file(stopped.run_dir / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_client_that_missed_the_basis_stage_says_so():
    model = small_model()
    client = make_clients(model, [client_data(16, seed=0)])[0]
    server = Server(copy.deepcopy(model), method="fedlrt", correction="none", tau=0.1)
    state: dict = {}
    server.aggregate("basis", {0: client.handle("basis", server.broadcast("basis"), state, 1)})
    with pytest.raises(ValueError, match="did not take part in this round's basis stage"):
        client.handle("train", server.broadcast("train"), {}, 1)
    assert check_reply(client.handle("train", server.broadcast("train"), state, 1), server.reply_spec("train")) is None


def test_partial_participation_samples_a_seeded_share_each_round():
    from dlrt.federated.run import sample_clients
    from dlrt.training.config import FederatedConfig

    cfg = FederatedConfig(clients=16, participation=0.25, seed=3)
    rounds = [sample_clients(cfg, r) for r in range(1, 21)]
    assert all(len(s) == 4 and len(set(s)) == 4 and all(0 <= c < 16 for c in s) for s in rounds)
    assert rounds == [sample_clients(cfg, r) for r in range(1, 21)]  # seeded
    assert len({tuple(s) for s in rounds}) > 10  # a new sample every round
    assert len({c for s in rounds for c in s}) == 16  # every client takes part over time
    assert sample_clients(FederatedConfig(clients=5), 7) == [0, 1, 2, 3, 4]


def test_the_server_grows_ranks_under_the_gradient_rule_and_not_under_the_relative_one():
    # Two clients from rank 1: the rounds' mean movement has a normal component the rank-1 bases cannot hold.
    ranks = {}
    for rule in ("gradient", "relative"):
        model = small_model(rank=1)
        server = Server(copy.deepcopy(model), method="fedlrt", correction="full", tau=0.1, tau_mode=rule)
        datasets = [client_data(64, seed=s) for s in (1, 2)]
        engine = InProcess(make_clients(copy.deepcopy(model), datasets, share=False, lr=0.1))
        run_rounds(server, engine, 6, [0, 1])
        ranks[rule] = [ly.rank for ly in server.layers.values()]
    assert ranks["relative"] == [1, 1]
    assert max(ranks["gradient"]) > 1
