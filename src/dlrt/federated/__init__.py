"""Federated dynamical low-rank training (FeDLRT) with FedAvg and FedLin baselines (docs/federated.md).

The round is a set of plain functions over payloads (:mod:`.protocol`), driven by the
round loop (:mod:`.run`) in process (:class:`~.run.InProcess`) or over Flower
(:mod:`.flower`, imported lazily: it needs ``flwr``); :func:`federate` (:mod:`.command`)
picks the engine.
"""

from .command import federate
from .partition import dataset_tensors, partition
from .protocol import (
    CORRECTIONS,
    METHODS,
    Client,
    CorrectedSGD,
    RoundRecord,
    Server,
    check_reply,
    pass_macs,
    run_round,
    stages,
)
from .run import FederatedResult, InProcess

__all__ = [
    "CORRECTIONS",
    "METHODS",
    "Client",
    "CorrectedSGD",
    "FederatedResult",
    "InProcess",
    "RoundRecord",
    "Server",
    "check_reply",
    "dataset_tensors",
    "federate",
    "partition",
    "pass_macs",
    "run_round",
    "stages",
]
