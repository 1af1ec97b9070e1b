"""dsray's CPU decode kernels, on each instruction set the CPU runs, against the torch code they
replace (their readable reference).

Each kernel is held to the reference's own rounding: a product of bf16 inputs accumulated in fp32
and rounded once may differ from torch's by the order of its fp32 additions only, so by at most
one bf16 step after rounding. Whole decode steps are then held to the fp32 truth no worse than
torch's bf16 path is.
"""

from __future__ import annotations

import ctypes
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from attention.metadata import AttentionMetadata
from dsray import cpu_kernels, kernel_build, kernel_threads
from dsray.config import ModelArgs
from dsray.layers import MLP, RMSNorm, linear
from dsray.simple_generate import SingleSequence
from dsray.testing import hf_config, make_hf_checkpoint
from dsray.weights import load_transformer
from experts.shard import ExpertShard
from router.gate import Gate

pytestmark = [
    pytest.mark.skipif(
        not cpu_kernels.available(), reason="needs an x86-64 CPU with AVX512-BF16 or AVX2 and a C compiler"
    ),
    pytest.mark.usefixtures("kernel_isa"),  # every instruction set the CPU runs them on
]
BF16_STEP = 2.0**-7  # relative spacing of bf16 values at worst


def _randn(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 7, 33), (1, 64, 64), (2, 130, 100), (3, 1024, 1024), (4, 9, 1), (8, 7, 33), (9, 130, 100), (16, 1024, 1024)]
    + [(33, 9, 1), (64, 67, 290), (150, 37, 70)],
)
def test_gemm_equals_fp32_product_rounded_once(rows, n, k):
    """Both tile shapes (one weight row against up to 8 rows; square beyond) with every remainder:
    rows and weight rows not multiples of the tile, K not a multiple of the vector; past 64 rows
    in blocks of 64."""
    x = _randn(rows, 2 * k, seed=1)[:, :k]
    w = _randn(n, k, scale=k**-0.5, seed=2)
    exact = F.linear(x.float(), w.float())
    got = cpu_kernels.gemm(x, w).float()
    assert got.shape == (rows, n)
    assert torch.all((got - exact).abs() <= BF16_STEP * exact.abs() + 1e-6)


def test_linear_takes_the_kernel_for_decode_batches_only(monkeypatch):
    calls = []
    real = cpu_kernels.gemm
    monkeypatch.setattr(cpu_kernels, "gemm", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    w = _randn(16, 32)
    linear(_randn(1, 32), w)
    linear(_randn(5, 32), w)
    linear(_randn(cpu_kernels.GEMM_MAX_ROWS, 32), w)
    linear(_randn(cpu_kernels.GEMM_MAX_ROWS + 1, 32), w)  # a prefill: oneDNN
    linear(_randn(1, 32).float(), w.float())  # fp32: torch
    with cpu_kernels.disabled():
        linear(_randn(8, 32), w)
    assert calls == [1, 5, cpu_kernels.GEMM_MAX_ROWS]


def test_a_prefill_linear_is_computed_in_fp32_where_torch_bf16_widens(monkeypatch):
    """On an x86 CPU without AVX512-BF16 a prefill's bf16 linear runs as an fp32 matmul rounded once
    (the bf16 one's own sums, five times faster there); with AVX512-BF16 it stays a bf16 matmul."""
    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append((x.dtype, w.dtype)) or real(x, w, b))
    x, w, b = _randn(100, 48, seed=3), _randn(24, 48, scale=0.2, seed=4), _randn(24, seed=5)
    got = linear(x, w, b)
    widened = cpu_kernels.torch_bf16_widens()
    assert widened == ("avx512bf16" not in kernel_build.cpu_isas())
    assert seen == [(torch.float32, torch.float32) if widened else (torch.bfloat16, torch.bfloat16)]
    exact = real(x.float(), w.float(), b.float())
    assert got.dtype == torch.bfloat16
    assert torch.all((got.float() - exact).abs() <= BF16_STEP * exact.abs() + 1e-6)


def test_swiglu_experts_equals_shard_and_shared_mlp():
    dim, inter, experts, top_k = 256, 64, 16, 4
    torch.manual_seed(0)
    shard = ExpertShard(range(experts), dim, inter)
    shard.w13.data = _randn(experts, 2 * inter, dim, scale=dim**-0.5, seed=3)
    shard.w2.data = _randn(experts, dim, inter, scale=inter**-0.5, seed=4)
    mlp = MLP(dim, 2 * inter)
    for i, p in enumerate(mlp.parameters()):
        p.data = _randn(*p.shape, scale=p.shape[1] ** -0.5, seed=5 + i)
    for seed in range(5):
        x = _randn(1, dim, seed=10 + seed)
        ids = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))[:top_k][None]
        weights = torch.rand(1, top_k, generator=torch.Generator().manual_seed(seed))
        with cpu_kernels.disabled():
            reference = shard.forward_single(x, ids, weights) + mlp(x)
            routed_only = shard.forward_single(x, ids, weights)
        fused = cpu_kernels.swiglu_experts(x, shard.single_token_experts(ids, weights), [mlp.swiglu_weights()])
        scale = reference.float().abs().max()
        assert (fused.float() - reference.float()).abs().max() <= 2 * BF16_STEP * scale
        assert (
            shard.forward_single(x, ids, weights).float() - routed_only.float()
        ).abs().max() <= 2 * BF16_STEP * scale
        assert (mlp(x).float() - (reference - routed_only).float()).abs().max() <= 4 * BF16_STEP * scale


@pytest.mark.parametrize(("rows", "dim", "inter"), [(2, 64, 32), (9, 100, 36), (64, 1024, 256)])
def test_swiglu_rows_equals_the_torch_mlp(rows, dim, inter):
    """A decode batch through the dense MLP in one call: the reference's roundings (each product, SiLU,
    gate * up) with kernel products, so at most a bf16 step or two from torch's result."""
    mlp = MLP(dim, inter).bfloat16()
    for i, p in enumerate(mlp.parameters()):
        p.data = _randn(*p.shape, scale=dim**-0.5, seed=i)
    x = _randn(rows, dim, seed=9)
    got = cpu_kernels.swiglu_rows(x, *mlp.swiglu_weights())
    with cpu_kernels.disabled():
        want = mlp(x)
    assert torch.allclose(got.float(), want.float(), rtol=4 * BF16_STEP, atol=1e-3)
    assert torch.equal(mlp(x), got)  # MLP.forward takes it for these rows


def test_swiglu_experts_refuses_what_it_cannot_run():
    w = _randn(6, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        cpu_kernels.swiglu_experts(_randn(1, 8), [], [(w, w, _randn(8, 6))])
    with pytest.raises(ValueError, match="contiguous bf16"):
        cpu_kernels.swiglu_experts(_randn(1, 8), [], [(_randn(8, 4).t(), _randn(4, 8), _randn(8, 4))])


def test_rmsnorm_equals_torch_rmsnorm():
    norm = RMSNorm(300, eps=1e-6)
    norm.weight.data = _randn(300, seed=20).bfloat16()
    x = _randn(7, 600, scale=3.0, seed=21)[:, :300]  # strided rows
    with cpu_kernels.disabled():
        reference = norm(x)
    got = cpu_kernels.rmsnorm(x, norm.weight, norm.eps)
    assert (got.float() - reference.float()).abs().max() <= BF16_STEP * reference.float().abs().max()


@pytest.mark.parametrize("config", ["v3", "v2", "v2-lite"])
def test_gate_picks_the_same_experts_with_the_same_weights(config):
    args = ModelArgs.from_hf_config(hf_config(config).to_dict())
    gate = Gate(args)
    gate.weight.data = torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(30)) * 0.1
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.data = torch.rand(
            args.n_routed_experts, generator=torch.Generator().manual_seed(31)
        )
    x = _randn(33, args.hidden_size, seed=32)
    with cpu_kernels.disabled():
        ref_weights, ref_ids = gate(x)
    weights, ids = gate(x)  # kernel path: bf16 tokens, fp32 gate
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.allclose(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-5, atol=1e-6)


KERNEL_CONFIGS = ["v3", "v3-halves", "v2", "v2-lite"]  # rope interleaved / halves; q_lora or not; all gates


@pytest.fixture(scope="module", params=KERNEL_CONFIGS)
def bf16_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(request.param, path)
    return load_transformer(path, torch.bfloat16, progress=False), load_transformer(path, torch.float32, progress=False)


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of calls into each kernel during a test (proves the fast paths were taken)."""
    calls: dict[str, int] = {}
    for name in ("gemm", "swiglu_experts", "mla_decode_step", "rmsnorm", "gate"):
        real = getattr(cpu_kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


def _batched_decode(model, prompts, block_size=4, calls=None):
    """Prefill ``prompts`` but their last tokens into one shared cache, then one decode step for all."""
    seq = SingleSequence(model, len(prompts) * 32, block_size=block_size)
    tables = [seq.block_table[8 * i : 8 * i + 8] for i in range(len(prompts))]  # reversed, so not in order
    with torch.inference_mode():
        meta = AttentionMetadata.build(tables, [0] * len(prompts), [len(p) - 1 for p in prompts], block_size)
        model(torch.tensor(sum((p[:-1] for p in prompts), [])), meta, seq.cache)
        meta = AttentionMetadata.build(tables, [len(p) - 1 for p in prompts], [1] * len(prompts), block_size)
        assert meta.is_decode_only
        if calls is not None:
            calls.clear()  # count the decode step only
        return model.compute_logits(model(torch.tensor([p[-1] for p in prompts]), meta, seq.cache))


def test_batched_decode_step_with_kernels_matches_torch_bf16(bf16_model, kernel_calls):
    """Several sequences of different lengths in one decode step: MLA kernel, GEMM kernel."""
    model, truth_model = bf16_model
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    kernels = _batched_decode(model, prompts, calls=kernel_calls)
    assert kernel_calls["mla_decode_step"] == model.args.num_hidden_layers and kernel_calls["gemm"] > 0
    assert kernel_calls["gate"] == len(model.moe_layers)
    with cpu_kernels.disabled():
        torch_bf16 = _batched_decode(model, prompts)
    truth = _batched_decode(truth_model, prompts)
    kernel_err = (kernels - truth).abs().mean().item()
    torch_err = (torch_bf16 - truth).abs().mean().item()
    print(f"[kernels] batched decode mean abs err vs fp32: kernels {kernel_err:.2e}, torch bf16 {torch_err:.2e}")
    assert kernel_err <= 1.5 * torch_err + 1e-4
    assert (kernels - torch_bf16).abs().max() <= 0.1 * truth.abs().max()


def test_single_sequence_decode_with_kernels_is_as_accurate_as_torch_bf16(bf16_model, kernel_calls):
    """Batch 1: every kernel (GEMM, fused MLP and MoE experts, MLA decode) over 24 decode steps."""
    model, truth_model = bf16_model
    tokens = torch.randint(2, 512, (40,), generator=torch.Generator().manual_seed(8)).tolist()

    def decode(m):
        seq = SingleSequence(m, 48)
        seq.extend(tokens[:16])
        kernel_calls.clear()  # count the decode steps only
        return torch.cat([seq.extend([t]) for t in tokens[16:]])  # teacher-forced: same inputs for all

    kernels = decode(model)
    layers, steps = model.args.num_hidden_layers, len(tokens) - 16
    assert kernel_calls["mla_decode_step"] == layers * steps
    assert kernel_calls["swiglu_experts"] == layers * steps  # the dense MLP and each MoE layer: one call
    assert kernel_calls["gate"] == len(model.moe_layers) * steps
    assert kernel_calls["rmsnorm"] >= 2 * layers * steps
    with cpu_kernels.disabled():
        torch_bf16 = decode(model)
    truth = decode(truth_model)
    kernel_err = (kernels - truth).abs().mean().item()
    torch_err = (torch_bf16 - truth).abs().mean().item()
    print(f"[kernels] batch-1 decode mean abs err vs fp32: kernels {kernel_err:.2e}, torch bf16 {torch_err:.2e}")
    assert kernel_err <= 1.5 * torch_err + 1e-4


@pytest.mark.parametrize("kv_lora_rank", [32, 48, 176])  # latent widths with 16-column tails (blocks of 32, 128)
def test_mla_decode_kernel_equals_the_torch_absorbed_path(kv_lora_rank):
    """One decode step of sequences whose contexts (1 to 23 tokens) leave every remainder of the
    kernel's 4-position scores and 2-row value sums."""
    from attention.kv_cache import allocate_latent_cache
    from attention.mla import MLA
    from attention.rope import RotaryEmbedding

    args = ModelArgs.from_hf_config(hf_config("v3").to_dict() | {"kv_lora_rank": kv_lora_rank})
    torch.manual_seed(0)
    mla = MLA(args, RotaryEmbedding(args), "absorbed")
    for p in mla.parameters():
        p.data = torch.randn(p.shape) * 0.1 if p.dim() > 1 else torch.rand(p.shape) + 0.5
    mla = mla.bfloat16().eval()
    lens = [1, 2, 3, 4, 5, 6, 7, 9, 23]
    block, per_seq = 4, 6
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]
    cache = allocate_latent_cache(1, len(lens) * per_seq, block, kv_lora_rank + args.qk_rope_head_dim, torch.bfloat16)
    x = _randn(sum(lens) + len(lens), args.hidden_size, seed=4)
    with torch.inference_mode():
        mla(x[: sum(lens)], AttentionMetadata.build(tables, [0] * len(lens), lens, block), cache[0])
        meta = AttentionMetadata.build(tables, lens, [1] * len(lens), block)
        got = mla(x[sum(lens) :], meta, cache[0].clone())
        with cpu_kernels.disabled():
            want = mla(x[sum(lens) :], meta, cache[0].clone())
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 0.02 * want.float().abs().max().item(), err


def test_a_step_mixing_prompt_spans_and_decode_rows_sends_the_decode_rows_to_the_kernel(monkeypatch):
    """A serving step: decode rows beside a prompt's first chunk (expanded), a later chunk over a longer
    context (absorbed) and a one-token chunk. The one-row spans take one kernel call, the others the
    torch path; outputs and the latents written equal the all-torch step's."""
    from attention.kv_cache import allocate_latent_cache
    from attention.mla import MLA
    from attention.rope import RotaryEmbedding

    args = ModelArgs.from_hf_config(hf_config("v3").to_dict())
    torch.manual_seed(0)
    mla = MLA(args, RotaryEmbedding(args), "absorbed")
    for p in mla.parameters():
        p.data = torch.randn(p.shape) * 0.1 if p.dim() > 1 else torch.rand(p.shape) + 0.5
    mla = mla.bfloat16().eval()
    cached = [9, 0, 3, 14, 30, 5, 21]  # tokens already in the cache per sequence
    new = [1, 24, 1, 4, 1, 1, 1]  # this step: decodes, a whole prompt, a chunk, and a one-token chunk
    block, per_seq = 4, 9
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(cached))]
    cache = allocate_latent_cache(1, len(cached) * per_seq, block, args.kv_cache_dim, torch.bfloat16)[0]
    x = _randn(sum(cached) + sum(new), args.hidden_size, seed=5)
    rows = []
    real = cpu_kernels.mla_decode_step
    monkeypatch.setattr(cpu_kernels, "mla_decode_step", lambda q, *a: rows.append(q.shape[0]) or real(q, *a))
    with torch.inference_mode():
        mla(x[: sum(cached)], AttentionMetadata.build(tables, [0] * len(cached), cached, block), cache)
        rows.clear()
        meta = AttentionMetadata.build(tables, cached, new, block)
        got_cache, want_cache = cache.clone(), cache.clone()
        got = mla(x[sum(cached) :], meta, got_cache)
        assert rows == [new.count(1)]
        assert meta.one_row_split() is meta.one_row_split()  # built once for every layer of the step
        with cpu_kernels.disabled():
            want = mla(x[sum(cached) :], meta, want_cache)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 0.02 * want.float().abs().max().item(), err
    assert (got_cache.float() - want_cache.float()).abs().max() <= BF16_STEP * want_cache.float().abs().max()
    written = meta.slot_mapping
    assert got_cache[written].abs().sum() > 0 and torch.equal(
        got_cache[~_mask(written, len(cache))], cache[~_mask(written, len(cache))]
    )


def _mask(slots: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[slots] = True
    return mask


@pytest.mark.parametrize(("tokens", "k", "dim"), [(1, 8, 1024), (5, 6, 100), (64, 8, 1040)])
def test_combine_equals_the_exchanges_torch_combine(tokens, k, dim):
    """Bit for bit: the same fp32 products summed in the same k order, rounded once (D tails too)."""
    g = torch.Generator().manual_seed(tokens)
    back = torch.randn(tokens * k, dim, generator=g).bfloat16()
    order = torch.randperm(tokens * k, generator=g)
    weights = torch.rand(tokens, k, generator=g)
    rows = torch.empty_like(back).index_copy_(0, order, back)
    want = (rows.view(tokens, k, dim).float() * weights.unsqueeze(-1)).sum(dim=1).bfloat16()
    assert torch.equal(cpu_kernels.combine(back, order, weights), want)


def test_decode_steps_run_torch_single_threaded_and_the_kernels_with_torchs_threads(monkeypatch, tmp_path):
    """A decode step's torch ops run on one thread (a parallel op after a kernel call waits on an
    OpenMP barrier for a core the kernel pool holds), its kernels on the threads torch had; a
    prefill step keeps torch's threads, and they are restored after every step."""
    from dsray import LLM, SamplingParams
    from dsray.model_runner import ModelRunner

    make_hf_checkpoint("v3", tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16")
    seen: dict[str, set] = {"prefill": set(), "decode": set()}
    step = []
    real_execute, real_rmsnorm = ModelRunner._execute, cpu_kernels.rmsnorm

    def execute(self, s):
        step[:] = ["decode" if all(q.num_new_tokens == 1 for q in s.seqs) else "prefill"]
        return real_execute(self, s)

    def rmsnorm(x, *args):  # every prefill step calls it, whatever its rows
        seen[step[0]].add((torch.get_num_threads(), kernel_threads.threads()))
        return real_rmsnorm(x, *args)

    def decode_step(*args):  # every decode step is this one call (dsray/decode_step.py)
        seen[step[0]].add((torch.get_num_threads(), kernel_threads.threads()))
        return real_decode_step(*args)

    real_decode_step = cpu_kernels.decode_step
    monkeypatch.setattr(ModelRunner, "_execute", execute)
    monkeypatch.setattr(cpu_kernels, "rmsnorm", rmsnorm)
    monkeypatch.setattr(cpu_kernels, "decode_step", decode_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        llm.generate([list(range(2, 2 + 80))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert torch.get_num_threads() == 2  # restored after the steps
    finally:
        torch.set_num_threads(threads)
    assert seen == {"prefill": {(2, 2)}, "decode": {(1, 2)}}


def test_steps_of_many_sequences_leave_the_front_end_its_cores_while_it_is_busy(monkeypatch, tmp_path):
    """With ``front_end_cores=1`` a step of more than 64 sequences runs torch and the kernels on one thread
    fewer while other processes keep a core busy (``OthersLoad.busy``), and on all of them when they do not;
    steps of fewer sequences (a long prompt too) keep every thread, and each step restores them."""
    from dsray import LLM, SamplingParams
    from dsray.cpu_load import OthersLoad
    from dsray.model_runner import ModelRunner

    make_hf_checkpoint("v3", tmp_path)
    seen = set()
    real_execute = ModelRunner._execute
    others_busy = {"now": True}
    asked = []

    def execute(self, step):
        many = len(step.seqs) > cpu_kernels.GEMM_MAX_ROWS
        seen.add((others_busy["now"], many, torch.get_num_threads(), kernel_threads.threads()))
        return real_execute(self, step)

    def busy(self, cores):
        asked.append(cores)
        return others_busy["now"]

    monkeypatch.setattr(ModelRunner, "_execute", execute)
    monkeypatch.setattr(OthersLoad, "busy", busy)
    threads = torch.get_num_threads()
    try:
        llm = LLM(str(tmp_path), dtype="bfloat16", num_threads=3, front_end_cores=1)
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.generate([list(range(2, 2 + 80))], params)  # one sequence: an 80-token prefill, then a decode
        assert asked == []  # only steps of many sequences ask
        many = [[2 + i, 3 + i, 4 + i] for i in range(70)]
        llm.generate(many, params)  # 70 sequences, others busy
        others_busy["now"] = False
        llm.generate(many, params)  # 70 sequences, others idle
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert set(asked) == {1}
    assert seen == {(True, False, 3, 3), (True, False, 1, 3), (True, True, 2, 2), (False, True, 3, 3)}


def test_the_kernels_run_on_the_cpus_best_instruction_set_unless_told_otherwise(monkeypatch):
    have = kernel_build.cpu_isas()
    assert "avx2" in have  # every CPU these kernels run on has it (AVX512-BF16 ones included)

    def chosen(**env):
        for name in ("DSRAY_CPU_KERNELS", "DSRAY_CPU_KERNELS_ISA"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        kernel_build.chosen_isa.cache_clear()
        return kernel_build.chosen_isa()

    try:
        assert chosen() == have[0]
        assert chosen(DSRAY_CPU_KERNELS_ISA="AVX2") == "avx2"
        assert chosen(DSRAY_CPU_KERNELS="0", DSRAY_CPU_KERNELS_ISA="avx2") is None
        with pytest.raises(ValueError, match="DSRAY_CPU_KERNELS_ISA='sse2': not one of avx512bf16, avx2"):
            chosen(DSRAY_CPU_KERNELS_ISA="sse2")
        missing = [name for name in kernel_build.ISAS if name not in have]
        if missing:  # asked for one this CPU lacks: no kernels (torch's paths), and a warning
            assert chosen(DSRAY_CPU_KERNELS_ISA=missing[0]) is None
            with pytest.raises(ValueError, match="this CPU does not run"), kernel_build.using_isa(missing[0]):
                pass
    finally:
        monkeypatch.undo()
        kernel_build.chosen_isa.cache_clear()
    assert kernel_build.isa() in have


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_an_amx_cpu_whose_compiler_lacks_amx_gets_the_kernels_without_tiles(monkeypatch, tmp_path, caplog):
    """A compiler that refuses the AMX flags (GCC before 11) still builds the AVX512-BF16 kernels, without tiles."""
    cc = tmp_path / "cc"
    cc.write_text(
        '#!/bin/sh\ncase " $* " in *" -mamx-tile "*) echo "unrecognized -mamx-tile" >&2; exit 1;; esac\nexec gcc "$@"\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(kernel_build, "has_amx_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dsray.kernel_build"):
        built = kernel_build.build(tmp_path / "kernels", "avx512bf16")
    assert "building without AMX tiles" in caplog.text and "unrecognized -mamx-tile" in caplog.text
    lib = ctypes.CDLL(str(built))
    assert lib.dsray_use_amx(1) == 0  # no tile code in this build: the kernels keep to AVX512-BF16
    monkeypatch.setenv("CC", shutil.which("gcc"))
    with_tiles = kernel_build.build(tmp_path / "kernels", "avx512bf16")
    assert with_tiles != built  # a compiler that can: the build with the tiles, its own file
