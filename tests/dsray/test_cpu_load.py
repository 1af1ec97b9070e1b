"""Tests for dsray.cpu_load: the other processes' CPU, measured, and the rule that reserves them cores."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dsray import cpu_load
from dsray.cpu_load import OthersLoad, machine_busy_seconds


class Readings:
    """Hand-set machine, own-process and clock readings for an ``OthersLoad``."""

    def __init__(self):
        self.machine: float | None = 100.0
        self.own = 10.0
        self.now = 1000.0
        self.machine_reads = 0

    def read_machine(self) -> float | None:
        self.machine_reads += 1
        return self.machine

    def load(self) -> OthersLoad:
        return OthersLoad(machine=self.read_machine, own=lambda: self.own, clock=lambda: self.now)

    def advance(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.machine += (others_cores + own_cores) * seconds


def test_the_measure_is_the_machine_less_this_process_over_a_full_window():
    r = Readings()
    load = r.load()
    assert load.update() is None  # the baseline
    r.advance(0.2, others_cores=1.0, own_cores=1.0)
    assert load.update() is None  # the window is still open
    assert r.machine_reads == 1  # ... and /proc/stat is not read again until it may close
    r.advance(0.4, others_cores=1.0, own_cores=1.0)
    assert load.update() == pytest.approx(1.0)  # 0.6 s: the others' core, not this process's
    r.advance(0.5, others_cores=0.25, own_cores=2.0)
    assert load.update() == pytest.approx(0.25)  # a new window from the last close
    r.advance(0.1, others_cores=2.0, own_cores=0.0)
    assert load.update() == pytest.approx(0.25)  # kept until the next window closes


def test_reserves_for_busy_others_and_releases_only_when_they_quieten():
    r = Readings()
    load = r.load()
    assert not load.busy(1)  # nothing measured yet: every thread
    r.advance(0.5, others_cores=0.6, own_cores=1.0)
    assert load.busy(1)  # 0.6 of a core >= 0.5
    r.advance(0.5, others_cores=0.4, own_cores=1.0)
    assert load.busy(1)  # reserved: kept above 0.3 (the reserved core is theirs to grow into)
    r.advance(0.5, others_cores=0.2, own_cores=2.0)
    assert not load.busy(1)  # below 0.3: released
    r.advance(0.5, others_cores=0.4, own_cores=2.0)
    assert not load.busy(1)  # not reserved: 0.4 is not enough to reserve again
    r.advance(0.5, others_cores=0.8, own_cores=2.0)
    assert not load.busy(2)  # two cores are reserved for at least one busy core's worth
    assert load.busy(1)


def test_a_stale_baseline_is_taken_again_not_averaged_over():
    r = Readings()
    load = r.load()
    load.update()
    r.advance(60.0, others_cores=0.0, own_cores=0.0)  # the engine idled a minute
    assert load.update() is None  # a fresh baseline, no measure over the idle minute
    r.advance(0.5, others_cores=1.5, own_cores=0.5)
    assert load.update() == pytest.approx(1.5)


def test_an_unreadable_machine_counts_as_busy():
    r = Readings()
    r.machine = None
    assert r.load().busy(1)
    assert machine_busy_seconds("/nonexistent/stat") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_process_spinning_on_a_core_is_measured_as_busy():
    """A real spinning process: /proc/stat less this process sees about one core, and the rule reserves it."""
    assert machine_busy_seconds() is not None
    load = OthersLoad(window_s=cpu_load.WINDOW_S)
    spin = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # the spinner is running
        assert not load.busy(1)  # the baseline
        time.sleep(1.0)
        assert load.update() >= 0.5
        assert load.busy(1)
    finally:
        spinner.kill()
        spinner.wait()
