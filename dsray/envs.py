"""Every environment variable dsray reads, in one place.

Read through the accessors below, never with ``os.environ`` elsewhere, so that the
full list of knobs is visible here.
"""

from __future__ import annotations

import os
from pathlib import Path


def dsray_home() -> Path:
    """Where dsray keeps generated models and caches (``DSRAY_HOME``, default ``~/.cache/dsray``)."""
    return Path(os.environ.get("DSRAY_HOME", Path.home() / ".cache" / "dsray")).expanduser()


def num_threads() -> int | None:
    """Torch intra-op threads for model compute (``DSRAY_NUM_THREADS``); None keeps torch's default."""
    value = os.environ.get("DSRAY_NUM_THREADS")
    return int(value) if value else None


def api_key() -> str | None:
    """Bearer token the OpenAI server requires (``DSRAY_API_KEY``); None or empty leaves it open."""
    return os.environ.get("DSRAY_API_KEY") or None


def ray_address() -> str | None:
    """The Ray cluster ``dsray serve`` joins (``RAY_ADDRESS``, read by Ray itself too); None starts a local one."""
    return os.environ.get("RAY_ADDRESS") or None


def cpu_kernels_enabled() -> bool:
    """Whether dsray's CPU kernels may run (``DSRAY_CPU_KERNELS``, default on; ``0`` turns off)."""
    return os.environ.get("DSRAY_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_kernels_isa() -> str | None:
    """The instruction set to build dsray's CPU kernels for (``DSRAY_CPU_KERNELS_ISA``: ``avx512bf16``
    or ``avx2``); unset: the best the CPU has."""
    return os.environ.get("DSRAY_CPU_KERNELS_ISA", "").strip().lower() or None


def cpu_amx() -> bool:
    """Whether dsray's grouped expert kernel may use AMX tiles where the CPU has them
    (``DSRAY_CPU_AMX``, default on; ``0`` keeps it on AVX512-BF16: ``cpu_kernels.amx``)."""
    return os.environ.get("DSRAY_CPU_AMX", "1").strip().lower() not in ("0", "false", "no", "off")


def onednn_amx() -> bool:
    """Whether bf16 matmuls of 8 rows or more go to torch's oneDNN where the CPU has AMX
    (``DSRAY_ONEDNN_AMX``, default on; ``0`` keeps them on dsray's kernels: ``dsray.onednn``)."""
    return os.environ.get("DSRAY_ONEDNN_AMX", "1").strip().lower() not in ("0", "false", "no", "off")


def serve_fast_ingress() -> bool:
    """Whether the Ray cluster ``dsray serve`` starts uses Serve's HAProxy ingress (``DSRAY_SERVE_FAST_INGRESS``).

    Default on; ``0`` keeps Serve's Python proxy (see ``deploy.launch.fast_ingress_env``).
    """
    return os.environ.get("DSRAY_SERVE_FAST_INGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_exchange() -> str:
    """How CPU workers exchange MoE rows (``DSRAY_CPU_EXCHANGE``): ``socket`` (default, ``dsray/comm_socket.py``'s
    ``SocketTransport``: 0.64x of local against 0.46x with gloo on ``small`` A=1/E=1) or ``gloo``
    (torch.distributed's ``all_to_all_single``)."""
    value = os.environ.get("DSRAY_CPU_EXCHANGE", "socket").strip().lower()
    if value not in ("socket", "gloo"):
        raise ValueError(f"DSRAY_CPU_EXCHANGE={value!r}: use 'socket' or 'gloo'")
    return value


def batch_scheduling() -> bool:
    """Whether a cluster ``dsray serve`` starts runs its non-compute processes SCHED_BATCH
    (``DSRAY_SCHED_BATCH``, default on; ``0`` turns off; ``dsray/cpu_sched.py``)."""
    return os.environ.get("DSRAY_SCHED_BATCH", "1").strip().lower() not in ("0", "false", "no", "off")
