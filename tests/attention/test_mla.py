"""MLA over the paged latent cache, as one module: the absorbed form against the naive one, and
both against themselves under every way the cache can be laid out and filled.

The model-level checks (every V2/V3 variant against Hugging Face) are in ``tests/model``; these
pin down the attention package's own contracts: a sequence's output does not depend on which
blocks hold it, on the block size, on how its prompt was cut into chunks, or on the other
sequences in the batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from attention.kv_cache import allocate_latent_cache
from attention.metadata import AttentionMetadata
from attention.mla import MLA, expanding_is_cheaper
from attention.rope import RotaryEmbedding
from dsray.config import ModelArgs
from dsray.testing import hf_config

TOL = 1e-5  # fp32: the two forms differ by the order of their additions only


@pytest.fixture(scope="module", params=["v3", "v2"])
def mla(request) -> dict[str, MLA]:
    args = ModelArgs.from_hf_config(hf_config(request.param).to_dict())
    torch.manual_seed(0)
    rope = RotaryEmbedding(args)
    modules = {mode: MLA(args, rope, mode) for mode in ("naive", "absorbed")}
    for p in modules["naive"].parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    modules["absorbed"].load_state_dict(modules["naive"].state_dict())
    return {mode: m.eval() for mode, m in modules.items()}


def _run(
    module: MLA, xs: list[torch.Tensor], chunks: list[list[int]], block_size: int, seed: int
) -> list[torch.Tensor]:
    """Feed each sequence's tokens ``xs[i] [L_i, D]`` in steps (``chunks[i]``: tokens per step, all sequences
    in one batch per step), over a cache whose blocks are handed out in a shuffled order; returns each
    sequence's outputs in token order."""
    total = sum(x.shape[0] for x in xs)
    num_blocks = total // block_size + 2 * len(xs) + 1
    free = list(range(1, num_blocks))  # block 0 stays unused: padding in the block tables points there
    random.Random(seed).shuffle(free)
    cache = allocate_latent_cache(
        1, num_blocks, block_size, module.kv_lora_rank + module.qk_rope_head_dim, torch.float32
    )
    tables: list[list[int]] = [[] for _ in xs]
    done = [0] * len(xs)
    outs: list[list[torch.Tensor]] = [[] for _ in xs]
    for step in range(max(len(c) for c in chunks)):
        seqs = [i for i, c in enumerate(chunks) if step < len(c)]
        for i in seqs:
            while len(tables[i]) * block_size < done[i] + chunks[i][step]:
                tables[i].append(free.pop())
        meta = AttentionMetadata.build(
            [tables[i] for i in seqs], [done[i] for i in seqs], [chunks[i][step] for i in seqs], block_size
        )
        x = torch.cat([xs[i][done[i] : done[i] + chunks[i][step]] for i in seqs])
        with torch.inference_mode():
            y = module(x, meta, cache[0])
        start = 0
        for i in seqs:
            n = chunks[i][step]
            outs[i].append(y[start : start + n])
            start += n
            done[i] += n
    return [torch.cat(o) for o in outs]


def _inputs(dim: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, dim, generator=g) for n in lengths]


def test_absorbed_equals_naive_for_prefill_chunks_and_decode(mla):
    dim = mla["naive"].o_proj.out_features
    xs = _inputs(dim, [7, 19, 1])
    chunks = [[4, 3], [5, 9, 5], [1]]  # prefill in chunks, beside a one-token sequence
    naive = _run(mla["naive"], xs, chunks, block_size=4, seed=0)
    absorbed = _run(mla["absorbed"], xs, chunks, block_size=4, seed=0)
    for n, a in zip(naive, absorbed):
        assert (n - a).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_output_does_not_depend_on_blocks_block_size_chunking_or_batch(mla, mode):
    module = mla[mode]
    dim = module.o_proj.out_features
    lengths = [13, 6, 21]
    xs = _inputs(dim, lengths)
    # Reference: each sequence alone, its whole prompt in one step, contiguous blocks of 16.
    alone = [_run(module, [x], [[x.shape[0]]], block_size=16, seed=0)[0] for x in xs]
    layouts = [
        ([[13], [6], [21]], 16, 1),  # one batch, shuffled blocks
        ([[5, 8], [6], [10, 11]], 4, 2),  # chunked prefill, small blocks
        ([[13], [3, 1, 1, 1], [1] * 21], 8, 3),  # decode steps (one token each) beside a prefill
    ]
    for chunks, block_size, seed in layouts:
        got = _run(module, xs, chunks, block_size, seed)
        for i, (g, want) in enumerate(zip(got, alone)):
            assert (g - want).abs().max().item() <= TOL, (chunks, block_size, i)


def test_metadata_maps_each_token_to_its_block_slot_and_pads_decode_reads():
    meta = AttentionMetadata.build([[5, 2], [7]], num_computed=[5, 0], query_lens=[1, 1], block_size=4)
    assert meta.positions.tolist() == [5, 0]
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 7 * 4 + 0]  # position 5 is slot 1 of block 2
    assert meta.context_lens == [6, 1] and meta.is_decode_only
    assert meta.block_tables.tolist() == [[5, 2], [7, 0]]  # padded with block 0
    pad = meta.decode_pad[:, 0]  # [N, S]: reads past each context are padding
    assert pad[0].tolist() == [False] * 6 + [True] * 2 and pad[1].tolist() == [False] + [True] * 7
    prefill = AttentionMetadata.build([[3]], num_computed=[0], query_lens=[3], block_size=4)
    assert not prefill.is_decode_only and prefill.decode_pad is None
    assert prefill.context_slots(0).tolist() == [12, 13, 14]


def _count_calls(monkeypatch, *names: str) -> dict[str, int]:
    """Calls of these ``MLA`` methods during the test, by name (proves which paths ran)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(MLA, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(MLA, name, counted)
    return calls


def test_prefill_spans_expand_beside_absorbed_ones_and_equal_naive(mla, monkeypatch):
    """Step 2 holds a long chunk over a short context (expanded), a short chunk over a long context
    and a decode row (both absorbed, packed into one call): each path runs, and every output
    equals the naive form."""
    calls = _count_calls(monkeypatch, "_expanded_seq", "_latent_attend")
    dim = mla["naive"].o_proj.out_features
    xs = _inputs(dim, [32, 44, 30])
    chunks = [[8, 24], [40, 4], [29, 1]]
    naive = _run(mla["naive"], xs, chunks, block_size=4, seed=0)
    assert calls == {"_expanded_seq": 0, "_latent_attend": 0}
    got = _run(mla["absorbed"], xs, chunks, block_size=4, seed=0)
    assert calls == {"_expanded_seq": 3 + 1, "_latent_attend": 1}
    for n, g in zip(naive, got):
        assert (n - g).abs().max().item() <= TOL


def test_prompt_spans_padded_into_one_product_equal_naive(mla, monkeypatch):
    """Steps of several short prompt spans over contexts of similar length attend in one padded product
    (padded queries and keys of every kind: shorter spans, shorter contexts, chunks over cached tokens);
    a step whose padding would cost too much goes span by span. Both equal the naive form."""
    from attention import mla as mla_module

    calls = _count_calls(monkeypatch, "_absorbed_padded", "_absorbed_seq")
    monkeypatch.setattr(mla_module, "expanding_is_cheaper", lambda *a: False)  # every span absorbed
    dim = mla["naive"].o_proj.out_features
    xs = _inputs(dim, [6, 6, 6, 6])
    chunks = [[3, 3], [2, 4], [4, 1, 1], [3, 2, 1]]  # step 1: chunks of 3, 4, 1 and 2 over 3, 2, 4 and 3 cached
    naive = _run(mla["naive"], xs, chunks, block_size=4, seed=0)
    got = _run(mla["absorbed"], xs, chunks, block_size=4, seed=0)
    assert calls == {"_absorbed_padded": 2, "_absorbed_seq": 0}  # step 2 is decode only
    for n, g in zip(naive, got):
        assert (n - g).abs().max().item() <= TOL
    xs = _inputs(dim, [40, 2, 3])
    got = _run(mla["absorbed"], xs, [[40], [2], [3]], block_size=4, seed=1)  # padding 2 and 3 to 40: one by one
    assert calls == {"_absorbed_padded": 2, "_absorbed_seq": 3}
    naive = _run(mla["naive"], xs, [[40], [2], [3]], block_size=4, seed=1)
    for n, g in zip(naive, got):
        assert (n - g).abs().max().item() <= TOL
    heads = mla["naive"].n_heads
    monkeypatch.setattr(mla_module, "PADDED_SCORES_MAX", 4 * 4 * 6 * heads - 1)  # step 1's scores, less one
    _run(mla["absorbed"], _inputs(dim, [6, 6, 6, 6]), chunks, block_size=4, seed=0)
    assert calls == {"_absorbed_padded": 3, "_absorbed_seq": 7}  # step 0 padded, step 1's four one by one


def test_expanding_is_cheaper_for_long_chunks_over_short_contexts():
    small = dict(H=16, C=256, d_nope=64, R=32, d_v=64)  # the `small` preset
    assert expanding_is_cheaper(128, 128, **small) and expanding_is_cheaper(4096, 4096, **small)
    assert expanding_is_cheaper(512, 1024, **small)  # the second half of a prompt
    assert not expanding_is_cheaper(1, 4000, **small) and not expanding_is_cheaper(16, 4000, **small)
