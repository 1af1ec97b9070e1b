"""The one-call decode step (``dsray/decode_step.py``) against its reference, ``Transformer.forward``
with the same kernels: identical hidden states, latent cache and expert counts, bit for bit."""

from __future__ import annotations

import pytest
import torch

from attention.kv_cache import allocate_latent_cache
from attention.metadata import AttentionMetadata
from dsray import cpu_kernels, decode_step
from dsray.decode_step import DecodeStep
from dsray.testing import make_hf_checkpoint
from dsray.weights import load_transformer
from experts import shard

pytestmark = [
    pytest.mark.skipif(
        not cpu_kernels.available(), reason="needs an x86-64 CPU with AVX512-BF16 or AVX2 and a C compiler"
    ),
    pytest.mark.usefixtures("kernel_isa"),  # every instruction set the CPU runs them on
]
BLOCK = 4


@pytest.fixture(scope="module", params=["v3", "v3-halves", "v3-dense0", "v2", "v2-lite"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(request.param, path)
    return load_transformer(path, torch.bfloat16, progress=False)


def _prefilled(model, num_seqs: int, seed: int):
    """``num_seqs`` sequences of 3 to 20 tokens prefilled (through ``model.forward``) into a fresh
    cache with scattered blocks: (cache, block tables, lengths, next token of each)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 21, (num_seqs,), generator=gen).tolist()
    per_seq = 21 // BLOCK + 1
    blocks = torch.randperm(num_seqs * per_seq, generator=gen).tolist()
    tables = [blocks[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)]
    args = model.args
    cache = allocate_latent_cache(args.num_hidden_layers, num_seqs * per_seq, BLOCK, args.kv_cache_dim, torch.bfloat16)
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=gen).tolist() for n in lens]
    with torch.inference_mode():
        meta = AttentionMetadata.build(tables, [0] * num_seqs, lens, BLOCK)
        model(torch.tensor(sum(prompts, [])), meta, cache)
    next_ids = torch.randint(2, args.vocab_size, (num_seqs,), generator=gen)
    return cache, tables, lens, next_ids


@pytest.mark.parametrize("num_seqs", [1, 2, 7, 24, 64])
def test_decode_step_equals_the_python_path_bit_for_bit(model, num_seqs):
    """Hidden states, the latents written to the cache, and every MoE layer's expert counts."""
    # Past GROUPED_MAX_ROWS the Python path would cut an expert's rows into pieces; the decode step never does.
    assert shard.GROUPED_MAX_ROWS >= decode_step.MAX_TOKENS
    cache, tables, lens, next_ids = _prefilled(model, num_seqs, seed=num_seqs)
    meta = AttentionMetadata.build(tables, lens, [1] * num_seqs, BLOCK)
    assert DecodeStep.takes(meta, next_ids, cache)
    step = DecodeStep(model)
    results = {}
    for name, run in (("python", model.forward), ("decode_step", step)):
        for moe in model.moe_layers.values():
            moe.expert_load.zero_()
        layer_cache = cache.clone()
        with torch.inference_mode():
            hidden = run(next_ids, meta, layer_cache)
        results[name] = hidden, layer_cache, torch.stack([m.expert_load.clone() for m in model.moe_layers.values()])
    (want, want_cache, want_load), (got, got_cache, got_load) = results["python"], results["decode_step"]
    assert got.shape == (num_seqs, model.args.hidden_size)
    assert torch.equal(got, want)
    assert torch.equal(got_cache, want_cache)
    assert not torch.equal(got_cache, cache)  # this step's latents were written
    assert torch.equal(got_load, want_load) and got_load.sum() == num_seqs * model.args.num_experts_per_tok * len(
        model.moe_layers
    )


def test_decode_step_refuses_models_it_cannot_run(model):
    """Each reason is named; the tables go stale when a mode switches and are rebuilt by their user."""
    assert decode_step.why_not(model) is None
    step = DecodeStep(model)
    assert step.valid_for(model)
    model.set_modes(mla_mode="naive")
    try:
        assert "MLA mode 'naive'" in decode_step.why_not(model)
        assert not step.valid_for(model)
        with pytest.raises(ValueError, match="DecodeStep: layer 0: MLA mode"):
            DecodeStep(model)
    finally:
        model.set_modes(mla_mode="absorbed")
    if model.moe_layers:
        model.set_modes(expert_mode="loop")
        try:
            assert "grouped mode" in decode_step.why_not(model) and not step.valid_for(model)
        finally:
            model.set_modes(expert_mode="grouped")
    assert step.valid_for(model)
    with cpu_kernels.disabled():
        assert decode_step.why_not(model) == "the CPU kernels are not available" and not step.valid_for(model)


def test_decode_step_takes_decode_batches_only(model):
    cache, tables, lens, next_ids = _prefilled(model, 2, seed=5)
    assert DecodeStep.takes(AttentionMetadata.build(tables, lens, [1, 1], BLOCK), next_ids, cache)
    prefill = AttentionMetadata.build(tables, lens, [2, 1], BLOCK)
    assert not DecodeStep.takes(prefill, torch.tensor([5, 6, 7]), cache)
    assert not DecodeStep.takes(None, next_ids[:0], cache)
    assert not DecodeStep.takes(AttentionMetadata.build(tables, lens, [1, 1], BLOCK), next_ids, cache.float())


def test_the_engine_decodes_through_it_with_the_same_tokens(tmp_path, monkeypatch):
    """Greedy generation through ``LLM``: every decode step is one call, and the tokens are those of the
    Python path (with the same grouped-kernel limit)."""
    from dsray import LLM, SamplingParams
    from dsray.model_runner import ModelRunner

    make_hf_checkpoint("v3", tmp_path)
    calls = []
    real = cpu_kernels.decode_step
    monkeypatch.setattr(cpu_kernels, "decode_step", lambda *a: calls.append(a[1]) or real(*a))
    prompts = [[2 + i + j for j in range(5 + 3 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(tmp_path), dtype="bfloat16") as llm:
        fast = [o.token_ids for o in llm.generate(prompts, params)]
        assert calls and set(calls) <= set(range(1, len(prompts) + 1))
        monkeypatch.setattr(ModelRunner, "_fast_decode", lambda self, batches: None)
        calls.clear()
        reference = [o.token_ids for o in llm.generate(prompts, params)]
        assert not calls
    assert fast == reference


def test_thousands_of_back_to_back_steps_match_the_python_path(monkeypatch):
    """~4,000 one-token steps of the embedded tiny model, one request in flight at a time: the kernel
    calls come back to back with no Python between them. A race in the kernels' thread pool (a worker
    of the previous call claiming a chunk of the next one) corrupted memory after ~2,000 such steps."""
    from dsray import LLM, SamplingParams
    from dsray.model_runner import ModelRunner

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 500, (32,), generator=gen).tolist() for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def one_at_a_time(engine) -> list[list[int]]:
        tokens = []
        for prompt in prompts:
            engine.add_request(prompt, params)
            while engine.has_unfinished():
                tokens += [out.token_ids for out in engine.step() if out.finished]
        return tokens

    # No prefix cache: the second pass would prefill only each prompt's last token, whose expert rows
    # then round differently from the whole prompt's (a slot's rows take the grouped kernel's wide
    # tiles past 8 rows), and the two passes would compare different prefills, not decode paths.
    with LLM(dtype="bfloat16", max_num_seqs=256, enable_prefix_caching=False) as llm:
        fast = one_at_a_time(llm.engine)
        monkeypatch.setattr(ModelRunner, "_fast_decode", lambda self, batches: None)
        assert one_at_a_time(llm.engine) == fast
