"""ModelRunner: owns a model, its paged latent cache and its sequences' state; runs one step of a ragged batch."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attention.kv_cache import allocate_latent_cache, num_blocks_for_budget
from attention.metadata import AttentionMetadata
from dsray import cpu_kernels, decode_step, kernel_threads
from dsray.cpu_load import OthersLoad
from dsray.model import Transformer
from dsray.protocol import SeqStep, StepInput, StepOutput
from dsray.sampler import SampleRequest, sample
from dsray.sampling_params import SamplingParams


@contextlib.contextmanager
def _torch_threads(n: int):
    """Torch (and with it the kernels) on ``n`` threads, at least one, inside this block."""
    was = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(was)


@dataclass
class SeqState:
    """What a worker keeps of a running sequence between steps."""

    token_ids: list[int]  # prompt, then every token sampled so far
    num_prompt_tokens: int
    params: SamplingParams
    block_table: list[int]

    def sample_request(self) -> SampleRequest:
        return SampleRequest(self.params, self.token_ids, self.num_prompt_tokens)


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache_memory_bytes: int,
        block_size: int,
        max_num_blocks: int | None = None,
        front_end_cores: int = 0,
    ):
        args = model.args
        self.front_end_cores = front_end_cores
        self.others_load = OthersLoad()  # read only when front_end_cores is set
        self.model = model
        self.block_size = block_size
        self.dtype = model.model.embed_tokens.weight.dtype
        self.device = model.model.embed_tokens.weight.device
        num_blocks = num_blocks_for_budget(
            cache_memory_bytes, args.num_hidden_layers, block_size, args.kv_cache_dim, self.dtype
        )
        if max_num_blocks is not None:
            num_blocks = min(num_blocks, max_num_blocks)
        if num_blocks < 1:
            raise ValueError(
                f"kv cache budget of {cache_memory_bytes} bytes holds no block of {block_size} tokens; raise it"
            )
        self.kv_cache = allocate_latent_cache(
            args.num_hidden_layers, num_blocks, block_size, args.kv_cache_dim, self.dtype, self.device
        )
        self.seqs: dict[str, SeqState] = {}
        self._applied_step = 0
        self._decode_step: decode_step.DecodeStep | None = None  # built at the first step that can take it

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.shape[1] // self.block_size

    def apply(self, step: StepInput) -> None:
        """Bring the sequences' state up to date with ``step``: forget, add, extend block tables.

        Once per step: a step that failed part-way (a worker was lost) and runs again finds its changes
        applied already (its KV writes are idempotent: the same values land in the same slots)."""
        if step.step_id and step.step_id == self._applied_step:
            return
        self._applied_step = step.step_id
        for request_id in step.dropped:
            self.seqs.pop(request_id, None)
        for new in step.new:
            self.seqs[new.request_id] = SeqState(list(new.token_ids), new.num_prompt_tokens, new.params, [])
        for s in step.seqs:
            self.seqs[s.request_id].block_table.extend(s.new_block_ids)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Write the step's latents, run the model, sample for the sequences that need a token.

        With ``num_micro_batches`` 2 the batch is split in two halves of about equal tokens that
        interleave around the MoE exchange; a rank with nothing to run still takes part in every
        exchange of the step (its micro-batches are empty).
        """
        self.apply(step)
        with self._threads_for(sum(s.num_new_tokens for s in step.seqs), len(step.seqs)):
            return self._execute(step)

    def _threads_for(self, num_tokens: int, num_seqs: int):
        """A decode-sized step on the CPU kernels runs torch single-threaded (``kernel_threads.torch_single_threaded``);
        a step of more sequences than the kernels take leaves ``front_end_cores`` to the server streaming them,
        while other processes keep that many cores busy (``dsray/cpu_load.py``).

        Measured on 2 cores (``benchmarks/serve.py``, 1,000 clients): on tiny, two engine threads beside a busy
        front end ran at 0.7-0.8 of one, each thread waiting on the other whenever a server process took its
        core; on ``small`` the front end streams a few hundred tokens a second and stays nearly idle, and
        keeping the second thread raised serving from 281 to 351 tok/s. At one client the front end is
        idle between chunks and every thread stays."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        if num_tokens <= cpu_kernels.GEMM_MAX_ROWS and cpu_kernels.available():
            return kernel_threads.torch_single_threaded()
        if (
            self.front_end_cores
            and num_seqs > cpu_kernels.GEMM_MAX_ROWS
            and self.others_load.busy(self.front_end_cores)
        ):
            return _torch_threads(torch.get_num_threads() - self.front_end_cores)
        return contextlib.nullcontext()

    def _execute(self, step: StepInput) -> StepOutput:
        groups = _split(step.seqs, step.num_micro_batches)
        batches = [self._batch(group) for group in groups]
        fast = self._fast_decode(batches)
        # Per micro-batch: the rows whose logits are wanted (each sequence's last new token, if it samples).
        last: list[list[int]] = [[] for _ in groups]
        wanted = []
        i = 0
        for b, group in enumerate(groups):
            end = 0
            for s in group:
                end += s.num_new_tokens
                if s.needs_sample:
                    last[b].append(end - 1)
                    wanted.append(i)
                i += 1
        parts: list[torch.Tensor] = []

        def logits_of(b: int, hidden: torch.Tensor) -> None:
            # As soon as micro-batch b is done: the next ones' last rows are still at the experts.
            if last[b]:
                parts.append(self.model.compute_logits(hidden[last[b]]))  # [N_b, V]

        if fast is not None:
            logits_of(0, fast(*batches[0], self.kv_cache))
        else:
            self.model.forward_micro_batches(batches, self.kv_cache, each=logits_of)
        results: list = [None] * len(step.seqs)
        if wanted:
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, V], in step order
            states = [self.seqs[step.seqs[i].request_id] for i in wanted]
            for i, state, r in zip(wanted, states, sample(logits, [st.sample_request() for st in states])):
                results[i] = r
                state.token_ids.append(r.token_id)
        return StepOutput(results)

    def _fast_decode(self, batches: list) -> decode_step.DecodeStep | None:
        """The one-call decode step (``dsray/decode_step.py``) if this step and the model can take it."""
        if len(batches) != 1 or not decode_step.DecodeStep.takes(batches[0][1], batches[0][0], self.kv_cache):
            return None
        if self._decode_step is None or not self._decode_step.valid_for(self.model):
            self._decode_step = None
            if decode_step.why_not(self.model) is None:
                self._decode_step = decode_step.DecodeStep(self.model)
        return self._decode_step

    def _batch(self, seqs: list[SeqStep]) -> tuple[torch.Tensor, AttentionMetadata | None]:
        if not seqs:
            return torch.empty(0, dtype=torch.int64, device=self.device), None
        states = [self.seqs[s.request_id] for s in seqs]
        meta = AttentionMetadata.build(
            [st.block_table for st in states],
            [s.num_computed for s in seqs],
            [s.num_new_tokens for s in seqs],
            self.block_size,
            self.device,
        )
        tokens = [
            t for s, st in zip(seqs, states) for t in st.token_ids[s.num_computed : s.num_computed + s.num_new_tokens]
        ]
        return torch.tensor(tokens, device=self.device), meta


def _split(seqs: list[SeqStep], parts: int) -> list[list[SeqStep]]:
    """``seqs`` in ``parts`` contiguous groups of about equal tokens (some may be empty)."""
    if parts == 1:
        return [seqs]
    total = sum(s.num_new_tokens for s in seqs)
    groups: list[list[SeqStep]] = [[] for _ in range(parts)]
    done = 0
    for s in seqs:
        # The group this sequence's middle token falls in: halves of about equal work.
        g = min(parts - 1, (2 * done + s.num_new_tokens) * parts // (2 * total)) if total else 0
        groups[g].append(s)
        done += s.num_new_tokens
    return groups
