"""The GPU kernels alone, against what the device's memory can do: one function per kernel.

* ``mla`` — the Triton MLA decode kernel (``attention/triton_mla.py``) over a paged latent cache:
  achieved GB/s (bytes of latent cache and absorbed query it must read ÷ kernel time) against the
  device's copy bandwidth (a large tensor copy on the same device, read + write bytes ÷ time).
  Decode attention is memory bound, so the target is ≥ 85 % of that bandwidth.
* ``moe`` — the Triton fused MoE (``expert_mode="triton"``): TFLOP/s against the torch grouped path
  (one matmul pair per slot) on the same device and weights.
* ``fp8`` — the FP8 block-scaled Triton GEMM (``fp8_weights="keep"``): TFLOP/s against a bf16 torch
  matmul of the dequantised weight.

Needs CUDA; without it the script says so and exits non-zero, unless ``--interpret`` is given:
then it runs tiny shapes under ``TRITON_INTERPRET=1`` on CPU tensors, a smoke check whose
figures mean nothing.

    python benchmarks/kernels.py --kernel all --out kernels.json
    python benchmarks/kernels.py --kernel mla --interpret      # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_FRACTION = 0.85  # of the measured copy bandwidth, for the memory-bound kernels


def _timer(device) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of ``fn`` over ``iters`` runs (CUDA events on GPU, wall clock otherwise)."""
    import torch

    def run(fn: Callable[[], object], iters: int) -> float:
        fn()  # compile / warm up
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return run


def copy_bandwidth(device, gib: float = 2.0, iters: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` over a ``gib`` GiB tensor (bytes read + written ÷ time)."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = _timer(device)(lambda: dst.copy_(src), iters)
    return 2 * n * 2 / seconds


def bench_mla(device, interpret: bool) -> dict:
    """Achieved GB/s of the Triton MLA decode kernel against the device's copy bandwidth.

    DeepSeek-V3 shapes (C = 512, R = 64, 128 heads on one attention rank, bf16 cache, block size
    64): for each (batch, context), the kernel's time over bytes it must read — every sequence's
    latent (C + R values per token) plus the absorbed queries — and the output it writes.
    """
    import torch

    from attention.triton_mla import mla_decode

    if interpret:
        heads, C, R, block_size, dtype = 4, 32, 16, 16, torch.float32
        shapes, iters, gib = [(2, 40), (3, 100)], 2, 0.01
    else:
        heads, C, R, block_size, dtype = 128, 512, 64, 64, torch.bfloat16
        shapes, iters, gib = [(1, 4096), (16, 4096), (64, 4096), (128, 2048), (32, 32768)], 20, 2.0
    bandwidth = copy_bandwidth(device, gib, iters=3 if interpret else 10)
    timer = _timer(device)
    scale, rows = (C + R) ** -0.5, []
    for batch, context in shapes:
        blocks_per_seq = -(-context // block_size)
        gen = torch.Generator(device="cpu").manual_seed(0)
        cache = torch.randn(batch * blocks_per_seq * block_size, C + R, generator=gen).to(dtype).to(device)
        tables = torch.randperm(batch * blocks_per_seq, generator=gen).view(batch, blocks_per_seq).to(device)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, C + R, generator=gen).to(dtype).to(device)
        args = (q, cache, tables, lens, block_size, C, scale)
        seconds = timer(lambda args=args: mla_decode(*args), iters)
        size = cache.element_size()
        moved = batch * context * (C + R) * size + q.numel() * size + batch * heads * C * size + tables.numel() * 4
        achieved = moved / seconds
        row = {}
        if batch * context <= 64 * 2048:  # checked against a plain torch gather on the smaller shapes
            slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)[:, :context]
            latent = cache[slots].float()  # [batch, context, C + R]
            probs = (torch.bmm(q.float(), latent.transpose(1, 2)) * scale).softmax(-1)
            ref = torch.bmm(probs, latent[..., :C])
            row["max_abs_err_vs_torch_fp32"] = (mla_decode(*args).float() - ref).abs().max().item()
        rows.append(
            {
                **row,
                "batch": batch,
                "context": context,
                "us": seconds * 1e6,
                "gb_per_s": achieved / 1e9,
                "fraction_of_copy_bandwidth": achieved / bandwidth,
            }
        )
    best = max(r["fraction_of_copy_bandwidth"] for r in rows)
    return {
        "kernel": "mla",
        "shape": {"heads": heads, "kv_lora_rank": C, "qk_rope_head_dim": R, "block_size": block_size},
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "results": rows,
        "target_fraction": TARGET_FRACTION,
        "best_fraction": best,
        "meets_target": None if interpret else best >= TARGET_FRACTION,
    }


# ---------------------------------------------------------------------------------------------
# bench_moe / bench_fp8: the Triton fused MoE and the FP8 GEMM (issue 14, part B).
# ---------------------------------------------------------------------------------------------


def _moe_rows(tokens: int, top_k: int, num_slots: int, dim: int, dtype, device, seed: int = 0):
    """``tokens`` tokens' ``top_k`` distinct experts drawn uniformly: the (token, k) rows sorted by slot
    (what the exchange hands an expert rank) and the counts per slot."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.rand(tokens, num_slots, generator=gen).argsort(dim=1)[:, :top_k]  # [T, K]
    counts = torch.bincount(ids.reshape(-1), minlength=num_slots).tolist()
    rows = torch.randn(tokens * top_k, dim, generator=gen).to(dtype).to(device)
    return rows, counts, ids.to(device)


def _fp8_shard(shard, block: tuple[int, int]):
    """``shard``'s experts block-quantised to FP8 and held as such (what ``fp8_weights="keep"`` loads)."""
    import torch

    from dsray.fp8 import quantize_fp8_blocks
    from experts import triton_moe
    from experts.shard import ExpertShard

    inter = shard.inter_dim
    w13, s13, w2, s2 = [], [], [], []
    for e in range(shard.num_local_experts):
        gate, up = quantize_fp8_blocks(shard.w13[e, :inter], block), quantize_fp8_blocks(shard.w13[e, inter:], block)
        down = quantize_fp8_blocks(shard.w2[e], block)
        w13.append(torch.cat([gate[0], up[0]]))
        s13.append(torch.cat([gate[1], up[1]]))
        w2.append(down[0])
        s2.append(down[1])
    fp8 = ExpertShard(range(shard.num_local_experts), shard.w13.shape[2], inter, "triton")
    fp8.hold_fp8(torch.stack(w13), torch.stack(w2), triton_moe.Fp8Scales(torch.stack(s13), torch.stack(s2), block))
    return fp8


def bench_moe(device, interpret: bool) -> dict:
    """TFLOP/s of the Triton fused MoE against the torch grouped path, on one expert rank's slots.

    DeepSeek-V3 shapes (D = 7168, I = 2048, top-8 of 256 experts) with 32 local slots (256 experts over
    8 expert ranks) in bf16: for each token count, ``ExpertShard.run_sorted`` on the rows sorted by
    slot — the exchange's entry point — in ``triton`` mode and in ``grouped`` mode (one matmul pair per
    slot), the same in ``triton`` mode with the experts in FP8 (128×128 block scales, as
    ``fp8_weights="keep"`` holds them), and ``fused_moe`` (sort, both kernels, routing weights, sum
    over k) on the tokens.
    FLOPs: 6·rows·D·I (gate and up, 2·D·2I per row; down, 2·I·D).
    """
    import torch

    from experts import triton_moe
    from experts.shard import ExpertShard

    if interpret:
        slots, dim, inter, top_k, dtype = 4, 64, 32, 2, torch.float32
        token_counts, iters = [4, 9], 1
    else:
        slots, dim, inter, top_k, dtype = 32, 7168, 2048, 8, torch.bfloat16
        # Rows per rank = tokens · 8 / 8 ranks on average; top-8 of 32 here gives the same rows per slot.
        token_counts, iters = [1, 16, 128, 512, 2048, 8192], 10
    gen = torch.Generator(device="cpu").manual_seed(0)
    grouped = ExpertShard(range(slots), dim, inter, "grouped")
    grouped.w13.data = (torch.randn(slots, 2 * inter, dim, generator=gen) * dim**-0.5).to(dtype)
    grouped.w2.data = (torch.randn(slots, dim, inter, generator=gen) * inter**-0.5).to(dtype)
    grouped = grouped.to(device)
    fused = ExpertShard(range(slots), dim, inter, "triton")
    fused.w13, fused.w2 = grouped.w13, grouped.w2  # the same weights
    with torch.inference_mode():
        fp8 = _fp8_shard(grouped, (16, 32) if interpret else (128, 128))
    timer, rows_out = _timer(device), []
    for tokens in token_counts:
        rows, counts, ids = _moe_rows(tokens, top_k, slots, dim, dtype, device, seed=tokens)
        weights = torch.rand(ids.shape, device=device)
        flops = 6 * rows.shape[0] * dim * inter
        with torch.inference_mode():
            err = (fused.run_sorted(rows, counts).float() - grouped.run_sorted(rows, counts).float()).abs().max()
            scale = grouped.run_sorted(rows, counts).float().abs().max()
            t_triton = timer(lambda rows=rows, counts=counts: fused.run_sorted(rows, counts), iters)
            t_grouped = timer(lambda rows=rows, counts=counts: grouped.run_sorted(rows, counts), iters)
            x = rows[:tokens]
            t_fused = timer(lambda x=x, ids=ids, w=weights: triton_moe.fused_moe(x, ids, w, fused.w13, fused.w2), iters)
            fp8_err = (fp8.run_sorted(rows, counts).float() - grouped.run_sorted(rows, counts).float()).abs().max()
            t_fp8 = timer(lambda rows=rows, counts=counts: fp8.run_sorted(rows, counts), iters)
        rows_out.append(
            {
                "tokens": tokens,
                "rows": rows.shape[0],
                "triton_us": t_triton * 1e6,
                "grouped_us": t_grouped * 1e6,
                "fused_moe_us": t_fused * 1e6,
                "triton_fp8_us": t_fp8 * 1e6,
                "triton_tflops": flops / t_triton / 1e12,
                "grouped_tflops": flops / t_grouped / 1e12,
                "fused_moe_tflops": flops / t_fused / 1e12,
                "triton_fp8_tflops": flops / t_fp8 / 1e12,
                "speedup": t_grouped / t_triton,
                "max_rel_err_vs_grouped": (err / scale).item(),
                "fp8_max_rel_err_vs_grouped": (fp8_err / scale).item(),  # quantisation error included
            }
        )
    return {
        "kernel": "moe",
        "shape": {"local_slots": slots, "hidden": dim, "inter": inter, "top_k": top_k},
        "dtype": str(dtype).removeprefix("torch."),
        "results": rows_out,
    }


def bench_fp8(device, interpret: bool) -> dict:
    """TFLOP/s of the FP8 block-scaled GEMM (weight-only FP8, bf16 activations) against a bf16 torch
    matmul of the dequantised weight, on DeepSeek-V3's FP8 linear shapes (128×128 blocks).
    FLOPs: 2·M·N·K."""
    import torch
    import torch.nn.functional as F

    from dsray import fp8_gemm
    from dsray.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

    if interpret:
        block, dtype, iters = (16, 32), torch.float32, 1
        shapes = {"tiny": (48, 64)}
        row_counts = [1, 5]
    else:
        block, dtype, iters = (128, 128), torch.bfloat16, 20
        shapes = {  # name: (out, in)
            "q_a_proj": (1536, 7168),
            "q_b_proj": (24576, 1536),
            "o_proj": (7168, 16384),
            "mlp.gate_proj": (18432, 7168),
            "mlp.down_proj": (7168, 18432),
        }
        row_counts = [1, 16, 128, 1024, 4096]
    timer, results = _timer(device), []
    for name, (n, k) in shapes.items():
        gen = torch.Generator(device="cpu").manual_seed(n + k)
        weight, scale_inv = quantize_fp8_blocks(torch.randn(n, k, generator=gen) * k**-0.5, block)
        weight, scale_inv = weight.to(device), scale_inv.to(device)
        dense = dequantize_fp8_blocks(weight, scale_inv, block, dtype)
        for m in row_counts:
            x = torch.randn(m, k, generator=gen).to(dtype).to(device)
            want = F.linear(x.float(), dense.float())
            err = (fp8_gemm.fp8_linear(x, weight, scale_inv, block).float() - want).abs().max() / want.abs().max()
            t_fp8 = timer(lambda x=x, w=weight, s=scale_inv: fp8_gemm.fp8_linear(x, w, s, block), iters)
            t_dense = timer(lambda x=x, w=dense: F.linear(x, w), iters)
            flops = 2 * m * n * k
            results.append(
                {
                    "linear": name,
                    "m": m,
                    "n": n,
                    "k": k,
                    "fp8_us": t_fp8 * 1e6,
                    "bf16_us": t_dense * 1e6,
                    "fp8_tflops": flops / t_fp8 / 1e12,
                    "bf16_tflops": flops / t_dense / 1e12,
                    "speedup": t_dense / t_fp8,
                    "max_rel_err": err.item(),
                }
            )
    return {
        "kernel": "fp8",
        "block_size": list(block),
        "dtype": str(dtype).removeprefix("torch."),
        "results": results,
    }


KERNELS = {"mla": bench_mla, "moe": bench_moe, "fp8": bench_fp8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=[*KERNELS, "all"], default="all")
    parser.add_argument(
        "--interpret", action="store_true", help="no GPU: tiny shapes on CPU under TRITON_INTERPRET=1 (smoke check)"
    )
    parser.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything
    import torch

    if args.interpret:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py needs CUDA (no GPU visible to torch here); "
            "pass --interpret for a CPU smoke check of the kernels under TRITON_INTERPRET=1",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device(args.device)
    names = list(KERNELS) if args.kernel == "all" else [args.kernel]
    report = {
        "benchmark": "kernels",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "results": {name: KERNELS[name](device, args.interpret) for name in names},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
