"""The Ray executor: attention and expert workers as actors in one placement group, driven in lock-step.

Each step the engine hands one ``StepInput`` per attention rank; every attention worker runs its
batch (or idles through the MoE exchanges) and every expert worker serves one round per MoE layer.
A worker that dies or a step that outlives ``step_timeout_s`` fails the step with a ``WorkerError``
naming the worker; the executor then kills the rest (they may sit in a collective) and reports
itself dead, so nothing hangs.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dsray.config import ModelArgs
from dsray.engine_config import EngineConfig
from dsray.executor import Executor
from dsray.protocol import StepInput, StepOutput
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


def _bundle(resources: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


def expert_map_for(config: EngineConfig, args: ModelArgs) -> ExpertMap:
    """The expert map a config asks for; refuses, saying which option to change, one that cannot work."""
    A, E, n = config.num_attention_workers, config.num_expert_workers, args.n_routed_experts
    layers = len(args.moe_layer_ids) or 1
    try:
        if config.expert_placement is None:
            return ExpertMap.contiguous(n, E, layers, config.num_redundant_experts, first_rank=A)
        placement = config.expert_placement
        if len(placement) != E:
            raise ValueError(f"it lists {len(placement)} expert workers but num_expert_workers is {E}")
        extra = sum(len(slots) for slots in placement) - n
        if config.num_redundant_experts and extra != config.num_redundant_experts:
            raise ValueError(
                f"it has {extra} redundant slots but num_redundant_experts is {config.num_redundant_experts}"
            )
        return ExpertMap.from_rank_slots(n, placement, layers, first_rank=A)
    except ValueError as exc:
        option = "expert_placement" if config.expert_placement is not None else "num_redundant_experts"
        raise ValueError(f"{option}: {exc}") from None


class _Held:
    """The actors and placement group of one executor, released once (also when the executor is collected)."""

    def __init__(self):
        self.actors: list = []
        self.pg = None

    def release(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


@dataclass
class _Rebalance:
    """A placement being loaded by the expert workers; every rank switches once all have it."""

    version: int
    expert_map: ExpertMap
    started: float
    deadline: float
    ready: bool = False


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig):
        self.config = config
        A, E = config.num_attention_workers, config.num_expert_workers
        args = ModelArgs.from_pretrained(config.model)
        self.map = expert_map_for(config, args)  # refused before anything starts
        bundles = [_bundle(config.attention_worker_resources)] * A + [_bundle(config.expert_worker_resources)] * E
        _connect(config, sum(b.get("CPU", 0) for b in bundles))
        self.num_attention_ranks = A
        self.dead: str | None = None
        self.map_version = 0
        self._rebalance: _Rebalance | None = None
        self.rebalance_stats = {"ok": 0, "failed": 0, "seconds": 0.0, "slots_moved": 0, "last_error": None}
        self._held = _Held()
        # An executor dropped without shutdown() (a deleted LLM) still frees the cluster for the next one.
        self._finalizer = weakref.finalize(self, self._held.release)
        self.pg = self._held.pg = placement_group(bundles, strategy=config.placement_strategy)
        self._wait_for_placement(bundles)
        world = A + E
        self.attention = [self._spawn(AttentionWorker, i, world, config.attention_worker_resources) for i in range(A)]
        self.experts = [self._spawn(ExpertWorker, A + i, world, config.expert_worker_resources) for i in range(E)]
        self.workers = self._held.actors = self.attention + self.experts
        self.names = [f"attention worker {i}" for i in range(A)] + [f"expert worker {i}" for i in range(E)]
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

    def _spawn(self, cls, rank: int, world: int, resources: dict[str, float]):
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        actor = ray.remote(cls).options(
            num_cpus=resources.get("CPU", 0),
            num_gpus=resources.get("GPU", 0),
            resources=custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            max_concurrency=1,
        )
        return actor.remote(self.config, rank, world, self.map, int(resources.get("CPU", 1)))

    def _get(self, refs: list, what: str, timeout: float | None = None) -> list:
        """Wait for every ref; the first failure (or the deadline) fails the executor, naming the worker."""
        deadline = time.monotonic() + (timeout or self.config.step_timeout_s)
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        results: list = [None] * len(refs)
        while pending:
            remaining = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(remaining, 0))
            if not ready:
                stuck = ", ".join(self.names[index[r]] for r in pending)
                self._fail(f"{what} timed out after {timeout or self.config.step_timeout_s:.0f}s waiting for {stuck}")
            for ref in ready:
                try:
                    results[index[ref]] = ray.get(ref)
                except (RayActorError, RayError) as exc:
                    self._fail(f"{self.names[index[ref]]} failed during {what}: {type(exc).__name__}: {exc}")
        return results

    def _fail(self, reason: str) -> None:
        self.dead = reason
        self.shutdown()
        raise WorkerError(reason)

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        self.check_health()
        n = self._num_micro_batches(steps)
        switch = self._rebalance if self._rebalance is not None and self._rebalance.ready else None
        for step in steps:
            step.num_micro_batches = n
            step.expert_map = switch.expert_map if switch is not None else None
        refs = [w.execute.remote(s) for w, s in zip(self.attention, steps)]
        refs += [e.serve_step.remote(n, switch.version if switch is not None else None) for e in self.experts]
        results = self._get(refs, "a step")
        if switch is not None:
            self._switched(switch)
        elif self._rebalance is not None:
            self._poll_rebalance(results[self.num_attention_ranks :])
        return results[: self.num_attention_ranks]

    # Rebalancing -----------------------------------------------------------------------------

    def rebalance(self, expert_map: ExpertMap, timeout_s: float | None = None) -> int:
        """Move to ``expert_map`` without stopping: expert workers stage their changed slots in the
        background (copying experts they hold, reading the rest from the checkpoint, checking each), then
        every rank switches at one step boundary (experts write the staged slots in place). A failed or
        timed-out load keeps the current placement (logged, counted in ``rebalance_stats``). Returns the
        new placement's version."""
        if self._rebalance is not None:
            raise RuntimeError(f"a rebalance (placement {self._rebalance.version}) is still in progress")
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
        self._get([e.prepare.remote(version, expert_map) for e in self.experts], "starting a rebalance")
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
        r, self._rebalance = self._rebalance, None
        self._get([e.cancel.remote(r.version) for e in self.experts], "cancelling a rebalance")
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
        stats = self.rebalance_stats
        stats["ok"] += 1
        stats["seconds"] += time.monotonic() - r.started
        stats["slots_moved"] += moved
        logger.info("dsray: switched to placement %d (%d slots moved)", r.version, moved)

    @property
    def rebalancing(self) -> bool:
        return self._rebalance is not None

    def _num_micro_batches(self, steps: list[StepInput]) -> int:
        """Two when some rank has a batch worth splitting (every rank must run the same number of rounds)."""
        c = self.config
        if not c.micro_batch_overlap:
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
