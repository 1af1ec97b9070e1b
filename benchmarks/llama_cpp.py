"""dsray against llama.cpp on CPU, in one run: same checkpoint (llama.cpp gets it as GGUF bf16), same
thread count, same workloads (issue 15: ahead of llama.cpp at every batch size).

The peer is ``../shared/peers/llama_cpp.sh`` (``--peer-script``; it builds llama.cpp once, converts the
checkpoint once, runs ``llama-bench`` and ``llama-batched-bench`` with ``--threads`` and prints JSON
lines). dsray's side drives ``LLM.engine`` step by step in this process (local executor,
``torch.set_num_threads(--threads)``) on the workloads the peer reports having run:

  prefill P    one P-token prompt (``--prompt-lens``, of the peer's 128,512), batch 1: P ÷ the time
               of the prefill step alone (llama-bench ``pp``);
  tg128        batch 1 decode from an empty context: 128 decode steps, 128 ÷ their time
               (llama-bench ``tg128``; ours: a 1-token prompt, then the 128 steps after it);
  decode B     B sequences with 32-token prompts, 128 new tokens each (greedy, ignore_eos):
               B × 128 ÷ the time of the 128 decode steps after the prefill (``--batches``;
               llama-batched-bench's ``speed_tg``; its ``speed_pp`` is kept as ``peer_prefill_tok_s``).

This machine's memory bandwidth drifts (30-80 GB/s within minutes), so the sides alternate by whole
passes, ABBA: llama.cpp, dsray, then dsray, llama.cpp, ... (``--repeats`` passes each). For each
test the report gives both sides' fastest pass and the ratio dsray ÷ llama.cpp, the ratio of each
round's adjacent pair, every run with its timestamp, and the issue's target where it sets one
(decode ≥ 1.0× at batch 1 and 16, ≥ 1.5× at 64; prefill ≥ 1.5×). Each pass records when it ran and
the 1-minute load average at its start and end (a pass adds about ``--threads``; more is others' work).

``--serve`` (``llama_cpp_serve.py``): served throughput instead, ``dsray serve`` (``launch.start``, as
benchmarks/serve.py starts it) against ``llama-server`` (``--server``, slots = the most clients) — one server up at a
time, ABBA over ``--repeats``. At each client count C (``--clients``), C closed-loop streaming clients
send ``--num-prompts`` (default max(32, 2C)) text prompts of 24 words to ``/v1/completions``, each
streaming exactly ``--output-len`` tokens (temperature 0, ignore_eos): benchmarks/serve.py's client
(``run_serving``, a new connection per request) against both URLs, the same prompts. Output tok/s,
ratio dsray ÷ llama-server (target ≥ 1.0 at every C), and the prompt tokens each side's tokenizer
made of the first prompt. llama-server takes ``$(nproc)`` threads: it runs on the first
``--threads`` CPUs of this process's affinity.

    python benchmarks/llama_cpp.py                                  # small model, 2 threads, ~10 min
    python benchmarks/llama_cpp.py --serve                          # clients 1,16,64,256, ~25 min
    python benchmarks/llama_cpp.py --batches 1,16 --repeats 1       # quicker
    python benchmarks/llama_cpp.py --serve --clients 1,16 --num-prompts 16 --repeats 1

Prints one JSON object (and writes it to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# isort: off
import dsray  # noqa: F401  first, so torch's OpenMP threads load with dsray's short spin (dsray/__init__.py)

# isort: on
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsray import LLM, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEER_SCRIPT = "../shared/peers/llama_cpp.sh"
PEER = "llama.cpp"
# The targets, dsray ÷ llama.cpp.
PREFILL_TARGET = 1.5
DECODE_TARGETS = {1: 1.0, 16: 1.0, 64: 1.5}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log(message: str) -> None:
    print(f"[{now()}] {message}", file=sys.stderr, flush=True)


def peer_script(path: str) -> Path:
    script = Path(path) if Path(path).is_absolute() else REPO / path
    if not script.is_file():
        raise SystemExit(
            f"llama_cpp.py: no peer script at {script}: pass --peer-script (the llama.cpp runner, "
            f"{DEFAULT_PEER_SCRIPT} beside this repository by default)"
        )
    return script


# llama.cpp's side ---------------------------------------------------------------------------------


def run_peer(script: Path, model: str, threads: int, batches: list[int]) -> dict[str, dict]:
    """One pass of the peer script: every test it printed, keyed like ``ours_pass``'s."""
    cmd = ["bash", str(script), model, str(threads), ",".join(map(str, batches))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its JSON lines as they come
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr: build/convert logs pass on
    runs: dict[str, dict] = {}
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r["test"] == "decode":  # llama-batched-bench
            key = f"decode {r['batch']}"
            runs[key] = {
                "tok_s": r["decode_tok_s"],
                "peer_prefill_tok_s": r["prefill_tok_s"],
                "batch": r["batch"],
                "prompt_tokens": r["prompt_tokens"],
                "new_tokens": r["new_tokens"],
            }
        elif r["prompt_tokens"]:  # llama-bench pp
            key = f"prefill {r['prompt_tokens']}"
            runs[key] = {"tok_s": r["tok_s"], "batch": 1, "prompt_tokens": r["prompt_tokens"], "new_tokens": 0}
        else:  # llama-bench tg
            key = f"tg{r['new_tokens']}"
            runs[key] = {"tok_s": r["tok_s"], "batch": 1, "prompt_tokens": 0, "new_tokens": r["new_tokens"]}
        runs[key]["at"] = now()
    if proc.wait() != 0:
        raise SystemExit(f"llama_cpp.py: the peer script failed (exit {proc.returncode}): {' '.join(cmd)}")
    if not runs:
        raise SystemExit(f"llama_cpp.py: the peer script printed no measurement: {' '.join(cmd)}")
    return runs


# dsray's side ---------------------------------------------------------------------------------------


def _prompts(rng: random.Random, vocab: int, batch: int, length: int) -> list[list[int]]:
    # Fresh random ids every run (one generator for the whole run): no prefix-cache hits across runs.
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(batch)]


def ours_prefill(llm: LLM, rng: random.Random, prompt_len: int) -> dict:
    """One ``prompt_len``-token prompt, one new token: prompt tokens ÷ the time until that token."""
    engine = llm.engine
    engine.add_request(
        _prompts(rng, engine.args.vocab_size, 1, prompt_len)[0],
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    )
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return {"tok_s": prompt_len / (time.perf_counter() - start)}


def ours_decode(llm: LLM, rng: random.Random, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """``batch`` prompts of ``prompt_len`` tokens, each then decoding ``new_tokens`` more after the token its
    prefill samples: tokens ÷ the time of the steps after every sequence has its first token."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)
    for prompt in _prompts(rng, engine.args.vocab_size, batch, max(1, prompt_len)):
        engine.add_request(prompt, params)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    prefill_end = at_prefill_end = None
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
        if prefill_end is None and len(counts) == batch:
            prefill_end, at_prefill_end = time.perf_counter(), sum(counts.values())
    decode_s = time.perf_counter() - prefill_end
    tokens = sum(counts.values()) - at_prefill_end
    return {"tok_s": tokens / decode_s, "decode_tokens": tokens, "prefill_s": prefill_end - start}


def ours_pass(llm: LLM, rng: random.Random, tests: dict[str, dict]) -> dict[str, dict]:
    """Every test in ``tests`` (the peer's workloads), in the peer's order."""
    runs = {}
    for key, w in tests.items():
        if key.startswith("prefill"):
            run = ours_prefill(llm, rng, w["prompt_tokens"])
        else:
            run = ours_decode(llm, rng, w["batch"], w["prompt_tokens"], w["new_tokens"])
        runs[key] = run | {"at": now()}
    return runs


# The comparison -------------------------------------------------------------------------------------


def _order(repeats: int) -> list[str]:
    """ABBA: the peer first in even rounds, dsray first in odd ones (linear drift cancels over a pair)."""
    return [side for r in range(repeats) for side in ((PEER, "dsray") if r % 2 == 0 else ("dsray", PEER))]


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _workload(key: str, w: dict) -> str:
    if key.startswith("prefill"):
        return f"one {w['prompt_tokens']}-token prompt, batch 1: prefill tok/s (llama-bench pp{w['prompt_tokens']})"
    if key.startswith("tg"):
        return f"batch 1 from an empty context: {w['new_tokens']} decode steps (llama-bench tg{w['new_tokens']})"
    return (
        f"{w['batch']} sequence(s), {w['prompt_tokens']}-token prompts, {w['new_tokens']} new tokens each: "
        "decode tok/s after the prefill (llama-batched-bench speed_tg)"
    )


def _target(key: str, w: dict) -> float | None:
    if key.startswith("prefill"):
        return PREFILL_TARGET
    return DECODE_TARGETS.get(w["batch"])


def bench_main(args) -> dict:
    script = peer_script(args.peer_script)
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device="cpu", num_threads=args.threads)
    rng = random.Random(0)
    report: dict[str, Any] = {
        "benchmark": "llama_cpp",
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "peer": {"name": PEER, "script": str(script), "weights": "GGUF bf16 of the same checkpoint"},
        "started_at": now(),
        "passes": [],
    }
    peer_runs: list[dict[str, dict]] = []
    our_runs: list[dict[str, dict]] = []
    tests: dict[str, dict] = {}
    for side in _order(args.repeats):
        # The 1-min load average at its start and end (the pass itself adds about --threads): others' work.
        started, load = now(), [round(os.getloadavg()[0], 2)]
        log(f"{side} pass {len(peer_runs if side == PEER else our_runs) + 1}/{args.repeats}")
        if side == PEER:
            runs = run_peer(script, args.model, args.threads, args.batches)
            if not tests:  # the workloads, from the peer's first pass (always the first pass)
                tests = {k: w for k, w in runs.items() if not k.startswith("prefill")}
                tests |= {f"prefill {p}": runs[f"prefill {p}"] for p in args.prompt_lens if f"prefill {p}" in runs}
                missing = [p for p in args.prompt_lens if f"prefill {p}" not in runs]
                if missing:
                    raise SystemExit(f"llama_cpp.py: the peer script measured no prefill of {missing} tokens")
                order = list(runs)  # the peer's order, for ours too
                tests = {k: tests[k] for k in order if k in tests}
                log(f"warm-up: {', '.join(tests)}")
                ours_prefill(llm, rng, max(args.prompt_lens))
                ours_decode(llm, rng, max(args.batches), 32, 4)
            peer_runs.append({k: runs[k] for k in tests})
        else:
            our_runs.append(ours_pass(llm, rng, tests))
        report["passes"].append(
            {
                "side": side,
                "started_at": started,
                "ended_at": now(),
                "load_avg_1m": [*load, round(os.getloadavg()[0], 2)],
            }
        )
        latest = (peer_runs if side == PEER else our_runs)[-1]
        log("  " + ", ".join(f"{k}: {r['tok_s']:.1f} tok/s" for k, r in latest.items()))
    results = []
    for key, w in tests.items():
        ours = [r[key] for r in our_runs]
        peer = [r[key] for r in peer_runs]
        best_ours = max(r["tok_s"] for r in ours)
        best_peer = max(r["tok_s"] for r in peer)
        ratio = best_ours / best_peer
        target = _target(key, w)
        row = {
            "test": key,
            "workload": _workload(key, w),
            "batch": w["batch"],
            "prompt_tokens": w["prompt_tokens"],
            "new_tokens": w["new_tokens"],
            "dsray_tok_s": round(best_ours, 1),
            "llama_cpp_tok_s": round(best_peer, 1),
            "ratio": _round(ratio),
            "target": target,
            "meets_target": None if target is None else ratio >= target,
            "round_ratios": [_round(o["tok_s"] / p["tok_s"]) for o, p in zip(ours, peer)],
            "dsray_runs": [
                {k: _round(v, 1 if k == "tok_s" else 3) if isinstance(v, float) else v for k, v in r.items()}
                for r in ours
            ],
            "llama_cpp_runs": [{k: r[k] for k in ("tok_s", "peer_prefill_tok_s", "at") if k in r} for r in peer],
        }
        results.append(row)
    report["results"] = results
    report["finished_at"] = now()
    llm.shutdown()
    return report


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: the `small` bench model, made once)")
    parser.add_argument("--dtype", default="bfloat16", help="dsray's weights (llama.cpp's GGUF is bf16)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each side")
    parser.add_argument("--peer-script", default=DEFAULT_PEER_SCRIPT, help="llama.cpp runner, relative to the repo")
    parser.add_argument("--repeats", type=int, default=2, help="passes per side, alternating ABBA")
    parser.add_argument("--batches", type=_ints, default=[1, 16, 64], help="decode batch sizes")
    parser.add_argument(
        "--prompt-lens", type=_ints, default=[128, 512], help="prefill lengths (of the peer script's 128,512)"
    )
    parser.add_argument("--serve", action="store_true", help="served throughput: dsray serve vs llama-server")
    parser.add_argument("--clients", type=_ints, default=[1, 16, 64, 256], help="--serve: client counts")
    parser.add_argument("--num-prompts", type=int, default=None, help="--serve: requests per level (max(32, 2C))")
    parser.add_argument("--prompt-words", type=int, default=24, help="--serve: words per text prompt")
    parser.add_argument("--output-len", type=int, default=64, help="--serve: streamed tokens per request")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.model is None:
        from dsray.make_model import ensure_default_model

        args.model = str(ensure_default_model("small"))
    args.model = str(Path(args.model).expanduser().resolve())
    if args.serve:
        from llama_cpp_serve import serve_main  # the served comparison, its own module

        report = serve_main(args)
    else:
        report = bench_main(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
