"""Stop signals: what SIGINT (Ctrl-C), SIGTERM and SIGUSR1 do while a run is in progress (docs/checkpoints.md).

The training driver (:class:`~dlrt.training.driver.Driver`) turns them into a request to
stop at its next safe point (:class:`Interrupts`); a loop without safe points of its own
(``dlrt federated``'s rounds) turns them into a :class:`KeyboardInterrupt` where the code
is (:class:`StopSignals`). Either installs its handlers in the main thread only and puts
back, on leaving, whatever was installed before.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "Interrupts", "StopSignals"]

#: The signals that stop a run at its next safe point, as the first Ctrl-C does: SIGINT (Ctrl-C), SIGTERM
#: (a scheduler's preemption, torchrun's agent when a peer fails, ``kill``) and SIGUSR1 (sent by some
#: schedulers ahead of the kill); those the platform has.
STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class _Handlers:
    """Installs :meth:`_handle` for ``signals`` while active (main thread only) and restores the previous
    handlers on leaving. :attr:`received` names the first signal handled."""

    signals: tuple[int, ...] = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Any:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError


class Interrupts(_Handlers):
    """A stop signal (:data:`STOP_SIGNALS`) sets :attr:`requested` instead of ending the process; a second
    Ctrl-C raises :class:`KeyboardInterrupt` at once.

    A repeated SIGTERM or SIGUSR1 changes nothing (a scheduler may send several
    before its kill): only a person pressing Ctrl-C again means "stop now". A
    :class:`KeyboardInterrupt` raised inside one of the driver's sections leaves
    that section half done, so the driver saves nothing then and a resume
    continues from the last checkpoint (step and checkpoint writes roll
    themselves back). ``speak=False`` (processes of rank > 0) prints nothing.
    """

    def __init__(self, speak: bool = True) -> None:
        super().__init__()
        self.requested = False
        self.speak = speak

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum != signal.SIGINT:
                return
            if self.speak:  # a second Ctrl-C: stop now; the last checkpoint stays as it was
                print("\ninterrupt again: stopping now, without a new checkpoint", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.requested, self.received = True, signal.Signals(signum).name
        if self.speak:
            what = "interrupt" if signum == signal.SIGINT else self.received
            again = " (press Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
            print(f"\n{what}: stopping at the next safe point{again}", file=sys.stderr, flush=True)


class StopSignals(_Handlers):
    """SIGTERM and SIGUSR1 raise :class:`KeyboardInterrupt` where the code is, as Ctrl-C does by default, so
    one ``except KeyboardInterrupt`` handles them all (SIGINT keeps its own handler).

    A :class:`~dlrt.training.driver.Driver` run inside (a federated client's local
    steps) installs its :class:`Interrupts` for its duration.
    """

    signals = tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name
        raise KeyboardInterrupt
