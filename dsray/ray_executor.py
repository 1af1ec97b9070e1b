"""The Ray executor: attention and expert workers as actors in a placement group, driven in lock-step.

Each step the engine hands one ``StepInput`` per attention rank; every attention worker runs its
batch (or idles through the MoE exchanges) and every expert worker serves one round per MoE layer.
A step that loses a worker is run again by the survivors (``dsray/worker_pools.py``: losing,
replacing and scaling workers); an error that is not a lost worker, or nothing left to serve
with, fails the executor with a ``WorkerError`` naming the worker; the rest are killed, so nothing
hangs. Expert placement follows the load through ``rebalance`` (a background load, then a switch
at one step boundary).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.executor import Executor
from dsray.protocol import StepInput, StepOutput
from dsray.worker_pools import MAX_LOSSES_PER_STEP, STUCK_GRACE_S, Replacement, WorkerPools, bundle
from dsray.workers import AttentionWorker, ExpertWorker
from router.expert_map import ExpertMap

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker died or a step timed out; the executor cannot serve any more."""


def _connect(config: EngineConfig, num_cpus_wanted: float) -> None:
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Our own local cluster (never one another process started on this machine), offering at least
        # the logical CPUs the workers ask for (oversubscribed on a small box).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(num_cpus_wanted + 0.999)))


def expert_map_for(config: EngineConfig, args: ModelArgs) -> ExpertMap:
    """The expert map a config asks for; refuses, saying which option to change, one that cannot work."""
    A, E, n = config.num_attention_workers, config.num_expert_workers, args.n_routed_experts
    layers = len(args.moe_layer_ids) or 1
    # No expert workers: the attention workers are the expert ranks (group ranks 0 … A-1).
    ranks, first = (E, A) if E else (A, 0)
    try:
        if config.expert_placement is None:
            return ExpertMap.contiguous(n, ranks, layers, config.num_redundant_experts, first_rank=first)
        placement = config.expert_placement
        if len(placement) != ranks:
            holders = f"the {A} attention workers hold them (num_expert_workers=0)"
            holders = f"num_expert_workers is {E}" if E else holders
            raise ValueError(f"it lists {len(placement)} workers' experts but {holders}")
        extra = sum(len(slots) for slots in placement) - n
        if config.num_redundant_experts and extra != config.num_redundant_experts:
            raise ValueError(
                f"it has {extra} redundant slots but num_redundant_experts is {config.num_redundant_experts}"
            )
        return ExpertMap.from_rank_slots(n, placement, layers, first_rank=first)
    except ValueError as exc:
        option = "expert_placement" if config.expert_placement is not None else "num_redundant_experts"
        raise ValueError(f"{option}: {exc}") from None


class _Held:
    """The actors and placement group of one executor, released once (also when the executor is collected)."""

    def __init__(self):
        self.actors: list = []
        self.pgs: list = []  # the executor's, then one per worker a scale-up added

    def release(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.pgs = []


@dataclass
class _Rebalance:
    """A placement being loaded by the expert workers; every rank switches once all have it."""

    version: int
    expert_map: ExpertMap
    started: float
    deadline: float
    ready: bool = False


class RayExecutor(WorkerPools, Executor):
    def __init__(self, config: EngineConfig):
        self.config = config
        A, E = config.num_attention_workers, config.num_expert_workers
        args = ModelArgs.from_pretrained(config.model)
        self.map = expert_map_for(config, args)  # refused before anything starts
        bundles = [bundle(config.attention_worker_resources)] * A + [bundle(config.expert_worker_resources)] * E
        _connect(config, sum(b.get("CPU", 0) for b in bundles))
        self.dead: str | None = None
        self.map_version = 0
        self._rebalance: _Rebalance | None = None
        self.rebalance_stats = {"ok": 0, "failed": 0, "seconds": 0.0, "slots_moved": 0, "last_error": None}
        self._held = _Held()
        # An executor dropped without shutdown() (a deleted LLM) still frees the cluster for the next one.
        self._finalizer = weakref.finalize(self, self._held.release)
        self.pg = placement_group(bundles, strategy=config.placement_strategy)
        self._held.pgs.append(self.pg)
        self._wait_for_placement(bundles)
        world = A + E
        # Where each worker lives — (placement group, bundle) by ("attention", index) / ("expert", index) —
        # so a replacement starts in its place.
        self._home = {("attention", i): (self.pg, i) for i in range(A)}
        self._home |= {("expert", i): (self.pg, A + i) for i in range(E)}
        self.num_workers_wanted = {"attention": A, "expert": E}  # what scale() last asked for
        self.attention = [self._spawn(AttentionWorker, i, i, world, self.map) for i in range(A)]
        self.experts = [self._spawn(ExpertWorker, i, A + i, world, self.map) for i in range(E)]
        self.attention_index = list(range(A))  # per live attention worker, its bundle
        self.expert_index = list(range(E))  # per live expert worker, its index (bundle A + index)
        self.full_map = self.map  # the placement with every expert worker: a replacement brings it back
        self.degraded: str | None = None  # why fewer workers than configured serve, while they do
        self.losses = {
            "attention_workers_lost": 0,
            "expert_workers_lost": 0,
            "steps_rerun": 0,
            "replacements_joined": 0,
            "last_recovery_s": None,  # from seeing a loss to serving on (regroup, experts loaded)
            "last_join_s": None,  # the step-boundary pause of new workers joining
        }
        self._replacements: list[Replacement] = []
        self._replacement_error: str | None = None
        self._step_id = 0
        self._sync_workers()
        start = time.perf_counter()
        address, port = ray.get(self.workers[0].rendezvous_address.remote())
        self._get([w.join_group.remote(address, port, config.step_timeout_s) for w in self.workers], "group rendezvous")
        blocks = self._get(
            [w.load.remote() for w in self.attention] + [e.load.remote(i) for i, e in enumerate(self.experts)],
            "loading weights",
            timeout=max(600.0, config.step_timeout_s),
        )
        self.num_blocks = min(blocks[:A])
        logger.info("dsray: %d attention + %d expert workers ready in %.1fs", A, E, time.perf_counter() - start)

    def _wait_for_placement(self, bundles: list[dict[str, float]]) -> None:
        try:
            ray.get(self.pg.ready(), timeout=self.config.placement_timeout_s)
        except GetTimeoutError:
            self._held.release()
            raise RuntimeError(
                f"the Ray cluster could not place {self.config.num_attention_workers} attention worker(s) "
                f"{self.config.attention_worker_resources} and {self.config.num_expert_workers} expert worker(s) "
                f"{self.config.expert_worker_resources} (strategy {self.config.placement_strategy}) within "
                f"{self.config.placement_timeout_s:.0f}s; the cluster offers {ray.available_resources()}. "
                "Add nodes with those resources or ask for fewer/smaller workers."
            ) from None

    def _spawn(self, cls, index: int, rank: int, world: int, expert_map: ExpertMap):
        """An actor of ``cls`` (the attention or expert worker ``index``) in its home bundle."""
        c = self.config
        resources = c.attention_worker_resources if cls is AttentionWorker else c.expert_worker_resources
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        pg, bundle = self._home[("attention" if cls is AttentionWorker else "expert", index)]
        actor = ray.remote(cls).options(
            num_cpus=resources.get("CPU", 0),
            num_gpus=resources.get("GPU", 0),
            resources=custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
            max_concurrency=1,
        )
        return actor.remote(c, rank, world, expert_map, int(resources.get("CPU", 1)))

    def _sync_workers(self) -> None:
        """Group-rank order of the live workers (attention first), their names, and what shutdown releases."""
        self.workers = self.attention + self.experts
        self.names = [f"attention worker {i}" for i in self.attention_index]
        self.names += [f"expert worker {i}" for i in self.expert_index]
        self._held.actors = self.workers + [r.actor for r in self._replacements]

    def _gather(self, refs: list, timeout: float) -> tuple[list, dict[int, BaseException]]:
        """Wait up to ``timeout`` for every ref: results, and per failed (or unfinished) ref its error."""
        deadline = time.monotonic() + timeout
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        results: list = [None] * len(refs)
        errors: dict[int, BaseException] = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                for ref in pending:
                    errors[index[ref]] = GetTimeoutError(f"no answer within {timeout:.0f}s")
                break
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except RayError as exc:
                    errors[index[ref]] = exc
        return results, errors

    def _get(self, refs: list, what: str, timeout: float | None = None, names: list[str] | None = None) -> list:
        """Wait for every ref; the first failure (or the deadline) fails the executor, naming the worker."""
        timeout = timeout or self.config.step_timeout_s
        names = names or self.names
        results, errors = self._gather(refs, timeout)
        for i, exc in sorted(errors.items()):
            if isinstance(exc, GetTimeoutError):
                stuck = ", ".join(names[j] for j, e in sorted(errors.items()) if isinstance(e, GetTimeoutError))
                self._fail(f"{what} timed out after {timeout:.0f}s waiting for {stuck}")
            self._fail(f"{names[i]} failed during {what}: {type(exc).__name__}: {exc}")
        return results

    def _fail(self, reason: str) -> None:
        self.dead = reason
        self.shutdown()
        raise WorkerError(reason)

    def execute(self, steps: list[StepInput]) -> list[StepOutput | None]:
        self.check_health()
        n = self._num_micro_batches(steps)
        switch = self._rebalance if self._rebalance is not None and self._rebalance.ready else None
        self._step_id += 1
        for step in steps:
            step.num_micro_batches, step.step_id = n, self._step_id
            step.expert_map = switch.expert_map if switch is not None else None
        # ranks[p]: the engine's rank that attention worker p serves in this step (None: joined during it).
        ranks: list[int | None] = list(range(len(steps)))
        outputs: list[StepOutput | None] = [None] * len(steps)
        for _ in range(MAX_LOSSES_PER_STEP + 1):
            # A rank that finished its part before a loss takes part in the re-run with nothing to do.
            todo = [steps[r] if r is not None and outputs[r] is None else StepInput(num_micro_batches=n) for r in ranks]
            refs = [w.execute.remote(s) for w, s in zip(self.attention, todo)]
            refs += [e.serve_step.remote(n, switch.version if switch is not None else None) for e in self.experts]
            # Past the group's own timeout (peers of a stuck worker fail then), the ones still out are stuck.
            results, errors = self._gather(refs, self.config.step_timeout_s + STUCK_GRACE_S)
            for p, r in enumerate(ranks):
                if r is not None and outputs[r] is None and p not in errors:
                    outputs[r] = results[p]
            if not errors:
                break
            lost = self._recover(errors, "a step")
            for p in lost:
                if ranks[p] is not None:
                    outputs[ranks[p]] = None  # its KV cache went with it: the engine recomputes its sequences
            ranks = [r for p, r in enumerate(ranks) if p not in lost]
            ranks += [None] * (len(self.attention) - len(ranks))  # replacements that joined meanwhile
            switch = None  # a rebalance in flight was dropped; the re-run keeps the survivors' placement
            for step in steps:
                step.expert_map = None
            self.losses["steps_rerun"] += 1
        else:
            self._fail(f"a step lost workers {MAX_LOSSES_PER_STEP + 1} times in a row")
        if switch is not None:
            self._switched(switch)
        elif self._rebalance is not None:
            self._poll_rebalance(
                self._get([w.rebalance_status.remote() for w in self.attention], "reading a rebalance")
                if self.experts_on_attention
                else results[len(self.attention) :]
            )
        return [out if r in ranks else None for r, out in enumerate(outputs)]

    # Rebalancing -----------------------------------------------------------------------------

    def rebalance(self, expert_map: ExpertMap, timeout_s: float | None = None) -> int:
        """Move to ``expert_map`` without stopping: expert workers stage their changed slots in the
        background (copying experts they hold, reading the rest from the checkpoint, checking each), then
        every rank switches at one step boundary (experts write the staged slots in place). A failed or
        timed-out load keeps the current placement (logged, counted in ``rebalance_stats``). Returns the
        new placement's version."""
        if self._rebalance is not None:
            raise RuntimeError(f"a rebalance (placement {self._rebalance.version}) is still in progress")
        if self.degraded is not None:
            raise RuntimeError(f"not while {self.degraded}: the placement returns once replacements join")
        m = self.map
        if (expert_map.num_experts, expert_map.num_ranks, expert_map.first_rank, expert_map.num_layers) != (
            m.num_experts,
            m.num_ranks,
            m.first_rank,
            m.num_layers,
        ):
            raise ValueError(
                f"a new placement must keep {m.num_experts} experts, {m.num_ranks} expert ranks from group rank "
                f"{m.first_rank} and {m.num_layers} MoE layers"
            )
        expert_map = expert_map.aligned_to(m)  # held experts keep their slots: only changed slots are written
        version = self.map_version + 1
        now = time.monotonic()
        timeout = timeout_s if timeout_s is not None else max(60.0, self.config.step_timeout_s)
        self._get([e.prepare.remote(version, expert_map) for e in self.slot_holders], "starting a rebalance")
        self._rebalance = _Rebalance(version, expert_map, now, now + timeout)
        return version

    def _poll_rebalance(self, statuses: list[dict]) -> None:
        r = self._rebalance
        failed = [s["failed"][1] for s in statuses if s["failed"] is not None and s["failed"][0] == r.version]
        if failed:
            self._abandon(f"an expert worker could not load it: {failed[0]}")
        elif all(s["prepared"] == r.version for s in statuses):
            r.ready = True  # every rank switches at the start of the next step
        elif time.monotonic() > r.deadline:
            self._abandon(f"the expert workers did not load it within {r.deadline - r.started:.0f}s")

    def _abandon(self, reason: str) -> None:
        r = self._rebalance
        holders = self.slot_holders
        self._get(
            [e.cancel.remote(r.version) for e in holders],
            "cancelling a rebalance",
            names=self.names[len(self.workers) - len(holders) :],
        )
        self._drop_rebalance(reason)

    def _drop_rebalance(self, reason: str) -> None:
        r, self._rebalance = self._rebalance, None
        self.rebalance_stats["failed"] += 1
        self.rebalance_stats["last_error"] = f"placement {r.version}: {reason}"
        logger.warning("dsray: rebalance to placement %d abandoned, serving on the old one: %s", r.version, reason)

    def _switched(self, r: _Rebalance) -> None:
        moved = sum(
            len(set(new) - set(old))
            for new_layer, old_layer in zip(r.expert_map.placement, self.map.placement)
            for new, old in zip(new_layer, old_layer)
        )
        self.map, self.map_version, self._rebalance = r.expert_map, r.version, None
        self.full_map = r.expert_map
        stats = self.rebalance_stats
        stats["ok"] += 1
        stats["seconds"] += time.monotonic() - r.started
        stats["slots_moved"] += moved
        logger.info("dsray: switched to placement %d (%d slots moved)", r.version, moved)

    @property
    def rebalancing(self) -> bool:
        """A placement change is under way (a rebalance, serving short of workers, workers joining)."""
        return self._rebalance is not None or self.degraded is not None or bool(self._replacements)

    @property
    def experts_on_attention(self) -> bool:
        """No expert workers (``num_expert_workers=0``): the attention workers hold the experts."""
        return self.config.num_expert_workers == 0

    @property
    def slot_holders(self) -> list:
        """The workers that hold the expert map's slots: the expert workers, or the attention workers."""
        return self.attention if self.experts_on_attention else self.experts

    @property
    def num_attention_ranks(self) -> int:
        """The live attention workers: the engine keeps a scheduler for each."""
        return len(self.attention)

    def _num_micro_batches(self, steps: list[StepInput]) -> int:
        """Two when some rank has a batch worth splitting (every rank must run the same number of rounds)."""
        c = self.config
        # Where attention workers compute routed experts (all of them without expert workers, a share with
        # local_expert_share), a second round reads those experts again: a decode step's experts are bound by
        # that read (1x1 on `small`, share 0.5: 0.76x of local without micro-batches, 0.54x with them).
        wanted = c.micro_batch_overlap if c.micro_batch_overlap is not None else not c.local_expert_share
        if not wanted or self.experts_on_attention:
            return 1
        big = any(len(s.seqs) >= 2 and s.num_tokens >= c.micro_batch_min_tokens for s in steps)
        return 2 if big else 1

    def check_health(self) -> None:
        if self.dead:
            raise WorkerError(f"the Ray executor is dead: {self.dead}")

    def expert_load(self) -> list[list[int]]:
        per_rank = self._get([w.expert_load.remote() for w in self.attention], "reading expert load")
        return [[sum(col) for col in zip(*layers)] for layers in zip(*per_rank)]

    def timings(self) -> dict[str, list[dict[str, float]]]:
        """Per-worker cumulative step, exchange and expert-compute seconds (for step-time breakdowns)."""
        got = self._get([w.timings.remote() for w in self.workers], "reading timings")
        return {"attention": got[: self.num_attention_ranks], "expert": got[self.num_attention_ranks :]}

    def locations(self) -> list[dict]:
        """Where each worker runs: node id, pid and group rank (attention first)."""
        return self._get([w.location.remote() for w in self.workers], "locating workers")

    def shutdown(self) -> None:
        """Kill the workers and remove the placement group (idempotent)."""
        self._held.release()
        self.workers = []
        self.pg = None
