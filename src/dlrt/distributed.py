"""Data-parallel training on ``torch.distributed`` (docs/distributed.md).

What :class:`~dlrt.DLRTOptimizer` and ``dlrt train`` use when several processes
train one model (``torchrun``): the process group the optimizer talks to
(:func:`resolve_group`), a :class:`Communicator` that flattens what one
collective carries, counts its bytes and turns a failed collective (a dead or
stuck peer, the process group's timeout) into an error that says so, and
:func:`init_from_env`, which starts the process group from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Its collectives are called only when a process group is in use;
``import dlrt`` imports one module of ``torch.distributed`` besides torch's own
(a few milliseconds: see the note on ``torch.distributed.nn.functional`` below).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

# torch.distributed.nn.functional's functions take ``group=group.WORLD`` as a default argument. Imported while a
# process group exists, it keeps that group alive after ``destroy_process_group``: the group's gloo threads outlive
# the run and abort the process at exit ("terminate called without an active exception"), so that torchrun reports
# a completed run as failed. torch imports it lazily, through torch._dynamo, when the first optimizer of the
# process is built, which is after the group starts. Imported here with dlrt (a few milliseconds), before the
# caller starts a group, its defaults stay ``None``.
if torch.distributed.is_available():
    import torch.distributed.nn.functional

__all__ = ["Communicator", "DistributedError", "env_world", "init_from_env", "rank_and_size", "resolve_group"]

#: Seconds a collective waits for its peers before it fails (``dlrt train`` key ``dist_timeout``).
DEFAULT_TIMEOUT = 300.0

_TIMEOUT_HINT = (
    "a peer process has probably died or is stuck (see its log); a collective waits at most the process "
    "group's timeout (torch.distributed.init_process_group(timeout=...), `dlrt train dist_timeout=SECONDS`)"
)


class DistributedError(RuntimeError):
    """A collective failed or the processes disagree (ranks, factors): training cannot continue consistently."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def resolve_group(process_group: Any = None) -> Any:
    """The process group to average over, or ``None`` for single-process training.

    ``process_group=None`` takes the default group when ``torch.distributed`` is
    initialised. A group of one process needs no communication, so it is ``None``
    too: single-process training stays exactly as it is without a group.
    """
    if process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        process_group = _dist().group.WORLD
    elif not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "process_group= was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)"
        )
    if _dist().get_world_size(process_group) == 1:
        return None
    return process_group


def rank_and_size(process_group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``process_group`` (``(0, 1)`` without one)."""
    group = resolve_group(process_group)
    if group is None:
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` from torchrun's environment, or ``None`` outside torchrun.

    A partial or malformed environment is a ``ValueError`` naming the variable.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [n for n in names if n in os.environ]
    if not present:
        return None
    if len(present) < len(names):
        missing = [n for n in names if n not in os.environ]
        raise ValueError(f"torchrun environment is incomplete: {present} set but {missing} missing")
    values = []
    for n in names:
        try:
            values.append(int(os.environ[n]))
        except ValueError:
            raise ValueError(f"environment variable {n}={os.environ[n]!r} is not an integer") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def speaks() -> bool:
    """Whether this process prints what a command reports: ``False`` on torchrun's processes of rank > 0.

    Read from the environment, so it holds before the process group starts and after it ends.
    """
    world = env_world()
    return world is None or world[0] == 0


@contextlib.contextmanager
def init_from_env(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> Iterator[torch.device]:
    """Under torchrun, start the default process group for the run and destroy it afterwards.

    Yields the device this process trains on: ``cuda:LOCAL_RANK`` for a CUDA
    device (backend ``nccl``), else ``device`` (backend ``gloo``). Outside
    torchrun, or when a process group already exists (the caller owns it),
    nothing is started and ``device`` is yielded as it is.
    """
    world = env_world()
    if world is None or torch.distributed.is_initialized():
        yield device
        return
    if not timeout > 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout}")
    dist = _dist()
    rank, size, local = world
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    try:
        yield device
    finally:
        dist.destroy_process_group()


class Communicator:
    """The collectives of one process group: flattened, counted, and failing with a clear error.

    ``bytes`` and ``calls`` count the payload of every collective by kind
    (``"all_reduce"``, ``"broadcast"``): what one process hands to the backend,
    not the traffic on the wire (a ring all-reduce sends about ``2 (N-1)/N``
    times its payload per process).
    """

    def __init__(self, group: Any) -> None:
        dist = _dist()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: The global rank of the group's rank 0, the process whose decisions are broadcast.
        self.src = dist.get_global_rank(group, 0)
        self.bytes: dict[str, int] = {"all_reduce": 0, "broadcast": 0}
        self.calls: dict[str, int] = {"all_reduce": 0, "broadcast": 0}

    def _run(self, kind: str, what: str, nbytes: int, fn: Any) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1
        try:
            fn()
        except RuntimeError as err:  # DistBackendError and the backends' timeouts are RuntimeErrors
            raise DistributedError(
                f"the {kind.replace('_', '-')} of {what} across {self.size} processes failed: {err}. {_TIMEOUT_HINT}"
            ) from err

    def all_reduce(self, tensor: Tensor, what: str, op: str = "sum") -> Tensor:
        """Reduce ``tensor`` in place (``op``: ``"sum"`` or ``"max"``) and return it."""
        dist = _dist()
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        nbytes = tensor.numel() * tensor.element_size()
        self._run("all_reduce", what, nbytes, lambda: dist.all_reduce(tensor, op=red, group=self.group))
        return tensor

    def broadcast(self, tensor: Tensor, what: str) -> Tensor:
        """Overwrite ``tensor`` with rank 0's, in place, and return it."""
        dist = _dist()
        nbytes = tensor.numel() * tensor.element_size()
        self._run("broadcast", what, nbytes, lambda: dist.broadcast(tensor, src=self.src, group=self.group))
        return tensor

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` (pickled; for the rare repairs, not for every step)."""
        dist = _dist()
        box = [obj]
        self._run("broadcast", what, 0, lambda: dist.broadcast_object_list(box, src=self.src, group=self.group))
        return box[0]

    def average(self, tensors: list[Tensor], what: str) -> list[Tensor]:
        """The mean over the processes of every tensor, in one all-reduce per (device, dtype).

        Returns new tensors with the inputs' shapes, in their order; every process
        must pass the same shapes and dtypes in the same order.
        """
        out: list[Tensor | None] = [None] * len(tensors)
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        for idx in groups.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            self.all_reduce(flat, what).div_(self.size)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view_as(tensors[i])
        return out  # type: ignore[return-value]
