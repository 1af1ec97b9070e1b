"""Transports for the MoE exchange: torch.distributed (gloo on CPU, NCCL on CUDA) and in-process.

A transport moves one all-to-all at a time between the ranks of a step group: counts (a small
``[world, M]`` int64 tensor) and rows with uneven splits. Both return a ``Pending`` once posted,
so a caller can compute something else while they travel, and a rank that needs no counts
before it posts its rows (one that holds no slots, so receives none) never waits for them. Every rank of the
group calls every exchange of a step, in the same order, also with zero rows: a rank that skips
one hangs the group (or, here, fails it after ``timeout_s``).

* ``SocketTransport`` (``dsray/comm_socket.py``) — CPU ranks (the default; ``DSRAY_CPU_EXCHANGE=gloo``
  takes gloo): one TCP connection per pair of ranks, sent and received on the caller's own thread
  (why not gloo's threads: see the class).
* ``TorchDistTransport`` — ``all_to_all_single`` over a process group, ``async_op`` for rows
  (NCCL between GPU workers; gloo between CPU workers with ``DSRAY_CPU_EXCHANGE=gloo``).
* ``SelfTransport`` — a group of one (the local executor: the rank is its own expert rank).
* ``LoopbackGroup`` — ``world`` ranks as threads of one process, so the whole expert-parallel
  data path (plan → dispatch → expert compute → combine) runs and is tested in one process.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dsray import envs

if TYPE_CHECKING:
    from dsray.comm_socket import SocketTransport


class Pending:
    """Rows in flight: ``wait()`` returns what this rank receives."""

    def __init__(self, wait: Callable[[], torch.Tensor]):
        self._wait = wait
        self._value: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._wait()
        return self._value


def done(value: torch.Tensor) -> Pending:
    pending = Pending(lambda: value)
    pending._value = value
    return pending


class Transport(ABC):
    """One rank's view of an all-to-all group of ``world_size`` ranks."""

    rank: int
    world_size: int

    @abstractmethod
    def exchange_counts(self, send_counts: torch.Tensor) -> Pending:
        """``send_counts [world, M]`` int64 (row r goes to rank r) → ``[world, M]`` received from each rank
        (posted now)."""

    @abstractmethod
    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        """Send ``rows[sum(send_splits[:r]) : …]`` to rank r; receive ``sum(recv_splits)`` rows (posted now)."""


class SelfTransport(Transport):
    """A group of one: what is sent comes straight back, without a copy."""

    rank, world_size = 0, 1

    def exchange_counts(self, send_counts: torch.Tensor) -> Pending:
        return done(send_counts)

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        return done(rows)


class TorchDistTransport(Transport):
    """gloo (CPU) or NCCL (GPU) process group; rows travel with asynchronous ``all_to_all_single``."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def exchange_counts(self, send_counts: torch.Tensor) -> Pending:
        out = torch.empty_like(send_counts)
        return self._posted(out, dist.all_to_all_single(out, send_counts.contiguous(), group=self.group, async_op=True))

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        work = dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=self.group, async_op=True)
        return self._posted(out, work)

    @staticmethod
    def _posted(out: torch.Tensor, work) -> Pending:
        def wait() -> torch.Tensor:
            work.wait()
            return out

        return Pending(wait)


class LoopbackGroup:
    """``world_size`` ranks in one process (one thread each) exchanging through shared mailboxes.

    Each collective has a sequence number per rank; a rank posts its chunks under it at once and
    collects its share when every rank has posted. Waiting longer than ``timeout_s`` raises, as a
    gloo collective would.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._posted: dict[int, list] = {}  # sequence → per source rank, its chunks (None until posted)
        self._collected: dict[int, int] = {}

    def transport(self, rank: int) -> LoopbackTransport:
        return LoopbackTransport(self, rank)

    def post(self, seq: int, rank: int, chunks: list[torch.Tensor]) -> None:
        with self._cond:
            self._posted.setdefault(seq, [None] * self.world_size)[rank] = chunks
            self._cond.notify_all()

    def collect(self, seq: int, rank: int) -> list[torch.Tensor]:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while any(c is None for c in self._posted[seq]):
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    missing = [r for r, c in enumerate(self._posted[seq]) if c is None]
                    raise TimeoutError(f"loopback collective {seq}: ranks {missing} never joined")
            got = [chunks[rank] for chunks in self._posted[seq]]
            self._collected[seq] = self._collected.get(seq, 0) + 1
            if self._collected[seq] == self.world_size:
                del self._posted[seq], self._collected[seq]
            return got


class LoopbackTransport(Transport):
    def __init__(self, group: LoopbackGroup, rank: int):
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self._seq = 0

    def _post(self, chunks: list[torch.Tensor]) -> int:
        seq, self._seq = self._seq, self._seq + 1
        self.group.post(seq, self.rank, chunks)
        return seq

    def exchange_counts(self, send_counts: torch.Tensor) -> Pending:
        seq = self._post(list(send_counts.clone().unbind(0)))
        return Pending(lambda: torch.stack(self.group.collect(seq, self.rank)))

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        seq = self._post(list(rows.split(send_splits)))
        return Pending(lambda: torch.cat(self.group.collect(seq, self.rank)))


def free_address(host: str) -> tuple[str, int]:
    """``host`` (this node's IP as the cluster sees it) and a free TCP port on it, found at run time."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """NCCL between GPU workers, gloo between CPU workers (the process group of ``TorchDistTransport``)."""
    return "nccl" if device.type == "cuda" else "gloo"


_sockets: SocketTransport | None = None  # this process's step group, when it is a SocketTransport


def init_group(
    address: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> Transport:
    """Join the step group; collectives that wait longer than ``timeout_s`` raise instead of hanging.

    GPU workers exchange over NCCL; CPU workers over ``SocketTransport``, or gloo with
    ``DSRAY_CPU_EXCHANGE=gloo``. Rank 0 hosts the group's store at ``address:port``.

    A process is in one step group at a time: joining a new one (after a worker was lost, or to let
    a new worker in) first abandons the current one, which cannot shrink or grow.
    """
    global _sockets
    leave_group()
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cpu" and envs.cpu_exchange() == "socket":
        from dsray.comm_socket import SocketTransport  # it builds on this module's Transport

        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        _sockets = SocketTransport(store, rank, world_size, timeout_s, _local_ip_towards(address))
        return _sockets
    dist.init_process_group(
        backend_for(device), init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size, timeout=timeout
    )
    return TorchDistTransport()


def _local_ip_towards(address: str) -> str:
    """This host's address on the route to ``address`` (a connected UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 1))
            return s.getsockname()[0]
        except OSError:
            return address


def leave_group() -> None:
    """Abandon this process's step group without waiting on its peers (some may be dead): gloo just
    closes its sockets; NCCL communicators are aborted, not destroyed, as a dead peer can hang a destroy."""
    global _sockets
    if _sockets is not None:
        _sockets.close()
        _sockets = None
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if dist.get_backend() == "nccl" and abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception:  # a broken group may refuse a clean exit: it is dropped either way
        pass
