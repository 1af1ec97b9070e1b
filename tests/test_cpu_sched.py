"""dsray.cpu_sched: processes started inside ``background()`` run SCHED_BATCH; ``as_compute()`` moves every
thread of a process back to SCHED_OTHER. Each case runs in a fresh interpreter so this one keeps its class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dsray import cpu_sched

pytestmark = pytest.mark.skipif(not cpu_sched.supported(), reason="no Linux scheduling classes here")

# A child that reports its threads' classes before and after as_compute(), a second thread started first.
CHILD = textwrap.dedent(
    """
    import json, os, threading
    from dsray import cpu_sched
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    def classes():
        return sorted(os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task"))
    before = classes()
    moved = cpu_sched.as_compute()
    later = threading.Thread(target=lambda: print(json.dumps(
        {"before": before, "moved": moved, "after": classes(), "new_thread": os.sched_getscheduler(0)})))
    later.start(); later.join(); stop.set()
    """
)

PARENT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from dsray import cpu_sched
    start = os.sched_getscheduler(0)
    with cpu_sched.background():
        inside = os.sched_getscheduler(0)
        child = json.loads(subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True,
                                          check=True).stdout)
    print(json.dumps({"start": start, "inside": inside, "end": os.sched_getscheduler(0), "child": child}))
    """
)


def _run(env: dict[str, str], prelude: str = "") -> dict:
    script = prelude + PARENT
    out = subprocess.run(
        [sys.executable, "-c", script, CHILD], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_children_of_background_run_batch_and_compute_moves_every_thread_back():
    got = _run({"DSRAY_SCHED_BATCH": "1"})
    batch, other = os.SCHED_BATCH, os.SCHED_OTHER
    assert (got["start"], got["inside"], got["end"]) == (other, batch, other)
    child = got["child"]
    assert set(child["before"]) == {batch} and len(child["before"]) >= 2  # inherited by the child and its thread
    assert child["moved"] == len(child["before"])
    assert set(child["after"]) == {other} and child["new_thread"] == other


def test_turned_off_nothing_changes():
    got = _run({"DSRAY_SCHED_BATCH": "0"})
    other = os.SCHED_OTHER
    assert (got["start"], got["inside"], got["end"]) == (other, other, other)
    assert set(got["child"]["before"]) == {other} and got["child"]["moved"] == 0


def test_a_class_the_user_chose_is_left_alone():
    # A caller the user put in SCHED_IDLE: background() keeps it (and its children) there, and a compute
    # process there is not moved (as_compute moves SCHED_BATCH threads only).
    prelude = "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    got = _run({"DSRAY_SCHED_BATCH": "1"}, prelude)
    idle = os.SCHED_IDLE
    assert (got["start"], got["inside"], got["end"]) == (idle, idle, idle)
    assert set(got["child"]["before"]) == {idle} and got["child"]["moved"] == 0
    assert set(got["child"]["after"]) == {idle}
