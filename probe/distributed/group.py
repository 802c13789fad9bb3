"""The process group a command runs in when torchrun starts it, and collectives that fail cleanly.

torchrun (``torch.distributed.run``) starts one process per rank and tells each its place through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``); it also restarts or stops the group when a process dies. resprobe launches
nothing: :func:`init_from_env` joins the group torchrun set up, and the helpers below make every
rank learn of another rank's failure at the next collective, so all ranks stop with the same
message instead of waiting for a timeout.

Barriers and object collectives go through a *control* group on gloo with a long timeout: in a
study one rank may train for hours while another waits at the end of a stage, and on GPUs the
default group's NCCL collectives have a watchdog that would kill such a wait after 10 minutes.

Example:
    >>> ranks()  # outside torchrun: one process
    Ranks(rank=0, world=1, local_rank=0, local_world=1)
    >>> agree("a step", lambda: 42)  # run on every rank; any rank's failure is every rank's
    42
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from probe.errors import ProbeError
from probe.sigterm import (  # re-exported: part of this module's surface
    Sigterm,
    Terminated,
    env_int,
    launched,
    raise_if_terminated,
    raise_on_sigterm,
)

__all__ = [
    "Ranks",
    "RankFailed",
    "Terminated",
    "launched",
    "grouped",
    "alone",
    "ranks",
    "init_from_env",
    "shutdown",
    "barrier",
    "all_gather",
    "broadcast",
    "agree",
    "on_main",
    "main_first",
    "raise_on_sigterm",
    "raise_if_terminated",
    "Sigterm",
]

T = TypeVar("T")

# How long a rank may wait for the others at a barrier (seconds; RESPROBE_DIST_TIMEOUT overrides).
_WAIT_S = 24 * 3600
_state: dict = {"control": None, "owned": False, "alone": 0}


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among ``world`` and on its node."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


class RankFailed(ProbeError):
    """A step failed on one or more ranks; raised on every rank with the same message."""


def ranks() -> Ranks:
    """This process's place: from the initialised process group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks(0, 1, 0, 1)
    world = dist.get_world_size()
    return Ranks(
        dist.get_rank(),
        world,
        env_int("LOCAL_RANK", 0),
        env_int("LOCAL_WORLD_SIZE", world),
    )


def grouped() -> bool:
    """Whether work started here is split over the process group's ranks: a group with more
    than one rank is initialised, and no :func:`alone` block is active."""
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and not _state["alone"]
    )


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block, captures and training run in this process alone, even under a process
    group (a study hands each rank whole runs and captures of its own)."""
    _state["alone"] += 1
    try:
        yield
    finally:
        _state["alone"] -= 1


def _wait() -> timedelta:
    return timedelta(seconds=float(os.environ.get("RESPROBE_DIST_TIMEOUT", _WAIT_S)))


def init_from_env() -> Ranks:
    """Join the process group torchrun describes in the environment (no-op outside torchrun or
    when a group is already initialised). gloo carries CPU tensors and NCCL CUDA ones; each rank
    uses the GPU of its local rank."""
    if not launched() or dist.is_initialized():
        return ranks()
    if not dist.is_available():
        raise ProbeError(
            "This torch build has no torch.distributed; run without torchrun, or install a torch "
            "build with distributed support."
        )
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        _state["control"] = dist.new_group(backend="gloo", timeout=_wait())
    except (RuntimeError, ValueError) as e:
        raise ProbeError(
            f"Could not join the process group torchrun set up (RANK={os.environ.get('RANK')}, "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}, MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR')}): {str(e).splitlines()[0][:200]}. Start with "
            "'torchrun --standalone --nproc-per-node N -m probe ...' on one machine (docs/"
            "distributed.md)."
        ) from e
    _state["owned"] = True
    return ranks()


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined (a group the caller made stays)."""
    if _state["owned"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(control=None, owned=False)


def _group():
    return _state["control"]  # None: the default group (one the caller initialised)


def barrier() -> None:
    """Wait until every rank is here."""
    if ranks().world > 1:
        dist.barrier(group=_group())


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if ranks().world == 1:
        return [obj]
    out: list = [None] * ranks().world
    dist.all_gather_object(out, obj, group=_group())
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if ranks().world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, ProbeError) else f"{type(e).__name__}: {e}"


def _failure(what: str, failed: list[tuple[int, str]], world: int) -> RankFailed:
    (first, msg), rest = failed[0], failed[1:]
    others = f" (also on rank{'s' * (len(rest) > 1)} {', '.join(str(r) for r, _ in rest)})"
    return RankFailed(f"{what} failed on rank {first} of {world}{others if rest else ''}: {msg}")


def agree(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then let every rank know whether it raised anywhere: if it did,
    every rank raises :class:`RankFailed` naming the rank and its message (the failing rank
    chains its own exception). One process: ``fn()``."""
    r = ranks()
    if r.world == 1:
        return fn()
    error: Exception | None = None
    value = None
    try:
        value = fn()
    except Exception as e:  # shared with the other ranks below; BaseExceptions unwind at once
        error = e
    outcomes = all_gather(None if error is None else _describe(error))
    failed = [(i, m) for i, m in enumerate(outcomes) if m is not None]
    if failed:
        raise _failure(what, failed, r.world) from error
    return value  # type: ignore[return-value]


def on_main(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (picklable) to every rank; if it raised,
    every rank raises :class:`RankFailed` with its message."""
    r = ranks()
    if r.world == 1:
        return fn()
    error: Exception | None = None
    value = None
    if r.is_main:
        try:
            value = fn()
        except Exception as e:
            error = e
    outcome = broadcast((value, None if error is None else _describe(error)))
    if outcome[1] is not None:
        raise _failure(what, [(0, outcome[1])], r.world) from error
    return outcome[0]


def main_first(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the other ranks: for steps that fill a cache the others
    then read (a dataset decoded once, not by every rank at the same time)."""
    kept: list = []
    on_main(what, lambda: kept.append(fn()))  # shares success or failure, not the value itself
    return kept[0] if kept else fn()


def hostname() -> str:
    return socket.gethostname()
