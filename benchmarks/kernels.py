"""The GPU kernels alone, against what the device's memory can do: one function per kernel.

* ``mla`` — the Triton MLA decode kernel (``attention/triton_mla.py``) over a paged latent cache:
  achieved GB/s (bytes of latent cache and absorbed query it must read ÷ kernel time) against the
  device's copy bandwidth (a large tensor copy on the same device, read + write bytes ÷ time).
  Decode attention is memory bound, so the target is ≥ 85 % of that bandwidth.
* ``moe`` — the Triton fused MoE (``expert_mode="triton"``).
* ``fp8`` — the FP8 block-scaled Triton GEMM.

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
# bench_moe / bench_fp8: filled in by the Triton fused-MoE / FP8 GEMM work (issue 14, part B).
# ---------------------------------------------------------------------------------------------


def bench_moe(device, interpret: bool) -> dict:
    """The Triton fused MoE (``expert_mode="triton"``). Not written yet (issue 14, part B)."""
    return {"kernel": "moe", "skipped": "not written yet (issue 14, part B)"}


def bench_fp8(device, interpret: bool) -> dict:
    """The FP8 block-scaled Triton GEMM. Not written yet (issue 14, part B)."""
    return {"kernel": "fp8", "skipped": "not written yet (issue 14, part B)"}


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
