"""All-to-all backends for MoE dispatch/combine: in-process (the reference) and torch.distributed.

The exchange is two collectives, as in ARCHITECTURE.md: first counts (a small all-to-all of
int64), then rows with uneven splits (``all_to_all_single``). Every rank of the group calls
every exchange of a step, also with zero rows: a rank that skips one hangs the group.
"""

from __future__ import annotations

import datetime
import socket
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist


class AllToAll(ABC):
    """One rank's view of an all-to-all group of ``world_size`` ranks."""

    rank: int
    world_size: int

    @abstractmethod
    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """``send_counts [world, M]`` int64 (row r goes to rank r) → ``[world, M]`` received from each rank."""

    @abstractmethod
    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Send ``rows[sum(send_splits[:r]) : …]`` to rank r; receive ``sum(recv_splits)`` rows."""


class LocalAllToAll(AllToAll):
    """A group of one: what is sent comes straight back (single-process reference)."""

    rank, world_size = 0, 1

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        return send_counts.clone()

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        return rows


class TorchDistAllToAll(AllToAll):
    """gloo (CPU) or NCCL (GPU) process group; rows travel with ``all_to_all_single``."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(send_counts)
        dist.all_to_all_single(out, send_counts.contiguous(), group=self.group)
        return out

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=self.group)
        return out


def free_address(host: str) -> tuple[str, int]:
    """``host`` (this node's IP as the cluster sees it) and a free TCP port on it, found at run time."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def init_group(address: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> AllToAll:
    """Join the step group; collectives that wait longer than ``timeout_s`` raise instead of hanging."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return TorchDistAllToAll()
