"""The Ray executor: attention and expert workers as actors in one placement group, driven in lock-step.

Each step the engine hands one ``StepInput`` per attention rank; every attention worker runs its
batch (or idles through the MoE exchanges) and every expert worker serves one round per MoE layer.

Losing an expert worker loses no request. When one dies (or a step outlives ``step_timeout_s``
and it is the one stuck), its peers' collectives fail at once (gloo sees the closed sockets); the
executor then builds a new step group from the survivors (a torch.distributed group cannot
shrink), gives the lost slots to survivors that hold replicas of them — or loads the experts that
had none onto the survivors from the checkpoint — and runs the failed step again (workers apply a
step's changes once, and its KV writes land in the same slots). A replacement worker is started
in the lost one's placement-group bundle; once it has loaded its slots it joins at a step
boundary and the full placement returns. Anything else — a lost attention worker, an error that
is not a lost worker, no expert worker left and no replacement within ``step_timeout_s`` — fails
the executor with a ``WorkerError`` naming the worker; the rest are killed, so nothing hangs.
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


STUCK_GRACE_S = 5.0  # past step_timeout_s, a worker that has not answered a step is stuck, not slow


def _kill(actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


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


MAX_LOSSES_PER_STEP = 3  # a step that loses more workers than this fails the executor
MAX_REPLACEMENT_TRIES = 3  # starts of a replacement worker that failed before the executor gives up on it


@dataclass
class _Replacement:
    """A new worker for a lost one, in its bundle: loading (weights, KV cache), then joining."""

    cls: type  # AttentionWorker or ExpertWorker
    index: int  # attention index (= bundle), or expert index (= bundle - A = its rank in the full placement)
    actor: object
    loaded: object  # ObjectRef of its load()
    tries: int


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
        self._replacements: list[_Replacement] = []
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
            self._poll_rebalance(results[len(self.attention) :])
        return [out if r in ranks else None for r, out in enumerate(outputs)]

    # Losing and replacing workers ------------------------------------------------------------

    def _recover(self, errors: dict[int, BaseException], what: str) -> set[int]:
        """After ``what`` failed with ``errors`` (per worker index): drop the lost workers, serve on with
        the survivors in a new group, start replacements. Returns the positions of the attention workers
        lost. Fails the executor when the failure is not a lost worker, or nothing is left to serve with."""
        start = time.perf_counter()
        lost = sorted(i for i, exc in errors.items() if isinstance(exc, (RayActorError, GetTimeoutError)))
        if not lost:  # every worker answered, some with an error: a bug, not a loss
            i, exc = min(errors.items())
            self._fail(f"{self.names[i]} failed during {what}: {type(exc).__name__}: {exc}")
        A = len(self.attention)
        names = [self.names[i] for i in lost]
        detail = "; ".join(f"{self.names[i]}: {type(errors[i]).__name__}: {errors[i]}" for i in lost)
        logger.warning("dsray: %s lost during %s; serving on without: %s", ", ".join(names), what, detail)
        for i in lost:
            _kill(self.workers[i])  # a stuck one is still running: it must not rejoin anything
        if self._rebalance is not None:
            self._drop_rebalance(f"{', '.join(names)} lost while it loaded")
        lost_attention, lost_experts = {i for i in lost if i < A}, {i - A for i in lost if i >= A}
        self.losses["attention_workers_lost"] += len(lost_attention)
        self.losses["expert_workers_lost"] += len(lost_experts)
        for p in sorted(lost_attention):
            self._replace(AttentionWorker, self.attention_index[p])
        for j in sorted(lost_experts):
            self._replace(ExpertWorker, self.expert_index[j])
        self.attention = [w for p, w in enumerate(self.attention) if p not in lost_attention]
        self.attention_index = [k for p, k in enumerate(self.attention_index) if p not in lost_attention]
        self.experts = [e for j, e in enumerate(self.experts) if j not in lost_experts]
        self.expert_index = [k for j, k in enumerate(self.expert_index) if j not in lost_experts]
        self._sync_workers()
        self._set_degraded(f"{', '.join(names)} lost")
        if not self.attention or not self.experts:
            self._await_replacements()  # nothing to serve with until one is in
        elif (no_room := self._no_room(survivors := self._survivors_map())) is not None:
            self.degraded += f"; the survivors cannot hold the lost experts ({no_room})"
            self._await_replacements()
        else:
            self._regroup(survivors)
        self.losses["last_recovery_s"] = round(time.perf_counter() - start, 3)
        logger.warning("dsray: serving on after %.2fs: %s", self.losses["last_recovery_s"], self.degraded)
        return lost_attention

    def _set_degraded(self, why: str) -> None:
        want = self.num_workers_wanted
        self.degraded = (
            f"serving with {len(self.attention)} of {want['attention']} attention and {len(self.experts)} of "
            f"{want['expert']} expert workers ({why}; replacements are starting)"
        )

    def _no_room(self, expert_map: ExpertMap) -> str | None:
        """Why some live expert worker (of the map's first ranks) cannot hold what ``expert_map`` gives it, or None."""
        refs = [e.room_for.remote(expert_map, j) for j, e in enumerate(self.experts[: expert_map.num_ranks])]
        why = [w for w in self._get(refs, "a regroup", names=self.names[len(self.attention) :]) if w is not None]
        return "; ".join(why) if why else None

    def _survivors_map(self) -> ExpertMap:
        """What the live expert workers hold, plus the experts no one holds any more (read from the checkpoint)."""
        held = self._get([e.held.remote() for e in self.experts], "a regroup", names=self.names[len(self.attention) :])
        return ExpertMap.covering(self.map.num_experts, held, first_rank=len(self.attention))

    def _replace(self, cls, index: int, tries: int = 1) -> None:
        """Start a new worker in the lost one's bundle (``index``: its attention index, or its expert index =
        its rank in the full placement, whose slots it loads)."""
        actor = self._spawn(cls, index, 0, len(self.workers), self.full_map)
        loaded = actor.load.remote() if cls is AttentionWorker else actor.load.remote(index)
        self._replacements.append(_Replacement(cls, index, actor, loaded, tries))
        self._held.actors.append(actor)

    def admit_workers(self, block: bool = False) -> None:
        """At a step boundary: once every replacement has loaded, all workers regroup — the expert workers
        under the full placement (survivors give back the slots they took over), new attention workers as
        the last ranks. ``block``: wait for them, up to ``step_timeout_s``. A replacement that fails to
        start is retried, then given up on."""
        deadline = time.monotonic() + (self.config.step_timeout_s if block else 0)
        while self._replacements:
            refs = [r.loaded for r in self._replacements]
            ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=max(0, deadline - time.monotonic()))
            for r in [r for r in self._replacements if r.loaded in ready]:
                try:
                    ray.get(r.loaded)
                except RayError as exc:  # it could not start or load: try again, a few times
                    self._replacement_error = f"{type(exc).__name__}: {exc}"
                    self._replacements.remove(r)
                    _kill(r.actor)
                    if r.tries < MAX_REPLACEMENT_TRIES:
                        self._replace(r.cls, r.index, r.tries + 1)
                    else:
                        logger.warning("dsray: giving up on replacing %s %d: %r", r.cls.__name__, r.index, exc)
            if not waiting and all(r.loaded in ready for r in self._replacements):
                break
            if time.monotonic() >= deadline:
                return
        if not self._replacements:
            return
        start = time.perf_counter()
        joining, self._replacements = self._replacements, []
        for r in joining:
            if r.cls is AttentionWorker:  # a new rank, after the others: the engine adds a scheduler for it
                self.attention.append(r.actor)
                self.attention_index.append(r.index)
        by_index = dict(zip(self.expert_index, self.experts))
        by_index |= {r.index: r.actor for r in joining if r.cls is ExpertWorker}
        self.expert_index = sorted(by_index)
        self.experts = [by_index[k] for k in self.expert_index]
        self.num_attention_ranks = len(self.attention)
        self._sync_workers()
        held = [self.full_map.rank_slots(k) for k in self.expert_index]  # lost ones' experts: to the others
        self._regroup(ExpertMap.covering(self.map.num_experts, held, first_rank=len(self.attention)))
        self.losses["replacements_joined"] += len(joining)
        self.losses["last_join_s"] = round(time.perf_counter() - start, 3)
        logger.info("dsray: %d new worker(s) joined in %.2fs", len(joining), self.losses["last_join_s"])
        if (len(self.attention), len(self.experts)) == tuple(self.num_workers_wanted.values()):
            self.degraded = None
        else:
            self._set_degraded("some could not be replaced")

    def _await_replacements(self) -> None:
        """Nothing to serve with until the replacements are in (no attention or no expert worker left, or
        the survivors cannot hold the lost experts): wait for them, up to ``step_timeout_s``."""
        self.admit_workers(block=True)
        if self._replacements or not self.attention or not self.experts:
            why = (
                f"the last replacement failed: {self._replacement_error}"
                if self._replacement_error
                else "the cluster has no room for one, or it is slow to start"
            )
            self._fail(
                f"{self.degraded}: nothing left to serve with, and no replacement joined within "
                f"{self.config.step_timeout_s:.0f}s (step_timeout_s): {why}"
            )

    def _regroup(self, expert_map: ExpertMap) -> None:
        """Every live worker joins a new step group and serves under ``expert_map`` (expert workers first
        load the slots it gives them that they lack)."""
        A, world = len(self.attention), len(self.workers)
        self.num_attention_ranks = A
        address, port = ray.get(self.attention[0].rendezvous_address.remote())
        timeout = self.config.step_timeout_s
        refs = [w.regroup.remote(address, port, i, world, timeout, expert_map) for i, w in enumerate(self.attention)]
        refs += [
            e.regroup.remote(address, port, A + j, world, timeout, expert_map, j) for j, e in enumerate(self.experts)
        ]
        self._get(refs, "a regroup", timeout=max(600.0, timeout))
        self.map = expert_map

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
        r = self._rebalance
        self._get(
            [e.cancel.remote(r.version) for e in self.experts],
            "cancelling a rebalance",
            names=self.names[self.num_attention_ranks :],
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

    # Scaling ---------------------------------------------------------------------------------

    def scale(self, attention: int | None = None, experts: int | None = None) -> list[int]:
        """Grow or shrink the attention and expert pools while serving (call between steps).

        New workers start in a placement group of their own, load in the background (their weights; an
        expert worker the slots a placement for the new count gives it, which takes experts from the
        fullest ranks) and join at a step boundary (``admit_workers``), as replacements do. Removed
        workers — the newest first — go at once: the remaining expert workers take over their experts
        (reading them from the checkpoint during the regroup), and the removed attention ranks are
        returned so that the engine moves their sequences (recomputed, as after a lost worker).
        Refused while workers are still joining or replacing lost ones."""
        A, E = len(self.attention), len(self.experts)
        A2, E2 = attention or A, experts or E
        n = self.map.num_experts
        if A2 < 1 or not 1 <= E2 <= n:
            raise ValueError(f"scale: attention must be >= 1 and experts in [1, {n}]; got {A2} and {E2}")
        if self._replacements or self.degraded is not None:
            raise RuntimeError("scale: workers are still joining or being replaced; try again when they are in")
        if self._rebalance is not None:
            self._abandon("the pools are being scaled")
        self.num_workers_wanted = {"attention": A2, "expert": E2}
        if E2 != E:
            layers = self.map.num_layers
            held = [self.full_map.rank_slots(k) for k in self.expert_index[:E2]] + [[[]] * layers] * (E2 - E)
            full = ExpertMap.covering(n, held, first_rank=A2, balance=True)
            if E2 < E and (no_room := self._no_room(full)) is not None:
                raise ValueError(
                    f"scale: the remaining expert workers cannot hold the removed ones' experts: {no_room}"
                )
            self.full_map = full
        removed = self._remove_workers(A - A2 if A2 < A else 0, E - E2 if E2 < E else 0)
        self._add_workers(A2 - A if A2 > A else 0, E2 - E if E2 > E else 0)
        logger.info("dsray: scaling to %d attention and %d expert workers", A2, E2)
        return removed

    def _add_workers(self, num_attention: int, num_experts: int) -> None:
        """Start new workers, each in a new placement group; they join once loaded (``admit_workers``)."""
        c = self.config
        new = [("attention", c.attention_worker_resources)] * num_attention
        new += [("expert", c.expert_worker_resources)] * num_experts
        for role, resources in new:
            cls = AttentionWorker if role == "attention" else ExpertWorker
            live = self.attention_index if role == "attention" else self.expert_index
            taken = set(live) | {r.index for r in self._replacements if r.cls is cls}
            index = min(set(range(len(taken) + 1)) - taken)  # an expert's index is its rank in the placement
            if (role, index) not in self._home:  # else the bundle a removed worker left
                pg = placement_group([_bundle(resources)], strategy=c.placement_strategy)
                self._held.pgs.append(pg)
                self._home[(role, index)] = (pg, 0)
            self._replace(cls, index)

    def _remove_workers(self, num_attention: int, num_experts: int) -> list[int]:
        """Let the last ``num_attention`` attention and ``num_experts`` expert workers go; the others regroup
        under the full placement (taking over the removed ranks' experts). Returns the removed attention ranks."""
        if not (num_attention or num_experts):
            return []
        A, E = len(self.attention), len(self.experts)
        gone = self.attention[A - num_attention :] + self.experts[E - num_experts :]
        removed = list(range(A - num_attention, A))
        self.attention, self.attention_index = (
            self.attention[: A - num_attention],
            self.attention_index[: A - num_attention],
        )
        self.experts, self.expert_index = self.experts[: E - num_experts], self.expert_index[: E - num_experts]
        self._sync_workers()
        held = [self.full_map.rank_slots(k) for k in self.expert_index]
        self._regroup(ExpertMap.covering(self.map.num_experts, held, first_rank=len(self.attention)))
        for actor in gone:
            _kill(actor)
        return removed

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
