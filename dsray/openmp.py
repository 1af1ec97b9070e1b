"""Torch's OpenMP threads sleep soon after an op: set when ``dsray`` is imported, before torch loads.

libgomp's threads spin ~300,000 rounds after each parallel op before they sleep (its default). In a
prefill dsray's kernels (``dsray/csrc``, their own thread pool) run between torch ops, and a
spinning OpenMP thread takes half of a core from them: on 2 cores the grouped experts of a
128-token prefill of ``small`` took 113 ms against 76 with 10,000 rounds, and the whole prefill
594 -> 795 tok/s (with the kernels' own shorter spin). libgomp reads ``GOMP_SPINCOUNT`` once, when it
loads with torch, so this runs from ``dsray/__init__.py``: a process that imported torch first keeps
the long spin (its children get the setting), and the kernels warn when they load. A user's ``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY`` wins.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

SPIN_DEFAULT = "10000"
SET_BY_DSRAY = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
if SET_BY_DSRAY:
    os.environ["GOMP_SPINCOUNT"] = SPIN_DEFAULT
# Whether torch (and libgomp with it) loaded before the line above could take effect.
TORCH_LOADED_FIRST = "torch" in sys.modules


def torch_spins_long() -> bool:
    """Whether this process's libgomp loaded (with torch) before dsray could shorten its spin, and
    nobody chose a spin for it: the setting then reaches child processes only."""
    return TORCH_LOADED_FIRST and SET_BY_DSRAY


def warn_if_torch_spins_long() -> bool:
    """Log how to get the short spin where this process keeps the long one; whether it did."""
    if not torch_spins_long():
        return False
    logger.warning(
        "torch was imported before dsray, so its OpenMP threads keep libgomp's long spin after each op and take "
        "cores from dsray's CPU kernels in prefills (a 128-token prefill of `small` ~25%% slower on 2 cores): "
        "import dsray first, or set GOMP_SPINCOUNT=%s before Python starts",
        SPIN_DEFAULT,
    )
    return True
