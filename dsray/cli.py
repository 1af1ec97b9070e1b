"""The ``dsray`` command: make-model, generate, serve, eplb."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dsray import eplb_cli

DEFAULT_PROMPTS = [
    "The weather today is",
    "Inference on many machines works best when",
    "A good recipe for bread starts with",
]


def _generate(args: argparse.Namespace) -> int:
    from dsray import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    prompts = args.prompt or DEFAULT_PROMPTS
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(
                json.dumps(
                    {"prompt": prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
                )
            )
        else:
            print(f"--- {prompt!r}\n{out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    num = sum(len(o.token_ids) for o in outputs)
    print(f"dsray: {num} tokens in {elapsed:.2f}s ({num / elapsed:.1f} tok/s) on {llm.config.model}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    # deploy/ owns everything Serve; imported here so `generate` never pays for Ray Serve.
    from pydantic import ValidationError

    from deploy.config import DsrayServeArgs
    from deploy.launch import serve_forever
    from dsray import envs
    from dsray.engine_config import resolve_device

    engine = {"dtype": args.dtype, "device": args.device}
    for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_gb", "max_model_len", "num_threads"):
        if getattr(args, name) is not None:
            engine[name] = getattr(args, name)
    if args.redundant_experts:
        engine["num_redundant_experts"] = args.redundant_experts
    if args.local_expert_share:
        engine["local_expert_share"] = args.local_expert_share
    if args.eplb_interval_steps:
        engine["eplb_interval_steps"] = args.eplb_interval_steps
    if args.eplb_imbalance_threshold is not None:
        engine["eplb_imbalance_threshold"] = args.eplb_imbalance_threshold
    fields = dict(
        model=args.model,
        served_model_name=args.served_model_name,
        engine=engine,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        attention_workers=args.attention_workers,
        expert_workers=args.expert_workers,
    )
    if args.max_waiting_requests is not None:
        fields["max_waiting_requests"] = args.max_waiting_requests
    if args.max_request_body_bytes is not None:
        fields["max_request_body_bytes"] = args.max_request_body_bytes
    if args.stream_keepalive_s is not None:
        fields["stream_keepalive_s"] = args.stream_keepalive_s
    if args.stream_interval_ms is not None:
        fields["stream_interval_ms"] = args.stream_interval_ms
    if args.max_connections_per_client is not None:
        fields["front_door"] = {"max_connections_per_client": args.max_connections_per_client}
    try:
        if envs.ray_address() is None and args.device.startswith("cuda"):
            resolve_device(args.device)  # a local cluster runs the model here: the GPU asked for must be here
        serve_args = DsrayServeArgs(**fields)
        return serve_forever(serve_args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        print(f"dsray serve: error: {problems}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsray serve: error: {exc}", file=sys.stderr)
        return 2


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible server on Ray Serve (default model: the embedded tiny one)",
        description="Start (or join, with RAY_ADDRESS) a Ray cluster and serve MODEL over the OpenAI API "
        "until Ctrl-C. Environment: DSRAY_API_KEY (default --api-key), RAY_ADDRESS, "
        "DSRAY_SERVE_FAST_INGRESS (0: Serve's Python proxy instead of HAProxy in front).",
    )
    srv.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: embedded tiny model)")
    srv.add_argument("--served-model-name", default=None, help="model name for clients (default: directory name)")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    srv.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve gRPC (dsray.v1.Dsray, deploy/dsray.proto) on this port, at --host (default: off)",
    )
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default $DSRAY_API_KEY)")
    srv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    srv.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU when torch sees one), cpu, cuda or cuda:N: where the model, its KV cache and sampling "
        "run; with --attention-workers/--expert-workers, cuda gives each worker a GPU",
    )
    srv.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch")
    srv.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per engine step")
    srv.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache memory per model instance")
    srv.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    srv.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="CPU threads of the engine (default: the physical cores, less one for the front end under load)",
    )
    srv.add_argument(
        "--max-waiting-requests", type=int, default=None, help="queue beyond a full batch; more get 429 (default 1024)"
    )
    srv.add_argument(
        "--stream-interval-ms",
        type=float,
        default=None,
        help="after a stream's first token, gather tokens at least this long per chunk (default 50; 0: a chunk "
        "per engine step)",
    )
    srv.add_argument(
        "--stream-keepalive-s",
        type=float,
        default=None,
        help="a stream still queued after this many seconds gets its 200 and an SSE comment every this many "
        "seconds until its first token, so client read timeouts see bytes (default 15; 0: off)",
    )
    srv.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=None,
        help="larger request bodies get 413 (default: 32 bytes per token of context, at least 1 MiB)",
    )
    srv.add_argument(
        "--max-connections-per-client",
        type=int,
        default=None,
        help="connections one client address may hold at HAProxy (default 512; 0: no limit, for a balancer in front)",
    )
    srv.add_argument(
        "--attention-workers",
        type=int,
        default=None,
        help="attention workers per model instance (Ray actors; default: run the model in the server process)",
    )
    srv.add_argument(
        "--expert-workers",
        type=int,
        default=None,
        help="expert workers per model instance (Ray actors sharing the routed experts); 0: the attention workers "
        "hold the experts themselves, a share each (fastest with few workers; the pools cannot scale)",
    )
    srv.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra expert slots: replicas of experts on other expert workers, sharing their rows (default 0)",
    )
    srv.add_argument(
        "--local-expert-share",
        type=float,
        default=0.0,
        help="share of the routed experts every attention worker also holds and computes itself, beside the "
        "expert workers (0-1, default 0)",
    )
    srv.add_argument(
        "--eplb-interval-steps",
        type=int,
        default=0,
        help="re-place experts by their observed load every N engine steps (default 0: not periodically)",
    )
    srv.add_argument(
        "--eplb-imbalance-threshold",
        type=float,
        default=None,
        help="re-place experts when the busiest expert worker's load over the mean passes this (e.g. 1.2)",
    )


def _make_model(argv: list[str]) -> int:
    from dsray.make_model import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-model"]:
        return _make_model(argv[1:])
    parser = argparse.ArgumentParser(prog="dsray", description="Expert-parallel DeepSeek inference on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make-model", help="write a deterministic small DeepSeek-V3 checkpoint (tiny, small)")
    gen = sub.add_parser("generate", help="generate offline from prompts (default model: the embedded tiny one)")
    gen.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: embedded tiny model)")
    gen.add_argument("-p", "--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_serve_parser(sub)
    eplb_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "eplb":
        return eplb_cli.run(args)
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
