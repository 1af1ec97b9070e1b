"""LLMEngine: requests in, token streams out — tokenizer, scheduler, executor and the step loop.

``step()`` is the whole engine loop: schedule → run the batch → postprocess (append tokens,
detokenize, stop strings). It is synchronous and single-threaded; ``AsyncLLM`` runs it on a
thread for the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from dsray import cpu_sched
from dsray.autoscaler import PoolAutoscaler
from dsray.balancer import ExpertBalancer
from dsray.config import ModelArgs
from dsray.engine.block_manager import BlockManager
from dsray.engine.scheduler import Scheduler, SchedulerOutput
from dsray.engine.sequence import Sequence
from dsray.engine_config import EngineConfig
from dsray.errors import ContextLengthError, DeadlineExceededError, InvalidRequestError, RequestIdInUseError
from dsray.executor import Executor, create_executor
from dsray.outputs import RequestOutput
from dsray.protocol import NewSeq, SeqStep, StepInput
from dsray.sampling_params import SamplingParams
from dsray.tokenizer import IncrementalDetokenizer, Tokenizer

EXPERT_LOAD_REFRESH_S = 2.0


@dataclass
class _WorkerView:
    """What one attention rank's worker knows: its sequences (with how many of their blocks it has)
    and the ids it may forget at the next step."""

    blocks_sent: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def forget(self, request_id: str) -> None:
        if self.blocks_sent.pop(request_id, None) is not None:
            self.dropped.append(request_id)


@dataclass
class _Request:
    seq: Sequence
    output: RequestOutput
    detokenizer: IncrementalDetokenizer | None
    full_text: str = ""  # text including a possible stop string, for matching across steps


class RequestChecks:
    """Tokenizing and validating prompts before they are queued: what the engine and its front ends
    (``AsyncLLM`` in engine-process mode) share. Needs ``args``, ``tokenizer``, ``max_model_len``
    and ``max_seq_len`` (the longest sequence the KV cache of one attention rank holds)."""

    args: ModelArgs
    tokenizer: Tokenizer | None
    max_model_len: int
    max_seq_len: int
    _next_id: int = 0

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "this model has no tokenizer.json: give the prompt as token ids", param="prompt"
                )
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.args.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.args.vocab_size}); got {bad[:5]}", param="prompt"
            )
        return ids

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Refuse what cannot fit the model's context; fill ``max_tokens=None`` with what is left."""
        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token must fit)"
            )
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.max_model_len - n)
        elif n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"this model's context of {self.max_model_len} tokens; lower max_tokens"
            )
        if n + params.max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"prompt + max_tokens = {n + params.max_tokens} tokens exceeds the KV cache "
                f"({self.max_seq_len} tokens); lower max_tokens or give the cache more memory"
            )
        return params


class LLMEngine(RequestChecks):
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        cpu_sched.as_compute()  # in a cluster dsray started, this process computes: back to SCHED_OTHER
        self.config = config
        self.args = ModelArgs.from_pretrained(config.model)
        try:
            self.tokenizer: Tokenizer | None = Tokenizer(config.model)
        except FileNotFoundError:
            self.tokenizer = None  # token-id prompts still work
        self.executor = executor or create_executor(config)
        self.max_model_len = config.max_model_len or self.args.max_position_embeddings
        eos = self.args.eos_token_ids[0] if self.args.eos_token_ids else None
        # One scheduler per data-parallel attention rank: each rank owns the KV cache of its sequences.
        self.schedulers = [
            Scheduler(
                config.scheduler,
                BlockManager(
                    self.executor.num_blocks, config.scheduler.block_size, config.scheduler.enable_prefix_caching
                ),
                eos,
            )
            for _ in range(self.executor.num_attention_ranks)
        ]
        self.requests: dict[str, _Request] = {}
        # Requests the engine refused after queueing them (deadline passed before their first token),
        # with the error; ``EngineCore`` reports and clears them after each step.
        self.refused: list[tuple[str, Exception]] = []
        self._rank_of: dict[str, int] = {}
        self._views = [_WorkerView() for _ in self.schedulers]
        # Expert placement that follows the load: only where experts live on expert workers.
        self.balancer = ExpertBalancer(self.executor, config) if hasattr(self.executor, "rebalance") else None
        # Worker pools that follow the load (Ray executor, when configured).
        self.autoscaler = PoolAutoscaler(self, config.autoscaling) if config.autoscaling is not None else None
        self._next_id = 0
        self._expert_load: list[list[int]] = []
        self._expert_load_time = 0.0

    @property
    def scheduler(self) -> Scheduler:
        """The first (with one attention rank, the only) scheduler."""
        return self.schedulers[0]

    @property
    def max_seq_len(self) -> int:
        return self.scheduler.max_seq_len  # every rank's cache has the same size

    def expert_load(self) -> list[list[int]]:
        """Tokens routed per (MoE layer, expert) since start, as of the last refresh (≤ 2 s old).

        Refreshed by ``step`` on the engine's own thread, so readers on other threads (metrics)
        never call into the workers themselves.
        """
        return self._expert_load

    def _refresh_expert_load(self, now: float) -> None:
        if now - self._expert_load_time >= EXPERT_LOAD_REFRESH_S:
            self._expert_load = self.executor.expert_load()
            self._expert_load_time = now
            if self.balancer is not None:
                self.balancer.observe(self._expert_load)

    def stats(self) -> dict[str, float]:
        """Load and cache figures summed over attention ranks (for metrics and health)."""
        bms = [s.block_manager for s in self.schedulers]
        return {
            "num_running": sum(s.num_running for s in self.schedulers),
            "num_waiting": sum(s.num_waiting for s in self.schedulers),
            "kv_cache_usage": sum(b.usage for b in bms) / len(bms),
            "num_preemptions": sum(s.num_preemptions for s in self.schedulers),
            "prefix_cache_queries": sum(b.num_prefix_queries for b in bms),
            "prefix_cache_hits": sum(b.num_prefix_hits for b in bms),
            **({"eplb": self.balancer.stats()} if self.balancer is not None else {}),
            # Why fewer workers than configured serve (a lost worker not yet replaced), else None.
            "degraded": getattr(self.executor, "degraded", None),
            "workers": {"attention": len(self.schedulers), "expert": len(getattr(self.executor, "experts", []))},
        }

    # Requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_ids: list[int] | None = None,
    ) -> str:
        """Validate and queue a request; raises ``ValueError`` saying what is wrong, changing nothing."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.tokenize(prompt)
        params = self.validate(ids, params)
        request_id = request_id or self.new_request_id()
        if request_id in self.requests:
            raise RequestIdInUseError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, ids, params)
        # Least-loaded attention rank; ties go to the lowest rank.
        rank = min(
            range(len(self.schedulers)), key=lambda r: self.schedulers[r].num_running + self.schedulers[r].num_waiting
        )
        self.schedulers[rank].add(seq)
        self._rank_of[request_id] = rank
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        output = RequestOutput(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            logprobs=[] if params.logprobs is not None else None,
            arrival_time=time.monotonic(),
        )
        self.requests[request_id] = _Request(seq, output, detok)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Abort a request; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        rank = self._rank_of.pop(request_id)
        self.schedulers[rank].abort(request_id)
        self._views[rank].forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.schedulers)

    # The loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns an output for every request that advanced or finished.

        Every attention rank steps together (ranks with nothing to run still take part in the
        MoE all-to-all), so a step schedules all ranks, then runs them as one.
        """
        self.admit_workers()
        outs = [s.schedule() for s in self.schedulers]
        updates = self._expired(outs)
        if all(o.is_empty for o in outs):
            return updates
        steps = [self._step_input(view, o) for view, o in zip(self._views, outs)]
        results = self.executor.execute(steps)
        now = time.monotonic()
        for sched, view, out, result in zip(self.schedulers, self._views, outs, results):
            if result is None:
                continue  # this rank's worker was lost: its sequences move below
            sampled = [r.token_id if r is not None else None for r in result.results]
            by_id = {s.seq.request_id: r for s, r in zip(out.scheduled, result.results)}
            for seq in sched.postprocess(out, sampled):
                req = self.requests.get(seq.request_id)
                if req is None:
                    continue
                self._update(sched, req, seq.output_token_ids[-1], by_id[seq.request_id].logprobs, now)
                updates.append(req.output)
                if req.output.finished:
                    del self.requests[seq.request_id]
                    self._rank_of.pop(seq.request_id, None)
            for s in out.scheduled:
                if s.seq.is_finished:
                    view.forget(s.seq.request_id)
        if any(result is None for result in results):
            self._move_lost_ranks([r for r, result in enumerate(results) if result is None])
        self._refresh_expert_load(now)
        if self.balancer is not None and self.balancer.active:
            self.balancer.after_step()
        return updates

    def admit_workers(self) -> bool:
        """Between steps: let in the workers ready to join (replacements, a scale-up's), and autoscale.
        True when workers joined (the stats changed)."""
        joined = self.executor.admit_workers()
        self._add_ranks()
        if self.autoscaler is not None:
            self.autoscaler.tick()
        return joined

    def _add_ranks(self) -> None:
        """A scheduler (with an empty KV cache) for each attention rank the executor added, after the others."""
        c = self.config.scheduler
        eos = self.args.eos_token_ids[0] if self.args.eos_token_ids else None
        while len(self.schedulers) < self.executor.num_attention_ranks:
            block_manager = BlockManager(self.executor.num_blocks, c.block_size, c.enable_prefix_caching)
            self.schedulers.append(Scheduler(c, block_manager, eos))
            self._views.append(_WorkerView())

    def _move_lost_ranks(self, lost: list[int]) -> None:
        """Attention ranks ``lost`` are gone (lost, or scaled down) with their KV cache: their sequences
        go, in scheduling order, to the least-loaded remaining ranks (or the replacements), to be
        recomputed from their tokens — a stream goes on where it was, as after a preemption."""
        moved = []
        for rank in sorted(lost, reverse=True):
            del self._views[rank]
            moved += self.schedulers.pop(rank).release_all()
        self._add_ranks()
        for seq in moved:
            if seq.request_id not in self.requests:
                continue
            rank = min(range(len(self.schedulers)), key=lambda r: self.schedulers[r].num_unfinished)
            self.schedulers[rank].add(seq)
        self._rank_of = {rid: r for r, sched in enumerate(self.schedulers) for rid in sched.request_ids}

    def _expired(self, outs: list[SchedulerOutput]) -> list[RequestOutput]:
        """Outputs of the requests the schedulers ended by deadline: started ones finish with "length"
        and ``stop_reason="deadline"`` (no new token this step); the others go to ``refused``."""
        updates = []
        for rank, out in enumerate(outs):
            for seq in out.expired:
                req = self.requests.pop(seq.request_id, None)
                self._rank_of.pop(seq.request_id, None)
                self._views[rank].forget(seq.request_id)
                if req is None:
                    continue
                if not seq.num_output_tokens:
                    deadline_s = seq.sampling_params.deadline_s
                    self.refused.append(
                        (
                            seq.request_id,
                            DeadlineExceededError(
                                f"deadline_s ({deadline_s:g} s) passed before the request could start"
                            ),
                        )
                    )
                    continue
                output = req.output
                output.new_token_ids, output.new_text = [], ""
                output.finish_reason, output.stop_reason = seq.finish_reason, seq.stop_reason
                updates.append(output)
        return updates

    def scale(self, attention: int | None = None, experts: int | None = None) -> None:
        """Grow or shrink the attention and expert worker pools while serving (``RayExecutor.scale``): new
        workers join between steps once loaded; removed attention ranks' sequences move to the others."""
        if not hasattr(self.executor, "scale"):
            raise ValueError("scaling needs the Ray executor (executor='ray'): the local one is one process")
        self._move_lost_ranks(self.executor.scale(attention, experts))

    def request_rebalance(self) -> bool:
        """Re-plan the expert placement from the load seen so far and move to it without stopping
        serving; False when experts do not live on expert workers (the local executor)."""
        if self.balancer is None:
            return False
        self.balancer.request()
        return True

    def _step_input(self, view: _WorkerView, out: SchedulerOutput) -> StepInput:
        """What changed for one rank's worker since its last step (see ``dsray/protocol.py``)."""
        for seq in out.preempted:
            view.forget(seq.request_id)  # its KV is gone: re-admission sends its tokens again
        step = StepInput()
        for s in out.scheduled:
            seq = s.seq
            sent = view.blocks_sent.get(seq.request_id)
            if sent is None:
                step.new.append(NewSeq(seq.request_id, seq.all_token_ids, seq.num_prompt_tokens, seq.sampling_params))
                sent = 0
            table = seq.block_table
            step.seqs.append(
                SeqStep(seq.request_id, s.num_new_tokens, s.num_computed_tokens, table[sent:], s.needs_sample)
            )
            view.blocks_sent[seq.request_id] = len(table)
        step.dropped, view.dropped = view.dropped, []
        return step

    def _update(
        self, sched: Scheduler, req: _Request, token_id: int, logprobs: dict[int, float] | None, now: float
    ) -> None:
        seq, output = req.seq, req.output
        params = seq.sampling_params
        output.token_ids = list(seq.output_token_ids)
        output.new_token_ids = [token_id]
        output.num_cached_tokens = seq.num_cached_tokens
        if output.first_token_time is None:
            output.first_token_time = now
        if output.logprobs is not None and logprobs is not None:
            output.logprobs.append(logprobs)
        new_text = ""
        if req.detokenizer is not None:
            new_text = req.detokenizer.add(token_id)
            req.full_text += new_text
            stop = _find_stop(req.full_text, len(new_text), params.stop)
            if stop is not None and not seq.is_finished:
                stop_str, at = stop
                cut = at + len(stop_str) if params.include_stop_str_in_output else at
                new_text = req.full_text[len(output.text) : cut] if cut > len(output.text) else ""
                req.full_text = req.full_text[:cut]
                sched.finish(seq, "stop", stop_str)
        output.new_text = new_text
        output.text += new_text
        if seq.is_finished:
            output.finish_reason = seq.finish_reason
            output.stop_reason = seq.stop_reason


def _find_stop(text: str, num_new: int, stops: list[str]) -> tuple[str, int] | None:
    """Earliest stop string that ends in the newly added text: (stop, index where it starts)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - num_new - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[1]):
            best = (stop, at)
    return best
