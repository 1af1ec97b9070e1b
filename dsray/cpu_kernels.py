"""The CPU kernels of ``csrc/``: built at first use (``kernel_build``), called through ctypes.

``gemm`` (a bf16 linear over a decode batch's rows) and ``swiglu_experts`` (one token through its routed and
shared experts in one call) replace torch's bf16 matrix-vector path on x86-64 CPUs. They are built
for the best instruction set the CPU has (``kernel_build.ISAS``): AVX512-BF16 or AVX2 with FMA
(torch's own bf16 matmul on the latter runs at a sixth of its fp32 speed). Everywhere else
``available()`` is False and the callers keep their torch code, which is also the reference the
tests hold these kernels to.

The kernels run on their own small thread pool (see the C source for why not OpenMP), as many
threads as torch's intra-op setting. ``DSRAY_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator

import torch

from dsray import envs, kernel_build, openmp
from dsray.kernel_threads import threads

logger = logging.getLogger(__name__)

GEMM_MAX_ROWS = 64  # gemm: rows of x per call, up to a wide decode batch; prefills go to oneDNN

_bf16_p = ctypes.c_void_p
_int = ctypes.c_int
_long = ctypes.c_long


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


def _library() -> ctypes.CDLL | None:
    chosen = kernel_build.isa()
    return None if chosen is None else _library_for(chosen)


@functools.cache
def _library_for(isa: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(kernel_build.build(envs.dsray_home() / "kernels", isa)))
    except (OSError, RuntimeError) as exc:
        logger.warning("dsray CPU kernels unavailable, using torch's bf16 kernels: %s", exc)
        return None
    openmp.warn_if_torch_spins_long()
    # X, ldx, W, ldw, Y, ldy, M, N, K, nthreads
    lib.dsray_gemm_bf16.argtypes = [_bf16_p, _long, _bf16_p, _long, _bf16_p, _long, _int, _int, _int, _int]
    lib.dsray_gemm_bf16.restype = None
    # x, D, num_experts, num_routed, gate[], up[], down[], inter[], weights[], act, out, nthreads
    lib.dsray_swiglu_experts_bf16.argtypes = [_bf16_p, _int, _int, _int] + [_bf16_p] * 7 + [_int]
    lib.dsray_swiglu_experts_bf16.restype = None
    # q, q_sn, kv, kv_sn, kv_norm_w, eps, cis, interleaved, slot_mapping, w_uk_t, w_uv, cache, block_tables,
    # bt_stride, context_lens, block_size, N, H, d_nope, R, C, d_v, scale, q_pe scratch, out, nthreads
    lib.dsray_mla_decode_step_bf16.argtypes = (
        [_bf16_p, _long, _bf16_p, _long, _bf16_p, ctypes.c_float, _bf16_p, _int]
        + [_bf16_p] * 5
        + [_long, _bf16_p]
        + [_int] * 7
        + [ctypes.c_float, _bf16_p, _bf16_p, _int]
    )
    # x, ldx, w, out, T, D, eps, nthreads
    lib.dsray_rmsnorm_bf16.argtypes = [_bf16_p, _long, _bf16_p, _bf16_p, _int, _int, ctypes.c_float, _int]
    # x, ldx, w, bias, T, D, E, K, n_group, topk_group, scoring, method, norm, scaling, weights, ids, nthreads
    lib.dsray_gate_bf16.argtypes = (
        [_bf16_p, _long, _bf16_p, _bf16_p] + [_int] * 9 + [ctypes.c_float, _bf16_p, _bf16_p, _int]
    )
    # X, w13, w2, num_slots, slots[], row_off[], D, I, act, Y, nthreads
    grouped = lib.dsray_swiglu_grouped_bf16
    grouped.argtypes = [_bf16_p] * 3 + [_int, _bf16_p, _bf16_p, _long, _long] + [_bf16_p] * 2 + [_int]
    # back, order, weights, T, K, D, out, nthreads
    lib.dsray_combine_bf16.argtypes = [_bf16_p] * 3 + [_int] * 3 + [_bf16_p, _int]
    # x, N, D, gate, up, down, I, g scratch, u scratch, out, nthreads
    lib.dsray_swiglu_rows_bf16.argtypes = [_bf16_p, _int, _int] + [_bf16_p] * 3 + [_int] + [_bf16_p] * 3 + [_int]
    # model tables, N, x, cis, slot_mapping, cache, cache layer stride, block_tables, bt stride, context_lens, out,
    # nthreads → 0, or -1 without scratch memory
    lib.dsray_decode_step_bf16.argtypes = (
        [ctypes.c_void_p, _int]
        + [_bf16_p] * 4
        + [_long, _bf16_p, _long]
        + [
            _bf16_p,
            _bf16_p,
            _int,
        ]
    )
    lib.dsray_decode_step_bf16.restype = _int
    lib.dsray_use_amx.argtypes = [_int]
    lib.dsray_use_amx.restype = _int
    lib.dsray_use_amx(int(envs.cpu_amx()))
    for fn in (
        lib.dsray_swiglu_rows_bf16,
        lib.dsray_mla_decode_step_bf16,
        lib.dsray_rmsnorm_bf16,
        lib.dsray_gate_bf16,
        grouped,
        lib.dsray_combine_bf16,
    ):
        fn.restype = None
    return lib


def amx() -> bool:
    """Whether the grouped expert kernel runs its slots' products on AMX tiles here: a CPU with AMX-BF16,
    the AVX512-BF16 build, ``DSRAY_CPU_AMX`` not ``0``, and the kernel granting this process the tiles."""
    lib = _library()
    return lib is not None and bool(lib.dsray_use_amx(-1))


@contextlib.contextmanager
def amx_tiles(on: bool) -> Iterator[bool]:
    """Inside this block the grouped kernel uses AMX tiles (``on``, where ``amx`` could be true) or
    not; yields whether it does. For tests and benchmarks: both paths against the same reference."""
    lib = _library()
    if lib is None:
        yield False
        return
    was = lib.dsray_use_amx(-1)
    try:
        yield bool(lib.dsray_use_amx(int(on)))
    finally:
        lib.dsray_use_amx(was)


def available() -> bool:
    """Whether the kernels run here (an AVX512-BF16 or AVX2 CPU, a C compiler, not turned off)."""
    return _enabled and _library() is not None


def usable(x: torch.Tensor, max_rows: int = GEMM_MAX_ROWS) -> bool:
    """Whether ``x`` (bf16 on CPU, at most ``max_rows`` rows) can take the kernel path."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() // max(x.shape[-1], 1) <= max_rows
        and available()
    )


@functools.cache
def torch_bf16_widens() -> bool:
    """Whether torch's bf16 matmul on this CPU widens its operands to fp32 in its inner loop: an x86
    CPU without AVX512-BF16. There it runs at a fifth of the same matmul in fp32 (2 Zen cores,
    1,024 x 1,024 weights, 128 to 512 rows: ~11 against 47-58 GFLOP/s, the widening of both
    operands included), so bf16 prefills are better computed in fp32 (``layers.linear``)."""
    have = kernel_build.cpu_isas()
    return "avx2" in have and "avx512bf16" not in have


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for bf16 ``x [..., K]`` of a decode batch's rows (any number; a
    decode batch's 1 to ``GEMM_MAX_ROWS`` is what it is for), ``weight [N, K]``: register-tiled dot
    products, fp32 sums rounded once."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"gemm: x has {K} features but weight is {tuple(weight.shape)}")
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty(rows.shape[0], N, dtype=torch.bfloat16)
    _library().dsray_gemm_bf16(
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        weight.stride(0),
        out.data_ptr(),
        N,
        rows.shape[0],
        N,
        K,
        threads(),
    )
    return out.view(*x.shape[:-1], N)


def swiglu_experts(
    x: torch.Tensor,
    routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
    shared: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (),
    *,
    checked: bool = False,
) -> torch.Tensor:
    """One token ``x [1, D]`` through SwiGLU experts: ``bf16(sum_e w_e * ffn_e(x)) + sum_s ffn_s(x)``.

    ``routed`` holds ``(gate [I, D], up [I, D], down [D, I], weight)`` in the order to sum them;
    ``shared`` holds ``(gate, up, down)``. Every matrix must be contiguous bf16 with ``I % 4 == 0``
    (verified here unless the caller says it has ``checked`` the routed ones).
    Rounds like ``ExpertShard.forward_single`` followed by the shared MLP's addition.
    """
    experts = [(g, u, d) for g, u, d, _ in routed] + list(shared)
    for m in (m for e in (experts[len(routed) :] if checked else experts) for m in e):
        if m.dtype != torch.bfloat16 or not m.is_contiguous():
            raise ValueError(f"swiglu_experts: weights must be contiguous bf16, got {m.dtype} {tuple(m.stride())}")
    inter = array.array("i", (g.shape[0] for g, _, _ in experts))
    if any(i % 4 for i in inter):
        raise ValueError(f"swiglu_experts: intermediate sizes must be multiples of 4, got {list(inter)}")
    # Pointer tables (kept alive by these locals through the call).
    gates, ups, downs = (array.array("Q", (e[j].data_ptr() for e in experts)) for j in range(3))
    weights = array.array("f", (w for *_, w in routed))
    D = x.shape[-1]
    x = x.reshape(D).contiguous()
    act = torch.empty(sum(inter), dtype=torch.bfloat16)
    out = torch.empty(1, D, dtype=torch.bfloat16)
    _library().dsray_swiglu_experts_bf16(
        x.data_ptr(),
        D,
        len(experts),
        len(routed),
        _address(gates),
        _address(ups),
        _address(downs),
        _address(inter),
        _address(weights),
        act.data_ptr(),
        out.data_ptr(),
        threads(),
    )
    return out


def swiglu_rows(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for bf16 ``x [T, D]`` (a decode batch's rows) and contiguous bf16
    ``gate``/``up [I, D]``, ``down [D, I]``: each product rounded to bf16, as ``MLP.forward`` computes it."""
    T, D = x.shape
    inter = gate.shape[0]
    if gate.shape != (inter, D) or up.shape != (inter, D) or down.shape != (D, inter):
        raise ValueError(
            f"swiglu_rows: gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)} for x {(T, D)}"
        )
    x = x.contiguous()
    g, u = (torch.empty(T, inter, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(T, D, dtype=torch.bfloat16)
    _library().dsray_swiglu_rows_bf16(
        x.data_ptr(), T, D, gate.data_ptr(), up.data_ptr(), down.data_ptr(), inter, g.data_ptr(), u.data_ptr(),
        out.data_ptr(), threads(),
    )  # fmt: skip
    return out


def decode_step(model_tables, *args: int) -> int:
    """``dsray_decode_step_bf16`` (``dsray/decode_step.py`` builds the tables and the arguments) on the
    kernels' threads: 0, or -1 if it could not allocate its scratch memory."""
    return _library().dsray_decode_step_bf16(model_tables, *args, threads())


def swiglu_grouped(
    rows: torch.Tensor, slots: list[int], spans: list[tuple[int, int]], w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Rows grouped by slot through their slots' SwiGLU experts: rows ``spans[j] = (begin, end)`` of
    ``rows [M, D]`` belong to slot ``slots[j]`` of the stacked ``w13 [S, 2I, D]`` / ``w2 [S, D, I]``.
    Returns ``[M, D]`` with those rows computed (rows in no span are left unset), each rounded as
    ``ExpertShard.expert_ffn`` rounds it: one call for every slot instead of ~5 torch ops per slot."""
    S, two_i, D = w13.shape
    inter = two_i // 2
    if w2.shape != (S, D, inter):
        raise ValueError(
            f"swiglu_grouped: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not stack one expert each"
        )
    for name, t in (("rows", rows), ("w13", w13), ("w2", w2)):
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"swiglu_grouped: {name} must be contiguous bf16 on the CPU")
    M = rows.shape[0]
    if len(slots) != len(spans) or any(not 0 <= s < S for s in slots) or any(not 0 <= b <= e <= M for b, e in spans):
        raise ValueError(f"swiglu_grouped: slots {slots} / spans {spans} do not fit {M} rows of {S} slots")
    slot_ids = array.array("i", slots)
    row_off = array.array("l", (i for span in spans for i in span))
    act = torch.empty(M, inter, dtype=torch.bfloat16)
    out = torch.empty_like(rows)
    _library().dsray_swiglu_grouped_bf16(
        rows.data_ptr(),
        w13.data_ptr(),
        w2.data_ptr(),
        len(slot_ids),
        _address(slot_ids),
        _address(row_off),
        D,
        inter,
        act.data_ptr(),
        out.data_ptr(),
        threads(),
    )
    return out


def combine(back: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """An MoE layer's combine: ``back [T*K, D]`` bf16 results in sorted order, ``order [T*K]`` the
    (token, k) pair of each sorted row, ``weights [T, K]`` fp32 → ``[T, D]`` bf16, each token's K
    results weighted and summed in k order in fp32 (as ``router.exchange.Combine`` computes it)."""
    T, K = weights.shape
    D = back.shape[1]
    if back.dtype != torch.bfloat16 or back.shape[0] != T * K or order.shape != (T * K,):
        raise ValueError(
            f"combine: back {tuple(back.shape)} {back.dtype} and order {tuple(order.shape)} do not fit weights {T}x{K}"
        )
    back = back.contiguous()
    order = order.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=torch.bfloat16)
    _library().dsray_combine_bf16(
        back.data_ptr(), order.data_ptr(), weights.data_ptr(), T, K, D, out.data_ptr(), threads()
    )
    return out


def _address(values: array.array) -> int | None:
    """The address of an array's buffer (None when it is empty)."""
    return values.buffer_info()[0] if len(values) else None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` of bf16 ``x [..., D]`` with a bf16 ``weight [D]``, rounded as ``dsray.layers.RMSNorm``."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.bfloat16)
    _library().dsray_rmsnorm_bf16(
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        rows.shape[0],
        D,
        eps,
        threads(),
    )
    return out.view(x.shape)


GATE_SCORING = {"softmax": 0, "sigmoid": 1}
GATE_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    scoring_func: str,
    topk_method: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router.gate.Gate`` for bf16 ``x [T, D]`` and an fp32 ``weight [E, D]``: ``(weights [T, K], ids [T, K])``."""
    T, D = x.shape
    E = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError("gate: the gate weight must be contiguous fp32")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError("gate: the correction bias must be contiguous fp32")
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    _library().dsray_gate_bf16(
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        T,
        D,
        E,
        top_k,
        n_group or 1,
        topk_group or 1,
        GATE_SCORING[scoring_func],
        GATE_METHODS[topk_method],
        int(norm_topk_prob),
        routed_scaling_factor,
        weights.data_ptr(),
        ids.data_ptr(),
        threads(),
    )
    return weights, ids


def mla_decode_step(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_norm_weight: torch.Tensor,
    eps: float,
    rope_cis: torch.Tensor,
    rope_interleaved: bool,
    slot_mapping: torch.Tensor,
    w_uk_t: torch.Tensor,
    w_uv: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA for a decode step, from the projections on, as ``attention/mla.py`` computes it.

    ``q [N, H, d_nope + R]`` and ``kv [N, C + R]`` (the outputs of ``q_b_proj`` / ``q_proj`` and
    ``kv_a_proj_with_mqa``, rope dims not yet rotated): writes each token's latent (normed ``c_kv``,
    rotated ``k_pe``) to ``kv_cache [slots, C + R]`` at ``slot_mapping``, rotates the query by
    ``rope_cis [N, 1, R/2]`` (complex), attends over the paged cache with ``W_UK`` and ``W_UV``
    absorbed (given as ``W_UKᵀ [H, C, d_nope]`` and ``W_UV [H, d_v, C]``: rows the kernel takes
    dot products with), and returns ``[N, H, d_v]``.
    """
    N, H, qk = q.shape
    C = w_uk_t.shape[1]
    R = kv.shape[-1] - C
    d_nope, d_v = qk - R, w_uv.shape[1]
    if C % 16 or d_v % 16:
        raise ValueError(f"mla_decode_step: kv_lora_rank and v_head_dim must be multiples of 16, got {C}, {d_v}")
    if q.stride(-1) != 1 or q.stride(1) != qk or kv.stride(-1) != 1:
        raise ValueError("mla_decode_step: q rows must be [H, d_nope + R] contiguous and kv rows contiguous")
    if w_uk_t.shape[2] != d_nope or w_uv.shape[2] != C:
        raise ValueError(
            f"mla_decode_step: W_UK^T {tuple(w_uk_t.shape)} / W_UV {tuple(w_uv.shape)} do not fit q and kv"
        )
    for name, t in (("w_uk_t", w_uk_t), ("w_uv", w_uv), ("kv_cache", kv_cache), ("kv_norm_weight", kv_norm_weight)):
        if t.dtype != torch.bfloat16 or not t.is_contiguous():
            raise ValueError(f"mla_decode_step: {name} must be contiguous bf16")
    cis = torch.view_as_real(rope_cis).reshape(N, R)  # (cos, sin) pairs, fp32
    slots = slot_mapping.to(torch.int64).contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    q_pe = torch.empty(N, H, R, dtype=torch.bfloat16)
    out = torch.empty(N, H, d_v, dtype=torch.bfloat16)
    _library().dsray_mla_decode_step_bf16(
        q.data_ptr(),
        q.stride(0),
        kv.data_ptr(),
        kv.stride(0),
        kv_norm_weight.data_ptr(),
        eps,
        cis.data_ptr(),
        int(rope_interleaved),
        slots.data_ptr(),
        w_uk_t.data_ptr(),
        w_uv.data_ptr(),
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
        q_pe.data_ptr(),
        out.data_ptr(),
        threads(),
    )
    return out
