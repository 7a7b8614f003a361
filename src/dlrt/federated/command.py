"""``dlrt federated``: :func:`federate` runs a :class:`FederatedConfig` on the engine it names.

``engine=inprocess``: the round loop of :mod:`.run` builds the clients and calls them in
turn. ``engine=flower``: :func:`.flower.simulate` starts Flower's simulation runtime, whose
ServerApp runs the same loop over its grid. This module is the one that knows both engines:
:mod:`.flower` imports the loop, and the loop imports no engine but its in-process one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..training.config import FederatedConfig
from .protocol import Client
from .run import FederatedResult, run_rounds

__all__ = ["federate"]


def federate(
    cfg: FederatedConfig | None = None,
    *,
    engine: Callable[[dict[int, Client]], Any] | None = None,
    transport: Any = None,
    write: bool = True,
) -> FederatedResult:
    """Run ``cfg`` (default :class:`~dlrt.training.config.FederatedConfig`) to the end or to Ctrl-C.

    The rounds go over ``transport`` when given (Flower's :class:`~.flower.GridTransport`),
    else over ``cfg.engine``: ``inprocess`` builds the clients here and calls them
    through ``engine(clients)`` (default :class:`~.run.InProcess`; tests inject faults
    with it), ``flower`` runs Flower's simulation runtime (:func:`~.flower.simulate`),
    whose ServerApp runs the rounds with its grid. ``write=False`` writes no run directory.
    """
    cfg = cfg or FederatedConfig()
    if transport is None and cfg.engine == "flower":
        from .flower import simulate

        return simulate(cfg, write=write)
    return run_rounds(cfg, engine=engine, transport=transport, write=write)
