"""The Triton MLA decode kernel (``mla_mode="triton"``) against the torch absorbed reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set
for this module before the kernels are built (``triton_mla`` builds them on first use), and a test
checks that the interpreter really is what ran. On a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from attention import triton_mla
from attention.kv_cache import allocate_latent_cache
from attention.metadata import AttentionMetadata
from attention.mla import MLA, resolve_mode
from attention.rope import RotaryEmbedding
from dsray.config import ModelArgs
from dsray.testing import hf_config, triton_as_this_machine_runs_it
from experts import triton_moe

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module", autouse=True)
def triton_runs_here():
    """CPU: the interpreter; GPU: compiled kernels, whatever another module set. Rebuilt after."""
    with triton_as_this_machine_runs_it(triton_mla._kernels, triton_moe._kernels):
        yield


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs.from_hf_config(hf_config("v3").to_dict())  # YaRN: softmax_scale carries mscale²


def _mla(args: ModelArgs, mode: str) -> MLA:
    torch.manual_seed(0)
    module = MLA(args, RotaryEmbedding(args), mode)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return module.eval().to(DEVICE)


def _paged(lens: list[int], block_size: int, width: int, dtype: torch.dtype, seed: int = 0):
    """A cache ``[slots, width]`` of random latents; sequence i's ``lens[i]`` tokens in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    blocks = list(range(1, sum(need) + 3))
    random.Random(seed).shuffle(blocks)
    tables = [[blocks.pop() for _ in range(k)] for k in need]
    cache = torch.randn((len(blocks) + sum(need) + 1) * block_size, width, generator=gen).to(dtype).to(DEVICE)
    meta = AttentionMetadata.build(tables, [n - 1 for n in lens], [1] * len(lens), block_size, DEVICE)
    return cache, meta


def test_the_interpreter_runs_on_cpu_tensors():
    split_kernel, _ = triton_mla._kernels()
    if CUDA:
        assert type(split_kernel).__name__ == "JITFunction"
    else:
        assert type(split_kernel).__name__ == "InterpretedFunction"
        assert triton_mla.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_torch_absorbed_decode(args, dtype, block_size):
    """Sequences of different lengths over shuffled blocks: the kernel equals ``MLA._absorbed_decode``.

    fp32: to rounding. bf16/fp16: both are compared with the fp32 result, and the kernel (which
    keeps scores and sums in fp32) may be at most a little worse than the torch path.
    """
    module = _mla(args, "absorbed")
    C, R, H = args.kv_lora_rank, args.qk_rope_head_dim, args.num_attention_heads
    lens = [1, 7, 33, 70]
    cache, meta = _paged(lens, block_size, C + R, dtype)
    q = torch.randn(len(lens), H, C + R, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    exact = module._absorbed_decode(q.float(), meta, cache.float())
    ours = triton_mla.mla_decode(q, cache, meta.block_tables, meta.context_lens_t, block_size, C, module.softmax_scale)
    assert ours.dtype == dtype and ours.shape == (len(lens), H, C)
    err = (ours.float() - exact).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5
    else:
        torch_err = (module._absorbed_decode(q, meta, cache).float() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_long_context_splits_and_their_reduce(args):
    """A context long enough for several splits; any split count gives the one-split answer."""
    module = _mla(args, "absorbed")
    C, R, H = args.kv_lora_rank, args.qk_rope_head_dim, args.num_attention_heads
    lens, block_size = [700, 300], 16
    cache, meta = _paged(lens, block_size, C + R, torch.float32, seed=2)
    q = torch.randn(len(lens), H, C + R, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    exact = module._absorbed_decode(q, meta, cache)
    call = (q, cache, meta.block_tables, meta.context_lens_t, block_size, C, module.softmax_scale)
    outs = {n: triton_mla.mla_decode(*call, num_splits=n) for n in (1, 3, 8)}
    outs["auto"] = triton_mla.mla_decode(*call)  # here: several (the 2nd sequence's last splits are empty)
    for n, out in outs.items():
        assert (out - exact).abs().max().item() <= 1e-5, n


def test_int32_block_tables(args):
    module = _mla(args, "absorbed")
    C, R, H = args.kv_lora_rank, args.qk_rope_head_dim, args.num_attention_heads
    cache, meta = _paged([5, 40], 8, C + R, torch.float32)
    q = torch.randn(2, H, C + R).to(DEVICE)
    tables32 = meta.block_tables.to(torch.int32)
    out = triton_mla.mla_decode(q, cache, tables32, meta.context_lens_t, 8, C, module.softmax_scale)
    assert (out - module._absorbed_decode(q, meta, cache)).abs().max().item() <= 1e-5


def _step(module: MLA, cache: torch.Tensor, tables, computed, new, block_size, x):
    meta = AttentionMetadata.build(tables, computed, new, block_size, DEVICE)
    return module(x, meta, cache)


def test_mla_module_triton_equals_absorbed_on_prefill_decode_and_mixed_steps(args):
    """The module in both modes over the same steps: prefill of two prompts, a decode step, then a
    mixed step (one sequence decodes through the kernel, a new one prefills through torch)."""
    modules = {mode: _mla(args, mode) for mode in ("absorbed", "triton")}
    block_size, D = 4, args.hidden_size
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, D, generator=gen).to(DEVICE) for n in (9, 6, 5, 1, 1, 1)]
    steps = [  # (block tables, computed, new tokens, rows of xs)
        ([[1, 2, 3], [4, 5]], [0, 0], [9, 6], [0, 1]),
        ([[1, 2, 3], [4, 5]], [9, 6], [1, 1], [3, 4]),
        ([[1, 2, 3], [6, 7]], [10, 0], [1, 5], [5, 2]),
    ]
    caches = {
        mode: allocate_latent_cache(1, 8, block_size, args.kv_cache_dim, torch.float32, DEVICE)[0] for mode in modules
    }
    for tables, computed, new, rows in steps:
        x = torch.cat([xs[r] for r in rows])
        outs = {mode: _step(m, caches[mode], tables, computed, new, block_size, x) for mode, m in modules.items()}
        assert (outs["triton"] - outs["absorbed"]).abs().max().item() <= 1e-5


def test_unsupported_call_falls_back_to_torch_with_one_log_line(args, monkeypatch, caplog):
    module, ref = _mla(args, "triton"), _mla(args, "absorbed")
    monkeypatch.setattr(triton_mla, "unsupported_reason", lambda q, cache, c: "a shape the kernel does not take")
    cache = allocate_latent_cache(1, 4, 4, args.kv_cache_dim, torch.float32, DEVICE)[0]
    ref_cache = cache.clone()
    x = torch.randn(3, args.hidden_size).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="attention.mla"):
        for step, (computed, new) in enumerate([(0, 2), (2, 1)]):
            rows = x[computed : computed + new]
            got = _step(module, cache, [[1]], [computed], [new], 4, rows)
            want = _step(ref, ref_cache, [[1]], [computed], [new], 4, rows)
            assert torch.equal(got, want), step
    lines = [r for r in caplog.records if "a shape the kernel does not take" in r.getMessage()]
    assert len(lines) == 1


def test_mla_mode_triton_refused_where_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"mla_mode='triton'.*TRITON_INTERPRET=1"):
        resolve_mode("triton", "cpu")
    assert resolve_mode("auto", "cpu") == "absorbed"
    assert resolve_mode("absorbed", "cpu") == "absorbed"
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # not installed
    with pytest.raises(ValueError, match=r"mla_mode='triton'.*pip install"):
        resolve_mode("triton", "cuda")
    assert resolve_mode("auto", "cuda") == "absorbed"


@pytest.fixture(scope="module")
def hf_v3(tmp_path_factory):
    """A tiny random V3 checkpoint (YaRN, mscale) written by HF transformers, and HF's model."""
    from dsray.testing import make_hf_checkpoint

    path = tmp_path_factory.mktemp("v3")
    return path, make_hf_checkpoint("v3", path)


def test_whole_model_greedy_with_triton_mla_matches_hf_generate(hf_v3):
    from dsray.simple_generate import greedy_generate
    from dsray.weights import load_transformer

    path, hf = hf_v3
    model = load_transformer(path, torch.float32, DEVICE, mla_mode="triton", progress=False)
    assert {blk.self_attn.mode for blk in model.model.layers} == {"triton"}
    prompt = torch.randint(2, hf.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert greedy_generate(model, prompt[0].tolist(), 12, block_size=4) == expected


def test_engine_batched_decode_with_triton_mla_matches_hf_generate(hf_v3):
    """Through ``LLM``: several sequences of different lengths decode together in the kernel."""
    from dsray import LLM, SamplingParams

    path, hf = hf_v3
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 11, 6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(path), dtype="float32", device=str(DEVICE), mla_mode="triton", block_size=4) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            want = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
        assert out.token_ids == want


def test_whole_model_greedy_with_both_triton_modes_matches_hf_generate(hf_v3):
    """The GPU path's two kernels at once — MLA decode and the fused MoE — still give HF's tokens."""
    from dsray.simple_generate import greedy_generate
    from dsray.weights import load_transformer

    path, hf = hf_v3
    model = load_transformer(path, torch.float32, DEVICE, mla_mode="triton", expert_mode="triton", progress=False)
    assert {blk.mlp.expert_mode for blk in model.model.layers if hasattr(blk.mlp, "expert_mode")} == {"triton"}
    prompt = torch.randint(2, hf.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 8:].tolist()
    assert greedy_generate(model, prompt[0].tolist(), 10, block_size=4) == expected
