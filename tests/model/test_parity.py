"""Our model vs Hugging Face transformers' DeepseekV2/V3ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from attention.metadata import AttentionMetadata
from dsray.simple_generate import SingleSequence, greedy_generate
from dsray.testing import HF_CONFIGS, make_hf_checkpoint
from dsray.weights import load_transformer

CONFIGS = list(HF_CONFIGS)
PROMPT_LEN = 40


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request, tmp_path_factory):
    """(name, checkpoint dir, HF model in fp32, prompt ids)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(request.param, path)
    ids = torch.randint(2, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    return request.param, path, hf, ids


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits[0].float()


@pytest.mark.parametrize("mla_mode", ["naive", "absorbed"])
@pytest.mark.parametrize("expert_mode", ["loop", "grouped"])
def test_full_sequence_logits_match_hf_fp32(pair, mla_mode, expert_mode):
    name, path, hf, ids = pair
    model = load_transformer(path, torch.float32, mla_mode=mla_mode, expert_mode=expert_mode, progress=False)
    ours = SingleSequence(model, PROMPT_LEN).extend(ids[0].tolist())
    diff = (ours - hf_logits(hf, ids)).abs().max().item()
    print(f"[parity] {name} fp32 {mla_mode}/{expert_mode}: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_incremental_decode_equals_full_forward(pair):
    _, path, _, ids = pair
    model = load_transformer(path, torch.float32, progress=False)
    full = SingleSequence(model, PROMPT_LEN).extend(ids[0].tolist())
    seq = SingleSequence(model, PROMPT_LEN, block_size=4)
    steps = [seq.extend(ids[0, :13].tolist())] + [seq.extend([t]) for t in ids[0, 13:].tolist()]
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-5


def test_absorbed_equals_naive_and_grouped_equals_loop(pair):
    _, path, _, ids = pair
    model = load_transformer(path, torch.float32, progress=False)
    outs = {}
    for mla in ("naive", "absorbed"):
        for experts in ("loop", "grouped"):
            model.set_modes(mla, experts)
            outs[mla, experts] = SingleSequence(model, PROMPT_LEN).extend(ids[0].tolist())
    ref = outs["naive", "loop"]
    for key, out in outs.items():
        assert (out - ref).abs().max().item() <= 1e-5, key


def test_greedy_32_tokens_identical_to_hf_generate(pair):
    _, path, hf, ids = pair
    model = load_transformer(path, torch.float32, progress=False)
    prompt = ids[:, :8]
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 8:].tolist()
    assert greedy_generate(model, prompt[0].tolist(), 32) == expected


def test_batched_decode_equals_each_sequence_alone(pair):
    """Absorbed decode gathers all sequences' blocks in one read; it must equal one-at-a-time."""
    _, path, _, ids = pair
    model = load_transformer(path, torch.float32, progress=False)
    lens = [5, 17, 9]
    prompts = [ids[0, i : i + n].tolist() for i, n in enumerate(lens)]
    alone = []
    for p in prompts:
        seq = SingleSequence(model, 32, block_size=4)
        seq.extend(p[:-1])
        alone.append(seq.extend(p[-1:])[0])
    # One shared cache, disjoint block tables, prompts prefilled together, then one batched decode step.
    shared = SingleSequence(model, 3 * 32, block_size=4)
    tables = [shared.block_table[8 * i : 8 * i + 8] for i in range(3)]
    with torch.inference_mode():
        meta = AttentionMetadata.build(tables, [0, 0, 0], [n - 1 for n in lens], 4)
        model(torch.tensor(sum((p[:-1] for p in prompts), [])), meta, shared.cache)
        meta = AttentionMetadata.build(tables, [n - 1 for n in lens], [1, 1, 1], 4)
        assert meta.is_decode_only
        batched = model.compute_logits(model(torch.tensor([p[-1] for p in prompts]), meta, shared.cache))
    assert (batched - torch.stack(alone)).abs().max().item() <= 1e-5


def test_bf16_error_is_reported_and_no_worse_than_hf_bf16(pair):
    """bf16 cannot match bit for bit; it must be about as close to the fp32 truth as HF's own bf16."""
    name, path, hf, ids = pair
    model = load_transformer(path, torch.bfloat16, progress=False)
    ours = SingleSequence(model, PROMPT_LEN).extend(ids[0].tolist())
    ref = hf_logits(hf, ids)
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids)
    ours_err = (ours - ref).abs().mean().item()
    hf_err = (hf_bf16 - ref).abs().mean().item()
    vs_hf_bf16 = (ours - hf_bf16).abs().max().item()
    print(
        f"[parity] {name} bf16: mean abs err vs fp32 ours {ours_err:.2e}, HF bf16 {hf_err:.2e}; "
        f"max abs diff ours vs HF bf16 {vs_hf_bf16:.2e}"
    )
    assert ours_err <= 2 * hf_err + 1e-3
