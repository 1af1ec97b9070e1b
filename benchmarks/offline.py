"""Offline engine throughput: dsray's ``LLM`` vs Hugging Face transformers ``generate()``, same run.

Workloads:
  (a) batch 1: a 32-token prompt, 128 new tokens — decode tok/s, and as a fraction of the decode
      roofline (bytes a step reads ÷ step time, over the read bandwidth measured right before and
      after that run: this machine's bandwidth drifts between ~30 and ~80 GB/s over minutes);
  (b) 64 prompts of mixed lengths × 128 new tokens — output tok/s;
  (c) KV-cache bytes per token, measured from allocated caches (ours: the latent pools; HF: the
      tensors in its cache after generate).

    python benchmarks/offline.py                      # the `small` bench model, bf16
    python benchmarks/offline.py --only-batch1 --repeats 3   # quick: workload (a) only, best of 3
    python benchmarks/offline.py --executor ray --attention-workers 1 --expert-workers 2
    python benchmarks/offline.py --device cuda        # on a GPU: ours and HF both there; bandwidth of that GPU

With ``--executor ray`` it also reports where the batched run's time went and the *exposed*
exchange time (what the attention rank spends blocked in MoE exchanges, as a fraction of its
step time); ``--compare-local`` runs the local executor on the same prompts in the same run
(``--local-threads``, default 2) and gives the ratio; ``--overlap`` runs the Ray executor
with the engine's default overlaps, or with both overlaps (shared experts during the exchange, two
micro-batches) on or off (``all``: the three in one run; ``shared``: the shared experts overlapped
without micro-batches); ``--local-expert-share`` runs each of
those with attention workers that also hold that share of the experts; ``--shapes`` runs each for
several worker counts (``AxE``; ``2x0``: two attention workers that hold the experts themselves):

    python benchmarks/offline.py --executor ray --num-prompts 32 --skip-hf --compare-local --overlap all
    python benchmarks/offline.py --executor ray --num-prompts 32 --skip-hf --compare-local --overlap both \
        --local-expert-share 0 0.5 --rounds 6
    python benchmarks/offline.py --executor ray --num-prompts 32 --skip-hf --compare-local --overlap both \
        --shapes 1x1 2x0 --local-expert-share 0.5 --rounds 3

``--rounds N`` keeps every Ray configuration up at once and runs them in turn N times, so that the
machine's drift (its memory bandwidth moves by 2x within minutes) hits them alike; it reports each
one's median and the per-round ratios against the first (and, with ``--compare-local``, against the
local executor, run in every round).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

# isort: off
import dsray  # noqa: F401  first, so torch's OpenMP threads load with dsray's short spin (dsray/__init__.py)

# isort: on
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_decode import decode_step_bytes, read_bandwidth  # noqa: E402

from attention.kv_cache import cache_bytes_per_token  # noqa: E402
from dsray import LLM, SamplingParams  # noqa: E402
from dsray.engine_config import resolve_device  # noqa: E402


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randrange(16, 129))] for _ in range(n)]


def ours_decode_batch1(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.add_request(prompt, params)
    start = time.perf_counter()
    first = last = None
    while engine.has_unfinished():
        for _ in engine.step():
            last = time.perf_counter()
            first = first or last
    return {
        "ttft_s": first - start,
        "decode_tok_s": (new_tokens - 1) / (last - first),
        "step_s": (last - first) / (new_tokens - 1),
    }


def ours_batched(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num = sum(len(o.token_ids) for o in outs)
    return {"output_tok_s": num / elapsed, "seconds": elapsed, "tokens": num}


def device_read_bandwidth(device: torch.device) -> float:
    """Bytes/s a read of a large tensor achieves where the model runs (``read_bandwidth`` on CPU)."""
    if device.type != "cuda":
        return read_bandwidth(1.0, 3)
    big = torch.ones(2**30, dtype=torch.float32, device=device)  # 4 GiB
    big.sum()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        big.sum()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_decode_batch1(hf, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt], device=hf.device)
    times = {}
    for n in (1, new_tokens):
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(hf.device)
        times[n] = time.perf_counter() - start
    return {"decode_tok_s": (new_tokens - 1) / (times[new_tokens] - times[1]), "ttft_s": times[1]}


def hf_batched(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=hf.device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
        )
    _sync(hf.device)
    elapsed = time.perf_counter() - start
    cache = out.past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    tokens_cached = len(prompts) * (out.sequences.shape[1] - 1)
    return {
        "output_tok_s": len(prompts) * new_tokens / elapsed,
        "seconds": elapsed,
        "kv_bytes_per_token": cache_bytes / tokens_cached if tokens_cached else None,
    }


def _cache_tensors(cache) -> list[torch.Tensor]:
    tensors = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return tensors


def step_breakdown(before: dict, after: dict, wall: float) -> dict:
    """Where the batched run's wall time went on the Ray executor (seconds, per attention rank)."""

    def delta(role: str, key: str) -> float:
        values = [a[key] - b[key] for a, b in zip(after[role], before[role])]
        return sum(values) / len(values)

    attention_step = delta("attention", "step_seconds")
    exchange = delta("attention", "exchange_seconds")
    # Without expert workers (E=0) the attention workers compute the experts: their local_expert_seconds.
    where = ("expert", "compute_seconds") if after["expert"] else ("attention", "local_expert_seconds")
    expert_compute = delta(*where)
    return {
        "wall_s": wall,
        "attention_step_s": attention_step,
        "attention_compute_s": attention_step - exchange,
        "expert_compute_s": expert_compute,
        "attention_local_experts_s": delta("attention", "local_expert_seconds"),
        "exposed_exchange_s": exchange,
        "exposed_exchange_fraction_of_step": exchange / attention_step if attention_step else None,
        "ray_and_engine_overhead_s": wall - attention_step,
    }


Config = tuple[tuple[int, int], bool | str | None, float]  # ((A, E), overlap, local_expert_share)


def _overlaps(overlap: bool | str | None) -> dict:
    """Engine settings of an ``--overlap`` run: None the defaults, True/False both overlaps on/off,
    ``"shared"`` the shared experts during the exchange without micro-batches."""
    if overlap == "shared":
        return {"overlap_shared_experts": True, "micro_batch_overlap": False}
    return {} if overlap is None else {"overlap_shared_experts": overlap, "micro_batch_overlap": overlap}


def ray_llm(args, shape: tuple[int, int], overlap: bool | str | None, share: float) -> LLM:
    """A Ray-executor ``LLM`` for one configuration, one thread per worker: ``shape`` (A attention, E expert
    workers; E=0: the attention workers hold the experts), ``share``: ``local_expert_share`` (experts the
    attention workers compute themselves)."""
    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        executor="ray",
        num_attention_workers=shape[0],
        num_expert_workers=shape[1],
        local_expert_share=share,
        **_overlaps(overlap),
    )


def ray_batched(
    args, prompts: list[list[int]], shape: tuple[int, int], overlap: bool | str | None, share: float
) -> dict:
    """The batched workload on the Ray executor (one thread per worker), with its time breakdown."""
    with ray_llm(args, shape, overlap, share) as llm:
        ours_batched(llm, prompts[:2], 4)  # warm-up
        before = llm.engine.executor.timings()
        out = ours_batched(llm, prompts, args.new_tokens)
        out["breakdown"] = step_breakdown(before, llm.engine.executor.timings(), out["seconds"])
        out |= {"workers": shape, "overlap": overlap, "local_expert_share": share}
    return out


def ray_alternating(args, prompts: list[list[int]], configs: list[Config]) -> dict:
    """Every configuration's ``LLM`` alive at once (idle ones take no CPU), each running the batched
    workload in turn, ``--rounds`` times (with ``--compare-local``, the local executor too, in a fresh
    process each round): the machine's drift hits them alike, and the per-round ratios against the first
    configuration (and the local executor) compare them. Each gets its median, every round and its
    summed time breakdown."""
    import ray

    if not ray.is_initialized():  # a logical CPU per worker of every configuration: one thread each
        ray.init(num_cpus=sum(sum(c[0]) for c in configs), include_dashboard=False)
    llms = [ray_llm(args, *c) for c in configs]
    try:
        for llm in llms:
            ours_batched(llm, prompts[:2], 4)  # warm-up
        before = [llm.engine.executor.timings() for llm in llms]
        rounds: list[list[dict]] = [[] for _ in configs]
        local: list[dict] = []
        for _ in range(args.rounds):
            if args.compare_local:
                local.append(local_batched(args, prompts))
            for i, llm in enumerate(llms):
                rounds[i].append(ours_batched(llm, prompts, args.new_tokens))
        out: dict = {}
        if local:
            out["local"] = {
                "output_tok_s": statistics.median(r["output_tok_s"] for r in local),
                "rounds_tok_s": [r["output_tok_s"] for r in local],
                "threads": args.local_threads,
            }
        for i, (c, llm) in enumerate(zip(configs, llms)):
            tok_s = [r["output_tok_s"] for r in rounds[i]]
            seconds = sum(r["seconds"] for r in rounds[i])
            paired = [r["output_tok_s"] / first["output_tok_s"] for r, first in zip(rounds[i], rounds[0])]
            out[_name(*c)] = {
                "output_tok_s": statistics.median(tok_s),
                "rounds_tok_s": tok_s,
                f"paired_vs_{_name(*configs[0])}": {"median": statistics.median(paired), "rounds": paired},
                "breakdown": step_breakdown(before[i], llm.engine.executor.timings(), seconds),
                **(
                    {
                        "paired_vs_local": statistics.median(
                            r["output_tok_s"] / m["output_tok_s"] for r, m in zip(rounds[i], local)
                        )
                    }
                    if local
                    else {}
                ),
                "workers": c[0],
                "overlap": c[1],
                "local_expert_share": c[2],
            }
        return out
    finally:
        for llm in llms:
            llm.shutdown()


def _local_child(model: str, dtype: str, device: str, threads: int, prompts, new_tokens: int, queue) -> None:
    torch.set_num_threads(threads)
    llm = LLM(model, dtype=dtype, device=device)
    ours_batched(llm, prompts[:2], 4)  # warm-up
    queue.put(ours_batched(llm, prompts, new_tokens))


def local_batched(args, prompts: list[list[int]]) -> dict:
    """The same workload on the local executor with ``--local-threads`` threads, in a fresh process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child_args = (args.model, args.dtype, args.device, args.local_threads, prompts, args.new_tokens, queue)
    child = ctx.Process(target=_local_child, args=child_args)
    child.start()
    result = queue.get(timeout=3600)
    child.join()
    result["threads"] = args.local_threads
    return result


def _name(shape: tuple[int, int], overlap: bool | str | None, share: float) -> str:
    label = overlap if isinstance(overlap, str) else "default" if overlap is None else "on" if overlap else "off"
    name = f"ray_{shape[0]}x{shape[1]}_overlap_{label}"
    return name + (f"_local_experts_{share:g}" if share else "")


def ray_report(args) -> dict:
    """Ray executor (with and/or without overlap) against the local executor on the same prompts."""
    from dsray.config import ModelArgs

    prompts = make_prompts(args.num_prompts, ModelArgs.from_pretrained(args.model).vocab_size)
    report: dict = {
        "benchmark": "offline-ray",
        "model": args.model,
        "dtype": args.dtype,
        "workload": f"{args.num_prompts} prompts of 16-128 tokens x {args.new_tokens} new tokens",
        "workers_attention_x_expert": [f"{a}x{e}" for a, e in args.shapes],
        "threads_per_worker": 1,
    }
    runs = {
        "default": [None],
        "on": [True],
        "off": [False],
        "shared": ["shared"],
        "both": [False, True],
        "all": [False, None, True],
    }[args.overlap]
    configs = list(
        dict.fromkeys(  # without expert workers the attention workers hold every expert: share 0 (once)
            (shape, overlap, share if shape[1] else 0.0)
            for shape in args.shapes
            for share in args.local_expert_share
            for overlap in runs
        )
    )
    if args.rounds > 1:  # the local executor runs in every round (paired_vs_local)
        report |= ray_alternating(args, prompts, configs)
        return report
    if args.compare_local:
        report["local_before"] = local_batched(args, prompts)
    for c in configs:
        report[_name(*c)] = ray_batched(args, prompts, *c)
    if args.compare_local:
        report["local_after"] = local_batched(args, prompts)
        local = (report["local_before"]["output_tok_s"] + report["local_after"]["output_tok_s"]) / 2
        report["ratios_vs_local"] = {_name(*c): report[_name(*c)]["output_tok_s"] / local for c in configs}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: the `small` bench model, made once)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (EngineConfig.device); HF too")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--attention-workers", type=int, default=1)
    parser.add_argument("--expert-workers", type=int, default=1, help="0: the attention workers hold the experts")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="ray: worker shapes to run as AxE (attention x expert workers), e.g. 1x1 2x0; default: the two above",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--only-batch1", action="store_true", help="only the batch-1 decode and its roofline (no batched run, no HF)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="batch-1 runs; the fastest counts (shared machines)")
    parser.add_argument("--compare-local", action="store_true", help="ray: also run the local executor, same run")
    parser.add_argument("--local-threads", type=int, default=2, help="threads of the local executor compared")
    parser.add_argument(
        "--overlap",
        default="default",
        choices=["default", "on", "off", "shared", "both", "all"],
        help="ray: the engine's default overlaps, both overlaps on, both off, off and on, or all three",
    )
    parser.add_argument(
        "--local-expert-share",
        type=float,
        nargs="+",
        default=[0.0],
        help="ray: local_expert_share values to run (experts the attention workers also hold), e.g. 0 0.5",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="ray: keep every configuration up and run them in turn this many times (medians, per-round ratios)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        shapes = args.shapes or [f"{args.attention_workers}x{args.expert_workers}"]
        args.shapes = [tuple(int(n) for n in shape.split("x")) for shape in shapes]
        if any(len(shape) != 2 for shape in args.shapes):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes: give each as AxE, e.g. 1x1 2x0; got {args.shapes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from dsray.make_model import ensure_default_model

        args.model = str(ensure_default_model("small"))
    if args.executor == "ray" and args.skip_hf:
        text = json.dumps(ray_report(args), indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    engine_args = dict(dtype=args.dtype, device=args.device, executor=args.executor)
    if args.executor == "ray":
        engine_args |= dict(num_attention_workers=args.attention_workers, num_expert_workers=args.expert_workers)
    llm = LLM(args.model, **engine_args)
    device = resolve_device(args.device) if args.executor == "local" else torch.device("cpu")
    vocab = llm.engine.args.vocab_size
    prompt = [random.Random(1).randrange(4, vocab) for _ in range(32)]
    prompts = make_prompts(args.num_prompts, vocab)
    report: dict = {
        "benchmark": "offline",
        "model": args.model,
        "dtype": args.dtype,
        "device": str(device),
        "executor": args.executor,
        "threads": torch.get_num_threads(),
    }
    ours_decode_batch1(llm, prompt, 8)  # warm-up
    # This machine's memory bandwidth drifts (a VM: ~30 to ~80 GB/s over minutes), so each run is
    # bracketed by bandwidth readings and judged against the mean of its own two.
    runs = []
    for _ in range(args.repeats):
        before_bw = device_read_bandwidth(device)
        run = ours_decode_batch1(llm, prompt, args.new_tokens)
        run["read_bandwidth_gb_s"] = (before_bw + device_read_bandwidth(device)) / 2 / 1e9
        runs.append(run)
    report["ours_batch1"] = min(runs, key=lambda r: r["step_s"])
    report["ours_batch1"]["all_step_s"] = [r["step_s"] for r in runs]
    before = llm.engine.executor.timings() if args.executor == "ray" else None
    if not args.only_batch1:
        report["ours_batched"] = ours_batched(llm, prompts, args.new_tokens)
    if before is not None and not args.only_batch1:
        report["ray_step_breakdown"] = step_breakdown(
            before, llm.engine.executor.timings(), report["ours_batched"]["seconds"]
        )
    if args.executor == "local":
        runner = llm.engine.executor.runner
        report["ours_kv_bytes_per_token"] = cache_bytes_per_token(runner.kv_cache)
        step_bytes = decode_step_bytes(runner.model, context_len=32 + args.new_tokens // 2)
        fractions = [step_bytes["total"] / r["step_s"] / 1e9 / r["read_bandwidth_gb_s"] for r in runs]
        best = report["ours_batch1"]
        report["roofline"] = {
            "bytes_per_step": step_bytes,
            "read_bandwidth_gb_s": best["read_bandwidth_gb_s"],  # around the fastest run
            "achieved_gb_s": step_bytes["total"] / best["step_s"] / 1e9,
            "fraction": step_bytes["total"] / best["step_s"] / 1e9 / best["read_bandwidth_gb_s"],
            "all_fractions": fractions,
            "all_read_bandwidth_gb_s": [r["read_bandwidth_gb_s"] for r in runs],
        }
    if not (args.skip_hf or args.only_batch1):
        from transformers import AutoModelForCausalLM

        del llm
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
        hf_decode_batch1(hf, prompt, 8)  # warm-up
        report["hf_batch1"] = hf_decode_batch1(hf, prompt, args.new_tokens)
        report["hf_batched"] = hf_batched(hf, prompts, args.new_tokens, pad_id=1)
        report["ratios"] = {
            "batch1_decode": report["ours_batch1"]["decode_tok_s"] / report["hf_batch1"]["decode_tok_s"],
            "batched_output": report["ours_batched"]["output_tok_s"] / report["hf_batched"]["output_tok_s"],
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
