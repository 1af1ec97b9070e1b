"""``SocketTransport``: the CPU workers' MoE exchange over their own TCP connections (one per pair of
ranks), sent and received on the caller's thread. ``dsray/comm.py`` has the transport interface and
picks this one for CPU step groups (``init_group``); the class says why not gloo."""

from __future__ import annotations

import collections
import datetime
import select
import socket
import struct
import threading
import time

import torch
import torch.distributed as dist

from dsray.comm import Pending, Transport


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as writable bytes (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


_HEADER = struct.Struct("<qq")  # collective sequence number, payload bytes


class _Peer:
    """One connection of a ``SocketTransport``: messages ``(seq, nbytes) + payload`` each way.

    Receiving runs on the caller's thread only (inside ``wait``): a message lands straight in the
    buffer its collective posted, or, if it comes first, in a stash copied over at the post. Sending
    writes what the socket buffer takes at once; a remainder (buffers full: big prefill rows, or a
    peer that is not reading) goes to a sender thread, so a rank never blocks on a peer while that
    peer waits on it."""

    def __init__(self, sock: socket.socket, rank: int):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock, self.rank = sock, rank
        self.expected: dict[int, memoryview] = {}  # seq → where its payload goes (posted, not yet arrived)
        self.stash: dict[int, torch.Tensor] = {}  # seq → payload that came before its collective was posted
        self.arrived: set[int] = set()
        self._header = bytearray(_HEADER.size)
        self._got = 0  # bytes of the current message's header, then of its payload, read so far
        self._seq = -1  # the message being read (-1: its header is still coming)
        self._dest: memoryview | None = None
        self._early: torch.Tensor | None = None  # the stash buffer the current payload goes to, if any
        self._out: collections.deque[memoryview] = collections.deque()  # waiting for the sender thread
        self._out_lock = threading.Condition()
        self._sender: threading.Thread | None = None
        self.closed = False
        self.eof = False

    # -- sending ---------------------------------------------------------------------------------
    def send(self, seq: int, payload: memoryview) -> None:
        parts = [memoryview(_HEADER.pack(seq, payload.nbytes)), payload]
        with self._out_lock:
            if not self._out:
                parts = self._send_now(parts)
            if parts:
                self._out.extend(parts)
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_rest, name="dsray-exchange-send", daemon=True)
                    self._sender.start()
                self._out_lock.notify()

    def _send_now(self, parts: list[memoryview]) -> list[memoryview]:
        """Write what the socket takes without blocking; the parts (or part of one) left over."""
        while parts:
            try:
                n = self.sock.sendmsg(parts)
            except BlockingIOError:
                return parts
            while parts and n >= parts[0].nbytes:
                n -= parts[0].nbytes
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]
        return parts

    def _send_rest(self) -> None:
        while True:
            with self._out_lock:
                while not self._out and not self.closed:
                    self._out_lock.wait()
                if self.closed:
                    return
                rest = self._send_now(list(self._out))
                self._out.clear()
                self._out.extend(rest)
            if rest:
                try:
                    select.select([], [self.sock], [], 1.0)
                except (OSError, ValueError):  # closed meanwhile
                    return

    # -- receiving ---------------------------------------------------------------------------------
    def expect(self, seq: int, dest: torch.Tensor) -> None:
        """Collective ``seq`` receives ``dest``'s bytes from this peer."""
        early = self.stash.pop(seq, None)
        if early is None:  # not here yet, or still coming into a stash buffer (copied when whole)
            self.expected[seq] = _bytes(dest)
            return
        self._check_size(seq, early.numel(), dest.nbytes)
        dest.reshape(-1).view(torch.uint8).copy_(early)
        self.arrived.add(seq)

    def _check_size(self, seq: int, got: int, want: int) -> None:
        if got != want:
            raise RuntimeError(
                f"MoE exchange out of step: rank {self.rank} sends {got} bytes for collective {seq}, this rank "
                f"expects {want}"
            )

    def read_available(self) -> bool:
        """Read whatever has arrived (never blocks); whether anything was read."""
        progressed = False
        while True:
            target = memoryview(self._header)[self._got :] if self._seq < 0 else self._dest[self._got :]
            if target.nbytes:
                try:
                    n = self.sock.recv_into(target)
                except BlockingIOError:
                    return progressed
                if n == 0:  # the peer closed: an error only if this rank still waits on it (``wait``)
                    self.eof = True
                    return progressed
                progressed = True
                self._got += n
                if n < target.nbytes:
                    continue
            if self._seq < 0:  # a whole header: the payload goes to its collective's buffer, or a stash buffer
                self._seq, nbytes = _HEADER.unpack(self._header)
                self._got = 0
                dest = self.expected.get(self._seq)
                if dest is not None:
                    self._check_size(self._seq, nbytes, dest.nbytes)
                    self._early = None
                else:
                    self._early = torch.empty(nbytes, dtype=torch.uint8)
                    dest = _bytes(self._early)
                self._dest = dest
                continue
            seq, early = self._seq, self._early  # a whole payload
            self._seq, self._got, self._dest, self._early = -1, 0, None, None
            if early is None:
                del self.expected[seq]
                self.arrived.add(seq)
            elif seq in self.expected:  # posted while its bytes were coming into the stash buffer
                dest = self.expected.pop(seq)
                self._check_size(seq, early.numel(), dest.nbytes)
                dest[:] = memoryview(early.numpy())
                self.arrived.add(seq)
            else:
                self.stash[seq] = early

    def close(self) -> None:
        with self._out_lock:
            self.closed = True
            self._out_lock.notify()
        try:
            self.sock.close()
        except OSError:
            pass


class SocketTransport(Transport):
    """CPU ranks over plain TCP: one connection per pair of ranks, driven by the caller's thread.

    Why not gloo: a gloo collective completes only after gloo's own threads have run on *both*
    ranks (its work queue, its event loop answering the peer's receive-ready message). While a
    rank's main thread computes — the point of posting rows early — the kernel's scheduler queues
    a woken gloo thread behind it instead of on the idle core, for up to a time slice. Measured
    here with the sender running a 6 ms kernel right after posting: the receiver waited 0.3 ms
    (median) and 4-5 ms (p90) for 8 counts over gloo; over a socket written at the post, 0.04 and
    0.08 ms. Here the post writes the rows into the socket buffer at once, and the receiver reads
    them on its own thread when it waits, so neither waits on a thread of the other's.

    Each collective sends a message ``(seq, nbytes) + payload`` to each peer it sends a non-empty
    chunk (the receiver knows the sizes from the splits, so empty chunks are not sent). Waiting
    longer than ``timeout_s`` for a peer raises; a peer that died closes its connection, which raises
    at once. Use a transport from one thread at a time.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, host: str):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.store: dist.Store | None = store  # rank 0 serves it: kept as long as the group
        self._seq = 0
        self._peers: dict[int, _Peer] = {}
        self.failed: str | None = None  # why a collective of this group failed
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(world_size)
            store.set(f"dsray-exchange/{rank}", f"{host}:{listener.getsockname()[1]}")
            for peer in range(rank):  # connect to lower ranks, accept higher ones
                store.wait([f"dsray-exchange/{peer}"], datetime.timedelta(seconds=timeout_s))
                peer_host, peer_port = store.get(f"dsray-exchange/{peer}").decode().rsplit(":", 1)
                sock = socket.create_connection((peer_host, int(peer_port)), timeout=timeout_s)
                sock.sendall(struct.pack("<q", rank))
                self._peers[peer] = _Peer(sock, peer)
            listener.settimeout(timeout_s)
            for _ in range(rank + 1, world_size):
                sock, _ = listener.accept()
                sock.settimeout(timeout_s)
                peer = struct.unpack("<q", _recv_exactly(sock, 8))[0]
                self._peers[peer] = _Peer(sock, peer)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def exchange_counts(self, send_counts: torch.Tensor) -> Pending:
        send_counts = send_counts.contiguous()
        out = torch.empty_like(send_counts)
        return self._exchange(list(send_counts.unbind(0)), out, list(out.unbind(0)))

    def exchange_rows(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        rows = rows.contiguous()
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        return self._exchange(list(rows.split(send_splits)), out, list(out.split(recv_splits)))

    def _exchange(self, chunks: list[torch.Tensor], out: torch.Tensor, dests: list[torch.Tensor]) -> Pending:
        if self.failed is not None:
            raise ConnectionError(f"MoE exchange: this group failed earlier ({self.failed}); it needs a regroup")
        seq, self._seq = self._seq, self._seq + 1
        try:
            for peer, chunk in enumerate(chunks):
                if peer != self.rank and chunk.numel():
                    self._peers[peer].send(seq, _bytes(chunk))
        except BaseException as exc:  # a peer that is gone resets the connection
            self._fail(exc)
            raise
        if dests[self.rank].numel():
            dests[self.rank].copy_(chunks[self.rank])
        waiting = []
        for peer, dest in enumerate(dests):
            if peer != self.rank and dest.numel():
                self._peers[peer].expect(seq, dest)
                waiting.append(self._peers[peer])
        return Pending(lambda: self._wait(seq, waiting, out))

    def _wait(self, seq: int, peers: list[_Peer], out: torch.Tensor) -> torch.Tensor:
        try:
            return self._wait_for(seq, peers, out)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        """A failed collective fails the group: closing every connection makes the peers that wait on this
        rank fail now too, not after ``timeout_s`` (they may wait only on this rank, not on the one that is
        gone). The executor regroups the survivors in a new group."""
        self.failed = f"{type(exc).__name__}: {exc}"
        self.close()

    def _wait_for(self, seq: int, peers: list[_Peer], out: torch.Tensor) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        for peer in peers:
            while seq not in peer.arrived:
                if peer.read_available():
                    continue
                if peer.eof:
                    raise ConnectionError(
                        f"MoE exchange: rank {peer.rank} closed its connection before collective {seq} (the worker "
                        "is gone)"
                    )
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([peer.sock], [], [], left)[0]:
                    raise TimeoutError(
                        f"MoE exchange: rank {peer.rank} sent nothing for collective {seq} in {self.timeout_s:g} s"
                    )
            peer.arrived.discard(seq)
        return out

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
        self.store = None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise ConnectionError("MoE exchange: a peer closed its connection while joining")
        data += got
    return data
