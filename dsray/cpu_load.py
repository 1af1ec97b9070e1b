"""How many cores the rest of this machine keeps busy: the serving engine's cue to leave the front end one.

A serving engine on few cores shares them with its own front end (the Serve replicas, HAProxy, Ray
streaming every chunk). When that front end is busy, an engine thread loses its core to it again and
again, and the engine's other threads wait for it at every barrier: on 2 cores, two engine threads
beside a busy front end ran at 0.7-0.8 of one. When the front end is nearly idle (a large model,
few chunks a second) the second thread is worth most of a core. Which case holds depends on the
model, the load and the machine, so the engine measures it: ``OthersLoad`` is the CPU every other
process used over the last half second, from Linux's ``/proc/stat`` less this process's own time.
Where ``/proc/stat`` cannot be read, the others count as busy (the cautious choice).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PROC_STAT = "/proc/stat"
WINDOW_S = 0.5  # the measure covers at least this long
STALE_S = 5.0  # a baseline older than this (the engine was idle) is taken again, not averaged over
RESERVE_AT_CORES = 0.5  # others using this many cores or more per reserved core: reserve
RELEASE_BELOW_CORES = 0.3  # ... and until they use fewer than this


def machine_busy_seconds(path: str = PROC_STAT) -> float | None:
    """CPU seconds every process on this machine has run since boot, or None where it cannot be read.

    ``/proc/stat``'s first line: user nice system idle iowait irq softirq steal (guest is inside user)."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = sum(int(v) for v in fields[1:4]) + sum(int(v) for v in fields[6:9])
    return ticks / os.sysconf("SC_CLK_TCK")


class OthersLoad:
    """The cores other processes kept busy over the last window, and whether to reserve cores for them.

    ``busy(cores)`` says whether the others are busy enough to leave them ``cores`` threads: at least
    ``RESERVE_AT_CORES`` per core, and once reserved, until they fall below ``RELEASE_BELOW_CORES``
    (the others grow into a reserved core, and do not flap the engine's thread count). The readers
    are arguments so that tests can drive the rule.
    """

    def __init__(
        self,
        machine: Callable[[], float | None] = machine_busy_seconds,
        own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
    ):
        self._machine, self._own, self._clock = machine, own, clock
        self.window_s = window_s
        self.cores: float | None = None  # the others' cores over the last complete window; None: not yet known
        self._base: tuple[float, float, float] | None = None
        self._reserved = False
        self._unreadable = False

    def update(self) -> float | None:
        """Close the window if it is long enough; the latest measure (None before the first, or unreadable).

        Reads ``/proc/stat`` only when a window may close, not at every step that asks."""
        now, base = self._clock(), self._base
        if base is not None and now - base[0] < self.window_s:
            return self.cores
        machine = self._machine()
        self._unreadable = machine is None
        if machine is None:
            self.cores = None
            return None
        own = self._own()
        if base is not None and now - base[0] <= STALE_S:
            self.cores = max(0.0, ((machine - base[1]) - (own - base[2])) / (now - base[0]))
        self._base = (now, machine, own)
        return self.cores

    def busy(self, cores: int) -> bool:
        """Whether to leave ``cores`` cores to the others now (see the class docstring)."""
        measured = self.update()
        if measured is None:  # unreadable: cautious; the first window still open: as before
            return self._unreadable or self._reserved
        threshold = (RELEASE_BELOW_CORES if self._reserved else RESERVE_AT_CORES) * cores
        self._reserved = measured >= threshold
        return self._reserved
