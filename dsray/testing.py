"""Test fixtures that need no network: tiny DeepSeek checkpoints written by HF transformers.

Importable by tests and benchmarks (``transformers`` is a test dependency, imported lazily).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
    max_position_embeddings=1024,
    initializer_range=0.05,
    bos_token_id=0,
    eos_token_id=1,
)

# The parity matrix of the model issue: name → (model_type, config overrides).
HF_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "v3": ("deepseek_v3", dict(q_lora_rank=48, n_group=4, topk_group=2, rope_parameters=YARN)),
    "v3-dense0": ("deepseek_v3", dict(q_lora_rank=48, n_group=4, topk_group=2, first_k_dense_replace=0)),
    "v3-dense2": (
        "deepseek_v3",
        dict(
            q_lora_rank=48, n_group=4, topk_group=2, first_k_dense_replace=2, num_hidden_layers=4, rope_parameters=YARN
        ),
    ),
    "v3-halves": (
        "deepseek_v3",
        dict(q_lora_rank=48, n_group=2, topk_group=1, rope_interleave=False, rope_parameters=YARN),
    ),
    "v2": (
        "deepseek_v2",
        dict(
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            n_shared_experts=2,
            routed_scaling_factor=16.0,
            rope_parameters=YARN,
        ),
    ),
    "v2-lite": (
        "deepseek_v2",
        dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2, num_experts_per_tok=6, rope_parameters=YARN),
    ),
}


def hf_config(name: str):
    """The transformers config object of a matrix entry."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    model_type, overrides = HF_CONFIGS[name]
    cls = DeepseekV3Config if model_type == "deepseek_v3" else DeepseekV2Config
    return cls(**(_COMMON | overrides))


def make_hf_checkpoint(name: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a random checkpoint of matrix entry ``name`` with HF's ``save_pretrained``; return the HF model."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    config = hf_config(name)
    cls = DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):  # HF initialises it to zero; make it matter
            bias.data.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
    model.save_pretrained(out_dir)
    return model


SLOW_STEP_S = 0.05  # slow_async_llm: 200 tokens take >= 10 s


def slow_async_llm(config):
    """An ``AsyncLLM`` whose every engine step first sleeps ``SLOW_STEP_S``: server tests use it as the
    LLMServer's engine to keep requests in flight long enough to observe. In-process engine, since
    the slowed step patches it; here in the package so Serve replicas can import it."""
    import time

    from dsray.async_llm import AsyncLLM

    llm = AsyncLLM(config.model_copy(update={"engine_process": False}))
    step = llm.engine.step

    def slow_step():
        time.sleep(SLOW_STEP_S)
        return step()

    llm.engine.step = slow_step
    return llm


def make_skewed_model(out_dir: str | Path, hot_experts: int = 2, bias: float = 1.0) -> Path:
    """The tiny V3 bench model with every gate biased towards experts ``0 … hot_experts-1``, so they
    take a large share of every token (a skewed workload, for the balancer's tests)."""
    from safetensors.torch import load_file, save_file

    from dsray.make_model import make_model

    path = make_model("tiny", Path(out_dir), dtype="float32")
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    for name, t in tensors.items():
        if name.endswith("mlp.gate.e_score_correction_bias"):
            t[:hot_experts] += bias  # noaux_tc: the bias steers the choice only
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def make_fp8_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """DeepSeek-V3's FP8 layout of checkpoint ``src`` (one ``model.safetensors``) in ``dst``: every 2-D
    ``*proj.weight`` float8_e4m3fn with its ``weight_scale_inv`` (one fp32 per ``block``), and the
    ``quantization_config`` that names the block size."""
    import json

    from safetensors.torch import load_file, save_file

    from dsray.fp8 import quantize_fp8_blocks
    from dsray.weights import keep_fp32

    src, dst = Path(src), Path(dst)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and name.endswith("proj.weight") and not keep_fp32(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            out[name] = t
    dst.mkdir(parents=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@contextlib.contextmanager
def triton_as_this_machine_runs_it(*kernel_caches) -> Iterator[None]:
    """For a test module of Triton kernels: compiled kernels on a GPU (whatever another module set),
    the interpreter on CPU (``TRITON_INTERPRET=1``, set before the kernels are built). ``kernel_caches``
    (the modules' ``functools.cache``d kernel builders) are cleared on the way in and out, so the
    kernels are rebuilt in the mode in force, and again for the modules after."""
    previous = os.environ.get("TRITON_INTERPRET")
    if torch.cuda.is_available():
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    for cache in kernel_caches:
        cache.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        for cache in kernel_caches:
            cache.cache_clear()


# Processes --------------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket the processes ``pids`` hold."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        owner = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
        if len(fields) < 4 or not owner or int(owner.group(2)) not in pids:
            continue
        addr, _, port = fields[3].rpartition(":")
        found.add((addr.strip("[]"), int(port), owner.group(1)))
    return found


def stop_process_group(proc: subprocess.Popen, sig: int, timeout_s: float) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``), wait up to
    ``timeout_s`` for it to exit, then SIGKILL the group; nothing if it has exited already."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(fetch, check, timeout_s: float = 30.0, what: str = "condition", every_s: float = 0.1):
    """Poll ``fetch()`` until ``check`` holds for its value (returned); AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(every_s)
