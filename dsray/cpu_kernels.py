"""The AVX512-BF16 decode kernels of ``csrc/cpu_kernels.c``: built at first use, called through ctypes.

``gemv`` (a bf16 linear over a few rows) and ``swiglu_experts`` (one token through its routed and
shared experts in one call) replace torch's bf16 matrix-vector path on CPUs that have the
``avx512_bf16`` instructions; everywhere else ``available()`` is False and the callers keep their
torch code, which is also the reference the tests hold these kernels to.

The shared library is compiled with the system C compiler into ``$DSRAY_HOME/kernels`` (named by
a hash of the source and flags, written atomically, so concurrent workers share one build) and
linked against the OpenMP runtime torch ships, so kernel and torch threads are one pool.
``DSRAY_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from dsray import envs

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# -ffp-contract=off: a fused multiply-add would round differently from torch's separate mul and add.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mbmi2", "-ffp-contract=off", "-fopenmp"]
MAX_ROWS = 4  # gemv: rows of x per call; wider batches are matrix products, where oneDNN wins

_bf16_p = ctypes.c_void_p
_int = ctypes.c_int
_long = ctypes.c_long


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


def _torch_libgomp() -> Path | None:
    """The OpenMP runtime torch loaded (linking the same file keeps one runtime in the process)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _build(cache_dir: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    gomp = _torch_libgomp()
    link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp else ["-lgomp"]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS + link).encode()).hexdigest()[:16]
    target = cache_dir / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *CFLAGS, "-shared", "-fPIC", str(SOURCE), "-o", str(built), *link, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {' '.join(cmd)}\n{done.stderr}")
        os.replace(built, target)  # atomic: a concurrent build of the same key lands the same bytes
    return target


_enabled = True  # switched off by ``disabled()``: tests and benchmarks run the torch reference with it


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch reference paths instead of the kernels inside this block (this process)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not envs.cpu_kernels_enabled() or not _cpu_has_avx512_bf16():
        return None
    try:
        lib = ctypes.CDLL(str(_build(envs.dsray_home() / "kernels")))
    except (OSError, RuntimeError) as exc:
        logger.warning("dsray CPU kernels unavailable, using torch's bf16 kernels: %s", exc)
        return None
    lib.dsray_gemv_bf16.argtypes = [_bf16_p, _long, _bf16_p, _long, _bf16_p, _long, _int, _int, _int, _int]
    lib.dsray_gemv_bf16.restype = None
    # x, D, num_experts, num_routed, gate[], up[], down[], inter[], weights[], h, act, out, nthreads
    lib.dsray_swiglu_experts_bf16.argtypes = [_bf16_p, _int, _int, _int] + [_bf16_p] * 8 + [_int]
    lib.dsray_swiglu_experts_bf16.restype = None
    # q_nope, q_sn, q_sh, q_pe, pe_sn, pe_sh, w_uk, w_uv_t, cache, block_tables, bt_stride, context_lens,
    # block_size, N, H, d_nope, R, C, d_v, scale, out, nthreads
    lib.dsray_mla_decode_bf16.argtypes = (
        [_bf16_p, _long, _long, _bf16_p, _long, _long]
        + [_bf16_p] * 4
        + [_long, _bf16_p]
        + [_int] * 7
        + [ctypes.c_float, _bf16_p, _int]
    )
    lib.dsray_mla_decode_bf16.restype = None
    return lib


def available() -> bool:
    """Whether the kernels run here (an AVX512-BF16 CPU, a C compiler, not turned off)."""
    return _enabled and _library() is not None


def usable(x: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether ``x`` (bf16 on CPU, at most ``max_rows`` rows) can take the kernel path."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() // max(x.shape[-1], 1) <= max_rows
        and available()
    )


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for bf16 ``x [..., K]`` of at most ``MAX_ROWS`` rows, ``weight [N, K]``."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"gemv: x has {K} features but weight is {tuple(weight.shape)}")
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty(rows.shape[0], N, dtype=torch.bfloat16)
    _library().dsray_gemv_bf16(
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        weight.stride(0),
        out.data_ptr(),
        N,
        rows.shape[0],
        N,
        K,
        torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], N)


def swiglu_experts(
    x: torch.Tensor,
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
    shared: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor:
    """One token ``x [1, D]`` through SwiGLU experts: ``bf16(sum_e w_e * ffn_e(x)) + sum_s ffn_s(x)``.

    ``routed`` holds ``(gate [I, D], up [I, D], down [D, I], weight)`` in the order to sum them;
    ``shared`` holds ``(gate, up, down)``. Every matrix must be contiguous bf16 with ``I % 4 == 0``.
    Rounds like ``ExpertShard.forward_single`` followed by the shared MLP's addition.
    """
    experts = [(g, u, d) for g, u, d, _ in routed] + list(shared)
    n = len(experts)
    D = x.shape[-1]
    inter = [g.shape[0] for g, _, _ in experts]
    if any(i % 4 for i in inter):
        raise ValueError(f"swiglu_experts: intermediate sizes must be multiples of 4, got {inter}")
    for m in (m for e in experts for m in e):
        if m.dtype != torch.bfloat16 or not m.is_contiguous():
            raise ValueError(f"swiglu_experts: weights must be contiguous bf16, got {m.dtype} {tuple(m.stride())}")
    ptrs = [_array(ctypes.c_void_p, [m.data_ptr() for m in col]) for col in zip(*experts)] if n else [None] * 3
    x = x.reshape(D).contiguous()
    h = torch.empty(2 * sum(inter), dtype=torch.float32)
    act = torch.empty(sum(inter), dtype=torch.bfloat16)
    out = torch.empty(1, D, dtype=torch.bfloat16)
    _library().dsray_swiglu_experts_bf16(
        x.data_ptr(),
        D,
        n,
        len(routed),
        *ptrs,
        _array(ctypes.c_int, inter),
        _array(ctypes.c_float, [w for *_, w in routed]),
        h.data_ptr(),
        act.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _array(ctype, values: list) -> ctypes.c_void_p:
    """A C array of ``values`` as a pointer argument (kept alive by the caller's frame via ``_keep``)."""
    arr = (ctype * max(len(values), 1))(*values)
    ptr = ctypes.cast(arr, ctypes.c_void_p)
    ptr._keep = arr  # the array must outlive the call
    return ptr


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv_t: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA for a decode step: ``q_nope [N, H, d_nope]`` and rotated ``q_pe [N, H, R]`` over
    the paged latent ``kv_cache [slots, C + R]`` → ``[N, H, d_v]``, as ``MLA`` computes it in
    absorbed mode with ``W_UK [H, d_nope, C]`` and ``W_UVᵀ [H, C, d_v]`` (see ``attention/mla.py``)."""
    N, H, d_nope = q_nope.shape
    R = q_pe.shape[-1]
    C, d_v = w_uv_t.shape[1], w_uv_t.shape[2]
    if C % 16 or d_v % 16:
        raise ValueError(f"mla_decode: kv_lora_rank and v_head_dim must be multiples of 16, got {C}, {d_v}")
    if q_nope.stride(-1) != 1 or q_pe.stride(-1) != 1:
        raise ValueError("mla_decode: the last dims of q_nope and q_pe must be contiguous")
    for name, t in (("w_uk", w_uk), ("w_uv_t", w_uv_t), ("kv_cache", kv_cache)):
        if t.dtype != torch.bfloat16 or not t.is_contiguous():
            raise ValueError(f"mla_decode: {name} must be contiguous bf16")
    block_tables = block_tables.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty(N, H, d_v, dtype=torch.bfloat16)
    _library().dsray_mla_decode_bf16(
        q_nope.data_ptr(),
        q_nope.stride(0),
        q_nope.stride(1),
        q_pe.data_ptr(),
        q_pe.stride(0),
        q_pe.stride(1),
        w_uk.data_ptr(),
        w_uv_t.data_ptr(),
        kv_cache.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        context_lens.data_ptr(),
        block_size,
        N,
        H,
        d_nope,
        R,
        C,
        d_v,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
