"""``SocketTransport``, the CPU workers' MoE exchange: ranks as threads over real TCP connections."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dsray.comm import free_address
from dsray.comm_socket import SocketTransport


def connect(world: int, timeout_s: float = 20.0) -> list[SocketTransport]:
    """``world`` transports of one group, joined concurrently (each rank connects to the lower ones)."""
    _, port = free_address("127.0.0.1")
    out: list = [None] * world

    def join(rank: int) -> None:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
        out[rank] = SocketTransport(store, rank, world, timeout_s, "127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(out), "a rank did not join"
    return out


def run_ranks(fns) -> list:
    results, errors = [None] * len(fns), []

    def guard(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    if errors:
        raise errors[0]
    return results


def test_rows_larger_than_the_socket_buffers_cross_both_ways_at_once():
    """Both ranks post 16 MB for the other before either waits: the rest of what the kernel's buffers do
    not take goes out on a sender thread, so neither blocks on the other."""
    a, b = connect(2)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(8192, 512, generator=g).to(torch.bfloat16) for _ in range(2)]

    def rank(t: SocketTransport, mine: torch.Tensor):
        pending = t.exchange_rows(
            mine, [100, 8092] if t.rank == 0 else [8000, 192], [100, 8000] if t.rank == 0 else [8092, 192]
        )
        return pending.wait()

    got = run_ranks([lambda: rank(a, rows[0]), lambda: rank(b, rows[1])])
    torch.testing.assert_close(got[0], torch.cat([rows[0][:100], rows[1][:8000]]), rtol=0, atol=0)
    torch.testing.assert_close(got[1], torch.cat([rows[0][100:], rows[1][8000:]]), rtol=0, atol=0)
    for t in (a, b):
        t.close()


def test_messages_that_come_before_their_collective_is_posted_are_kept():
    """Rank 0 runs three collectives ahead; rank 1, waiting on the first, reads the next two early."""
    a, b = connect(2)
    sent = [torch.arange(6, dtype=torch.int64).view(2, 3) + 10 * i for i in range(3)]
    ahead = [a.exchange_counts(c) for c in sent]  # rank 0 posts all three first
    first = b.exchange_counts(sent[0] * -1).wait()  # reads collective 0, and 1 and 2 with it
    later = [b.exchange_counts(c * -1).wait() for c in sent[1:]]
    for i, got in enumerate([first, *later]):
        assert got[0].tolist() == sent[i][1].tolist()  # row 1 of rank 0's counts went to rank 1
        assert got[1].tolist() == (sent[i][1] * -1).tolist()  # its own row stays
    assert [p.wait()[1].tolist() for p in ahead] == [(c[0] * -1).tolist() for c in sent]
    for t in (a, b):
        t.close()


def test_a_silent_peer_times_out_and_a_closed_one_fails_at_once():
    a, b = connect(2, timeout_s=0.5)
    with pytest.raises(TimeoutError, match="rank 1 sent nothing"):
        a.exchange_counts(torch.zeros(2, 1, dtype=torch.int64)).wait()
    b.close()  # the worker is gone
    a2, b2 = connect(2, timeout_s=30)
    b2.close()
    with pytest.raises(ConnectionError, match="rank 1 closed its connection"):
        a2.exchange_counts(torch.zeros(2, 1, dtype=torch.int64)).wait()
    a.close()
    a2.close()


def test_ranks_out_of_step_are_told_so():
    a, b = connect(2)
    b.exchange_rows(torch.zeros(3, 4), [3, 0], [0, 0])  # rank 1 sends 3 rows to rank 0
    with pytest.raises(RuntimeError, match="out of step: rank 1 sends 48 bytes for collective 0, this rank expects 32"):
        a.exchange_rows(torch.zeros(0, 4), [0, 0], [0, 2]).wait()
    for t in (a, b):
        t.close()


def test_a_rank_whose_collective_fails_fails_its_peers_at_once():
    """Rank 1 is gone. Rank 2 waits only on rank 0 (expert ranks send each other nothing), and rank 0,
    which waits on rank 1, fails: it closes its connections, so rank 2 fails now, not after its timeout;
    and rank 0's next collective says the group needs a regroup."""
    a, b, c = connect(3, timeout_s=30)
    b.close()

    def rank0():
        with pytest.raises(ConnectionError, match="rank 1 closed its connection"):
            a.exchange_rows(torch.zeros(0, 4), [0, 0, 0], [0, 2, 0]).wait()

    def rank2():
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="rank 0 closed its connection"):
            c.exchange_rows(torch.zeros(0, 4), [0, 0, 0], [2, 0, 0]).wait()
        return time.monotonic() - start

    _, waited = run_ranks([rank0, rank2])
    assert waited < 10, waited  # not the 30 s timeout
    with pytest.raises(ConnectionError, match="this group failed earlier .*rank 1 closed"):
        a.exchange_counts(torch.zeros(3, 1, dtype=torch.int64))
    c.close()
