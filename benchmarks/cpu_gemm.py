"""dsray's CPU GEMM kernels against torch's oneDNN, per row count, on `small`'s weight shapes.

Where the two cross decides which one a bf16 batch takes (``onednn.takes``: on a CPU
with AMX tiles, oneDNN from ``onednn.MIN_ROWS`` rows for linears and ``onednn.grouped_min_rows()``
rows per routed-expert slot). This measures both sides in one run:

* ``linear`` — ``cpu_kernels.gemm`` vs ``F.linear`` (oneDNN) for the LM head, attention
  projections and dense/shared MLPs of `small`, at 1 to 64 rows; each timing is the median of
  ``--iters`` calls on the same (cache-warm) weight.
* ``experts`` — one MoE layer's 64 slots of `small` (D 1024, I 256): the grouped kernel in one
  call vs oneDNN one slot at a time (gate/up, SwiGLU, down), at 1 to 512 rows per slot; where the
  kernel has AMX tiles (``cpu_kernels.amx``), both with them (``kernel_ms_per_layer``) and without
  (``kernel_avx512_ms_per_layer``). The weights of 11 layers are cycled (1.06 GB), so each layer's
  weights come from memory, as in a model; ``kernel_gb_s`` is the kernel's weight read per second.
* ``new_shapes`` — oneDNN builds (JIT-compiles) a GEMM for each shape it has not seen: the time of
  a first call at each of 50 new row counts against repeated calls at those counts, which is why
  ``onednn.linear`` pads rows to buckets.

Ratios are kernel time ÷ oneDNN time (above 1: oneDNN is faster). Prints JSON (``--out`` too).

    python benchmarks/cpu_gemm.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# isort: off
import dsray  # noqa: F401  first, so torch's OpenMP threads load with dsray's short spin (dsray/__init__.py)

# isort: on
import torch
import torch.nn.functional as F

from dsray import cpu_kernels, kernel_build, onednn

# (name, N, K) of `small` (hidden 1024, q_lora 384, kv_lora 256 + rope 32, 16 heads, moe I 256, dense I 2816)
LINEARS = [
    ("lm_head", 32000, 1024),
    ("o_proj", 1024, 1024),
    ("q_a_proj", 384, 1024),
    ("q_b_proj", 1536, 384),
    ("kv_a_proj", 288, 1024),
    ("shared_gate_up", 512, 1024),
    ("shared_down", 1024, 256),
    ("dense_gate_up", 5632, 1024),
    ("dense_down", 1024, 2816),
]
LINEAR_ROWS = [1, 2, 4, 8, 12, 16, 32, 64]
EXPERT_ROWS = [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 512]


def _median_s(fn, iters: int, *args) -> float:
    fn(*args)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_linears(iters: int) -> list[dict]:
    out = []
    for name, n, k in LINEARS:
        w = torch.randn(n, k, dtype=torch.bfloat16) * k**-0.5
        for rows in LINEAR_ROWS:
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            kernel = _median_s(cpu_kernels.gemm, iters, x, w)
            onednn = _median_s(F.linear, iters, x, w)
            out.append(
                {"weight": name, "n": n, "k": k, "rows": rows, "kernel_ms": kernel * 1e3, "onednn_ms": onednn * 1e3}
                | {"kernel_over_onednn": kernel / onednn}
            )
    return out


def _grouped(rows: torch.Tensor, bounds: list, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every slot in one grouped-kernel call."""
    return cpu_kernels.swiglu_grouped(rows, list(range(len(bounds))), bounds, w13, w2)


def _one_at_a_time(rows: torch.Tensor, bounds: list, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """oneDNN, one slot at a time: gate/up, SwiGLU, down."""
    inter = w2.shape[2]
    result = torch.empty_like(rows)
    for s, (b, e) in enumerate(bounds):
        gate, up = F.linear(rows[b:e], w13[s]).split(inter, dim=-1)
        result[b:e] = F.linear(F.silu(gate) * up, w2[s])
    return result


def _per_layer_s(fn, weights: list, rows: torch.Tensor, bounds: list) -> float:
    """Seconds per layer of ``fn`` over every layer's weights in turn (warmed: each shape built once)."""
    for w13, w2 in weights:
        fn(rows, bounds, w13, w2)
    start = time.perf_counter()
    for _ in range(2):
        for w13, w2 in weights:
            fn(rows, bounds, w13, w2)
    return (time.perf_counter() - start) / (2 * len(weights))


def bench_experts(layers: int = 11, slots: int = 64, dim: int = 1024, inter: int = 256) -> list[dict]:
    weights = [
        (
            torch.randn(slots, 2 * inter, dim, dtype=torch.bfloat16) * 0.02,
            torch.randn(slots, dim, inter, dtype=torch.bfloat16) * 0.02,
        )
        for _ in range(layers)
    ]
    layer_gb = sum(w.numel() * w.element_size() for w in weights[0]) / 1e9
    tiles = cpu_kernels.amx()
    out = []
    for per_slot in EXPERT_ROWS:
        rows = torch.randn(slots * per_slot, dim, dtype=torch.bfloat16)
        bounds = [(s * per_slot, (s + 1) * per_slot) for s in range(slots)]

        kernel, onednn = (_per_layer_s(fn, weights, rows, bounds) for fn in (_grouped, _one_at_a_time))
        row = {"rows_per_slot": per_slot, "kernel_ms_per_layer": kernel * 1e3, "onednn_ms_per_layer": onednn * 1e3}
        row |= {"kernel_over_onednn": kernel / onednn, "kernel_gb_s": layer_gb / kernel}
        if tiles:
            with cpu_kernels.amx_tiles(False):
                avx512 = _per_layer_s(_grouped, weights, rows, bounds)
            row |= {"kernel_avx512_ms_per_layer": avx512 * 1e3, "amx_speedup": avx512 / kernel}
        out.append(row)
    return out


def bench_new_shapes(counts: range = range(200, 250)) -> dict:
    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    x = torch.randn(counts.stop, 1024, dtype=torch.bfloat16)

    def each_once() -> float:
        start = time.perf_counter()
        for m in counts:
            F.linear(x[:m], w)
        return (time.perf_counter() - start) / len(counts)

    first, cached = each_once(), each_once()
    return {
        "weight": [512, 1024],
        "row_counts": [counts.start, counts.stop - 1],
        "first_call_ms": first * 1e3,
        "cached_call_ms": cached * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20, help="calls per linear timing (median)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit("cpu_gemm.py: dsray's CPU kernels do not run here (needs x86-64 AVX512-BF16 or AVX2, gcc)")
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "cpu_gemm",
        "threads": args.threads,
        "isa": kernel_build.isa(),
        "amx_bf16": kernel_build.has_amx_bf16(),
        "kernel_amx_tiles": cpu_kernels.amx(),
        "onednn_takes_from_rows": {
            "linear": onednn.MIN_ROWS,
            "expert_slot": onednn.grouped_min_rows(),
        }
        if onednn.amx()
        else None,
        "linear": bench_linears(args.iters),
        "experts": bench_experts(),
        "new_shapes": bench_new_shapes(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
