"""Linux scheduling classes on a serving machine: the processes that compute keep their cores, the rest wait a turn.

The engine's kernels split each operation over its threads and meet at the end of it, so a thread
that loses its core stalls the others at the next barrier: the whole step waits for as long as
the intruder runs. A server's own processes wake up constantly (Ray's GCS, raylet, dashboard and
log monitor, Serve's controller and replicas, HAProxy): on the 2-core bench machine an idle
``dsray serve`` (about a tenth of one core) slowed an engine decoding beside it from 15.6 to
18.4 ms a step (``small``, batch 1). Under ``SCHED_OTHER`` a waking process preempts the thread on
its core at once; under ``SCHED_BATCH`` it has the same CPU share but waits for a thread to block
or for its time slice to end, so it mostly runs where an engine thread waits anyway: 17.1 ms.

``background()`` wraps ``ray.init`` of a cluster dsray starts, so that Ray's daemons and every
worker they start (the Serve replicas too) inherit ``SCHED_BATCH``; ``as_compute()`` moves a
process that computes (the engine process, an in-replica engine, a Ray-executor worker) back to
``SCHED_OTHER``. Both changes need no privilege (Linux lets any thread switch between the two), a
class the user chose (``chrt``) other than these two is left alone, and ``DSRAY_SCHED_BATCH=0``
turns both off (every process keeps the class it started with). Elsewhere (no
``os.sched_setscheduler``) both are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from dsray import envs

SCHED_OTHER = getattr(os, "SCHED_OTHER", None)
SCHED_BATCH = getattr(os, "SCHED_BATCH", None)


def supported() -> bool:
    return SCHED_BATCH is not None and hasattr(os, "sched_setscheduler")


def policy(tid: int = 0) -> int | None:
    """The scheduling policy of thread ``tid`` (0: the calling one), or None where it cannot be read."""
    if not supported():
        return None
    try:
        return os.sched_getscheduler(tid)
    except OSError:
        return None


def _set(tid: int, to: int) -> bool:
    try:
        os.sched_setscheduler(tid, to, os.sched_param(0))
    except OSError:  # the thread ended, or a sandbox forbids the call: the class stays
        return False
    return True


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Processes started inside run ``SCHED_BATCH`` (they inherit it from the calling thread, which gets its
    own class back at the end). Nothing changes when turned off, unsupported, or the caller is not ``SCHED_OTHER``."""
    switched = envs.batch_scheduling() and policy() == SCHED_OTHER and _set(0, SCHED_BATCH)
    try:
        yield
    finally:
        if switched:
            _set(0, SCHED_OTHER)


def as_compute() -> int:
    """Move every thread of this process that runs ``SCHED_BATCH`` to ``SCHED_OTHER`` (threads it starts later
    inherit the class of the thread that starts them); returns how many moved."""
    if not (supported() and envs.batch_scheduling()):
        return 0
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    return sum(1 for tid in tids if policy(tid) == SCHED_BATCH and _set(tid, SCHED_OTHER))
