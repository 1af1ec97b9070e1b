"""Torch's OpenMP threads spin briefly when ``dsray`` is imported before torch (``dsray/openmp.py``
sets ``GOMP_SPINCOUNT``): a spinning OpenMP thread takes a core from dsray's own kernel threads.

Each case runs in a fresh interpreter: libgomp reads the setting once, when torch loads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, statistics, sys, time
first = sys.argv[1]
if first == "dsray":
    import dsray
import torch
import dsray.openmp
torch.set_num_threads(2)
a = torch.randn(384, 384)
for _ in range(3):
    a @ a
idle = []
for _ in range(7):
    a @ a  # a parallel op, then 100 ms with nothing to do: what the process burns is OpenMP's spin
    t0 = time.process_time()
    time.sleep(0.1)
    idle.append(time.process_time() - t0)
print(json.dumps({
    "spin": os.environ.get("GOMP_SPINCOUNT"),
    "spins_long": dsray.openmp.torch_spins_long(),
    "warned": dsray.openmp.warn_if_torch_spins_long(),
    "idle_cpu_s": statistics.median(idle),
}))
"""


def _probe(first: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, first], env=clean | env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"log": out.stderr}


def test_dsray_first_sets_a_short_spin_that_torch_then_keeps():
    ours, torch_first = _probe("dsray"), _probe("torch")
    assert ours["spin"] == "10000" and not ours["spins_long"]
    # Imported after torch, the setting cannot reach this process's libgomp (only its children), and
    # the kernels say so (they call the warning when they load).
    assert torch_first["spins_long"] and torch_first["warned"] and "import dsray first" in torch_first["log"]
    assert not ours["warned"] and not ours["log"]
    # The OpenMP thread of a 2-thread torch goes to sleep soon after an op instead of spinning on.
    assert ours["idle_cpu_s"] < 0.5 * torch_first["idle_cpu_s"], (ours, torch_first)


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "123"}, {"OMP_WAIT_POLICY": "active"}])
def test_a_users_openmp_setting_wins(env):
    got = _probe("dsray", **env)
    assert got["spin"] == env.get("GOMP_SPINCOUNT") and not got["spins_long"] and not got["warned"]
