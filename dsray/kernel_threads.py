"""How dsray's CPU kernels and torch share the cores of a step.

The kernels (``dsray/cpu_kernels.py``) run on their own thread pool, as many threads as torch's
intra-op setting (``threads``). A decode step, whose heavy work is those kernels, runs torch on one
thread meanwhile (``torch_single_threaded``), and gives torch the step's threads back for one big op
at a time (``all_threads``: a oneDNN GEMM on AMX tiles, ``dsray/onednn.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_threads: int | None = None  # set by ``torch_single_threaded()``; else torch's intra-op thread count


def threads() -> int:
    """How many threads a kernel call runs on: torch's intra-op setting, or the one it had when
    ``torch_single_threaded()`` took torch down to one thread."""
    return _threads or torch.get_num_threads()


@contextlib.contextmanager
def torch_single_threaded() -> Iterator[None]:
    """Inside this block torch runs on one thread and the kernels keep the threads torch had.

    For decode steps, whose heavy work is these kernels: torch's remaining ops there are small
    (residual adds, activations, gathers), and a parallel one pays an OpenMP barrier whose second
    thread has to wait for a core that the kernels' pool thread is still spinning on (a 64 x 1024
    add right after a kernel call measured 7-11 ms with two threads against 22 us with one).
    """
    global _threads
    was = torch.get_num_threads()
    outer, _threads = _threads, _threads or was
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(was)
        _threads = outer


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Inside ``torch_single_threaded()``: torch back on the step's threads for one big op (a oneDNN
    GEMM on AMX tiles, ``onednn.takes``), whose own work dwarfs an OpenMP barrier. Elsewhere: as is."""
    was = torch.get_num_threads()
    if _threads is None or _threads == was:
        yield
        return
    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(was)
