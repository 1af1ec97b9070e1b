"""Building dsray's CPU kernels (``csrc/``): which instruction set, and the compile.

The kernels are written once over the per-instruction-set primitives of ``csrc/simd.h`` and built
for the best set the CPU has (``ISAS``): AVX512-BF16, whose ``vdpbf16ps`` multiplies bf16 pairs in
one instruction, or else AVX2 with FMA, which widens bf16 to fp32 in registers.
``DSRAY_CPU_KERNELS_ISA=avx2`` picks AVX2 on a CPU that has both; ``DSRAY_CPU_KERNELS=0`` builds
nothing. ``using_isa()`` switches within a block: the tests hold each set's build to the same torch
reference.

The shared library is compiled with the system C compiler into ``$DSRAY_HOME/kernels``, named by
the instruction set and a hash of the source and flags, and written atomically, so concurrent
workers share one build. ``dsray.cpu_kernels`` loads it and binds its functions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsray import envs

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "cpu_kernels.c", CSRC / "decode_step.c"]
HEADERS = [CSRC / "cpu_kernels.h", CSRC / "simd.h"]
# -ffp-contract=off: a fused multiply-add would round differently from torch's separate mul and add
# (the dot products' own FMAs are written out, in simd.h).
CFLAGS = ["-O3", "-ffp-contract=off", "-pthread"]
# On a CPU with AMX tiles the AVX512-BF16 build also has the grouped expert kernel's AMX path
# (``cpu_kernels.use_amx``); on one without, the same source builds without it.
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16"]
# Instruction sets the kernels are built for, best first: the compiler flags, and the /proc/cpuinfo
# flags a CPU needs for them.
ISAS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx512bf16": (
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mbmi2"],
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "bmi2"),
    ),
    "avx2": (["-mavx2", "-mfma"], ("avx2", "fma")),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` names them (none off Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_isas() -> tuple[str, ...]:
    """The instruction sets of ``ISAS`` this CPU runs, best first (none off x86-64 Linux)."""
    flags = cpu_flags()
    return tuple(isa for isa, (_, needs) in ISAS.items() if flags.issuperset(needs))


def has_amx_bf16() -> bool:
    """Whether the CPU has AMX tiles with bf16 products (Sapphire Rapids and later): oneDNN, which
    torch's bf16 matmuls run on, uses them; the kernels here do not."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


@functools.cache
def chosen_isa() -> str | None:
    """The instruction set to build for: the best this CPU has, or ``DSRAY_CPU_KERNELS_ISA``'s
    (None: neither, or ``DSRAY_CPU_KERNELS=0``). Read once: every kernel call asks."""
    if not envs.cpu_kernels_enabled():
        return None
    have = cpu_isas()
    wanted = envs.cpu_kernels_isa()
    if wanted is None:
        return have[0] if have else None
    if wanted not in ISAS:
        raise ValueError(f"DSRAY_CPU_KERNELS_ISA={wanted!r}: not one of {', '.join(ISAS)}")
    if wanted not in have:
        logger.warning("DSRAY_CPU_KERNELS_ISA=%s: this CPU lacks it (it has %s)", wanted, ", ".join(have) or "neither")
        return None
    return wanted


_isa: str | None = None  # set by ``using_isa()``; else ``chosen_isa()``


def isa() -> str | None:
    """The instruction set the kernels run on here (None: they do not run)."""
    return _isa or chosen_isa()


@contextlib.contextmanager
def using_isa(name: str) -> Iterator[None]:
    """Run the kernels built for ``name`` (one of ``cpu_isas()``) inside this block."""
    global _isa
    if name not in cpu_isas():
        raise ValueError(f"this CPU does not run {name!r} (it runs {', '.join(cpu_isas()) or 'none'})")
    was, _isa = _isa, name
    try:
        yield
    finally:
        _isa = was


def build(cache_dir: Path, isa: str) -> Path:
    """The shared library of the kernels for ``isa`` in ``cache_dir``, compiled unless it is there. On an AMX
    CPU the AVX512-BF16 build has the AMX tile code too, unless the compiler cannot build it (GCC before 11):
    then it is built without, as on any other CPU."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    flags = [*CFLAGS, *ISAS[isa][0]]
    if isa == "avx512bf16" and has_amx_bf16():
        try:
            return _build(cache_dir, isa, compiler, [*flags, *AMX_FLAGS])
        except RuntimeError as exc:
            logger.warning("dsray CPU kernels: building without AMX tiles: %s", exc)
    return _build(cache_dir, isa, compiler, flags)


def _build(cache_dir: Path, isa: str, compiler: str, flags: list[str]) -> Path:
    source = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS])
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir / f"cpu_kernels-{isa}-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {CSRC} failed: {' '.join(cmd)}\n{done.stderr}")
        os.replace(built, target)  # atomic: a concurrent build of the same key lands the same bytes
    return target
