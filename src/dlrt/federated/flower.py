"""FeDLRT, FedAvg and FedLin on Flower (``flwr``): a ServerApp, a ClientApp and the simulation runtime.

The apps carry the same payloads as the in-process engine, one Flower Message per
client and stage: the server's payload as an ``ArrayRecord`` and the stage, round
and run config in a ``ConfigRecord``; the client's reply as an ``ArrayRecord``.
The round itself is :func:`dlrt.federated.protocol.run_round`, driven by
:func:`dlrt.federated.run.run_rounds` with :class:`GridTransport` as its engine,
so Flower adds transport and nothing else (docs/federated.md).

* ``engine=flower`` of ``dlrt federated`` runs :func:`simulate`: Flower's
  simulation runtime with one SuperNode per client.
* Deployed (one SuperLink, N SuperNodes, ``flwr run``): the apps are
  ``dlrt.federated.flower:server_app`` and ``dlrt.federated.flower:client_app``;
  the run config holds the ``dlrt federated`` keys, every SuperNode its
  ``partition-id`` in its node config.

A client keeps what it needs between the stages of a round in its node's
``Context.state``; it finds its share of the data from ``partition-id`` and the
run config (the split is seeded, so every node computes the same one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from ..training.config import FederatedConfig
from .protocol import Client, Payload

# server_app and client_app are built on first access (the module __getattr__ below); they must be listed here
# because `flwr run` checks an app's components by reading this file's top-level names, without importing it.
__all__ = ["GridTransport", "client_app", "config_from_run_config", "server_app", "simulate"]  # noqa: F822

STATE_KEY = "dlrt-client-state"


def _flwr() -> Any:
    try:
        import flwr
    except ImportError as err:
        raise ImportError(
            "engine=flower needs Flower: pip install 'flwr[simulation]==1.42.0' (or pip install 'dlrt[federated]')",
            name="flwr",
        ) from err
    import flwr.app
    import flwr.clientapp
    import flwr.serverapp

    return flwr


def _to_record(payload: Payload) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in payload.items()})


def _from_record(record: Any) -> Payload:
    return dict(record.to_torch_state_dict())


def config_from_run_config(run_config: dict[str, Any]) -> FederatedConfig:
    """The :class:`FederatedConfig` of a Flower run config (``dlrt federated`` keys; ``-`` may stand for ``_``)."""
    from ..training.config import load_config

    overrides = [f"{k.replace('-', '_')}={v}" for k, v in run_config.items()]
    return load_config(None, overrides, cls=FederatedConfig)


# ------------------------------------------------------------------ the server side
class GridTransport:
    """The engine over a Flower ``Grid``: one Message per client and stage, replies collected with a timeout.

    On entry it waits (up to ``cfg.timeout``) for ``cfg.clients`` nodes and asks each
    for its ``partition-id``, so that client ``c`` of the round is the node holding
    partition ``c``. A node that does not answer within the timeout, or answers with
    an error, is reported as dropped (its error text).
    """

    def __init__(self, grid: Any, cfg: FederatedConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.nodes: dict[int, int] = {}
        self.round = 0
        self._config = json.dumps(dataclasses.asdict(cfg))

    def __enter__(self) -> GridTransport:
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        deadline = time.monotonic() + self.cfg.timeout
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.cfg.clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        msgs = [
            Message(
                content=RecordDict({"meta": ConfigRecord({"config": self._config})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in node_ids
        ]
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg.timeout):
            if reply.has_error():
                continue
            partition, node = int(reply.content["meta"]["partition"]), reply.metadata.src_node_id
            if partition in self.nodes:
                raise RuntimeError(
                    f"nodes {self.nodes[partition]} and {node} both hold partition-id {partition}: give every "
                    "SuperNode its own --node-config 'partition-id=K'"
                )
            self.nodes[partition] = node
        missing = [c for c in range(self.cfg.clients) if c not in self.nodes]
        if len(self.nodes) < self.cfg.min_clients:
            raise RuntimeError(
                f"only {len(self.nodes)} Flower nodes answered (partitions {sorted(self.nodes)}); "
                f"min_clients={self.cfg.min_clients}: start more SuperNodes or lower min_clients"
            )
        if missing:
            print(f"flower: no node holds partitions {missing}; they count as dropped", flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def send(self, stage: str, payload: Payload, cids: list[int]) -> dict[int, Payload | str]:
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        out: dict[int, Payload | str] = {c: "no Flower node holds this partition" for c in cids if c not in self.nodes}
        by_node = {self.nodes[c]: c for c in cids if c in self.nodes}
        arrays = _to_record(payload)
        msgs = []
        for node, c in sorted(by_node.items()):
            meta = ConfigRecord({"stage": stage, "round": self.round, "client": c, "config": self._config})
            content = RecordDict({"payload": arrays, "meta": meta})
            msgs.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        for reply in self.grid.send_and_receive(msgs, timeout=self.cfg.timeout):
            c = by_node.get(reply.metadata.src_node_id)
            if c is None:
                continue
            if reply.has_error():
                out[c] = f"client error: {reply.error.reason}"
                continue
            out[c] = _from_record(reply.content["payload"])
        for c in cids:
            out.setdefault(c, f"no reply within {self.cfg.timeout:g} s")
        return out


def _main(grid: Any, context: Any) -> None:
    """The deployed ServerApp: the run config's ``dlrt federated`` keys, the round loop over the grid."""
    from .run import run_rounds

    cfg = config_from_run_config(dict(context.run_config))
    result = run_rounds(cfg, transport=GridTransport(grid, cfg))
    print(f"{result.status}: {result.run_dir}", flush=True)


# ------------------------------------------------------------------ the client side
_CLIENTS: dict[tuple[str, int], Client] = {}


def _client(config: str, partition: int) -> Client:
    """The client of ``partition`` under the run config ``config`` (built once per process)."""
    key = (config, partition)
    if key not in _CLIENTS:
        from ..training.loop import build_data
        from ..training.runs import setup
        from .run import _train_config, build_clients, build_global_model, client_shards

        cfg = FederatedConfig(**json.loads(config))
        device = setup(cfg)
        if not 0 <= partition < cfg.clients:
            raise ValueError(f"partition-id {partition} is outside 0..{cfg.clients - 1} (clients={cfg.clients})")
        tcfg = _train_config(cfg)
        train_set, _ = build_data(tcfg)
        shards = client_shards(cfg, train_set)
        model = build_global_model(cfg, device)  # its weights are replaced by every round's payload
        _CLIENTS[key] = build_clients(cfg, model, [shards[partition]], device)[0]
        _CLIENTS[key].client_id = partition
    return _CLIENTS[key]


def _partition(context: Any) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K'")
    return int(value)


def _query(msg: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(content=RecordDict({"meta": ConfigRecord({"partition": _partition(context)})}), reply_to=msg)


def _train(msg: Any, context: Any) -> Any:
    from flwr.app import Message, RecordDict

    meta = msg.content["meta"]
    partition = _partition(context)
    if int(meta["client"]) != partition:
        raise ValueError(f"a message for client {meta['client']} reached the node of partition {partition}")
    client = _client(str(meta["config"]), partition)
    state: dict[str, torch.Tensor] = {}
    if STATE_KEY in context.state:
        state = _from_record(context.state[STATE_KEY])
    reply = client.handle(str(meta["stage"]), _from_record(msg.content["payload"]), state, int(meta["round"]))
    context.state[STATE_KEY] = _to_record(state)
    return Message(content=RecordDict({"payload": _to_record(reply)}), reply_to=msg)


def _apps() -> tuple[Any, Any]:
    flwr = _flwr()
    server = flwr.serverapp.ServerApp()
    server.main()(_main)
    client = flwr.clientapp.ClientApp()
    client.query()(_query)
    client.train()(_train)
    return server, client


def __getattr__(name: str) -> Any:
    # ``server_app`` / ``client_app`` are built on first access, so importing this module needs no flwr.
    if name in ("server_app", "client_app"):
        server, client = _apps()
        globals().update(server_app=server, client_app=client)
        return globals()[name]
    raise AttributeError(name)


# ------------------------------------------------------------------ the simulation runtime
def simulate(cfg: FederatedConfig, *, write: bool = True) -> Any:
    """Run ``cfg`` on Flower's simulation runtime: one SuperNode per client, the round loop in the ServerApp."""
    flwr = _flwr()
    from flwr.simulation import run_simulation

    from .run import run_rounds

    holder: dict[str, Any] = {}
    server = flwr.serverapp.ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        holder["result"] = run_rounds(cfg, transport=GridTransport(grid, cfg), write=write)

    _, client = _apps()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if "result" not in holder:
        raise RuntimeError("the Flower simulation ended without finishing the run: see Flower's log above")
    return holder["result"]
