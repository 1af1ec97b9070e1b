"""Which workers an executor runs with: losing them, replacing them, growing and shrinking the pools.

``WorkerPools`` is the part of ``RayExecutor`` (``dsray/ray_executor.py``) that changes its set of
workers between (or within) steps; the executor keeps the steps, the exchange's group and the
expert placement's rebalancing.

* A lost worker (its process died, or it hung a step past ``step_timeout_s`` + ``STUCK_GRACE_S``):
  ``_recover`` kills it, regroups the survivors in a new step group (a torch.distributed group
  cannot shrink), gives experts no survivor holds to the survivors with room for them (or waits
  for the replacements) and reports the attention ranks lost, whose sequences the engine
  recomputes elsewhere. The executor then runs the step again.
* A replacement starts in the lost worker's placement-group bundle, loads in the background and
  joins at a step boundary (``admit_workers``), bringing the full placement back.
* ``scale`` adds workers (each in a placement group of its own, joining as replacements do) or
  removes the newest (the others take over their experts at once).

While fewer workers serve than wanted, ``degraded`` says why. See ``docs/architecture.md``,
"Failure model".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group

from dsray.workers import AttentionWorker, ExpertWorker
from router.expert_map import ExpertMap

logger = logging.getLogger(__name__)

STUCK_GRACE_S = 5.0  # past step_timeout_s, a worker that has not answered a step is stuck, not slow
MAX_LOSSES_PER_STEP = 3  # a step that loses more workers than this fails the executor
MAX_REPLACEMENT_TRIES = 3  # starts of a replacement worker that failed before the executor gives up on it


@dataclass
class Replacement:
    """A new worker for a lost one, in its bundle: loading (weights, KV cache), then joining."""

    cls: type  # AttentionWorker or ExpertWorker
    index: int  # attention index (= bundle), or expert index (= bundle - A = its rank in the full placement)
    actor: object
    loaded: object  # ObjectRef of its load()
    tries: int


def kill(actor) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


def bundle(resources: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


class WorkerPools:
    """Membership of ``RayExecutor``'s worker pools (a mix-in: it uses the executor's ``_get``, ``_fail``,
    ``_spawn``, ``_sync_workers`` and rebalance state)."""

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
            kill(self.workers[i])  # a stuck one is still running: it must not rejoin anything
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
        if self._short_of_a_role():
            self._await_replacements()  # nothing to serve with until one is in
        elif (no_room := self._no_room(survivors := self._survivors_map())) is not None:
            self.degraded += f"; the survivors cannot hold the lost experts ({no_room})"
            self._await_replacements()
        else:
            self._regroup(survivors)
        self.losses["last_recovery_s"] = round(time.perf_counter() - start, 3)
        logger.warning("dsray: serving on after %.2fs: %s", self.losses["last_recovery_s"], self.degraded)
        return lost_attention

    def _short_of_a_role(self) -> bool:
        """No attention worker left, or no expert worker where they hold the experts."""
        return not self.attention or (not self.experts and not self.experts_on_attention)

    def _set_degraded(self, why: str) -> None:
        want = self.num_workers_wanted
        experts = f"{len(self.experts)} of {want['expert']} expert workers"
        if self.experts_on_attention:
            experts = "no expert workers: the attention workers hold the experts"
        self.degraded = (
            f"serving with {len(self.attention)} of {want['attention']} attention workers and {experts} ({why}; "
            "replacements are starting)"
        )

    def _no_room(self, expert_map: ExpertMap) -> str | None:
        """Why some live slot holder (of the map's first ranks) cannot hold what ``expert_map`` gives it, or None."""
        holders = self.slot_holders
        refs = [e.room_for.remote(expert_map, j) for j, e in enumerate(holders[: expert_map.num_ranks])]
        names = self.names[len(self.workers) - len(holders) :]
        why = [w for w in self._get(refs, "a regroup", names=names) if w is not None]
        return "; ".join(why) if why else None

    def _survivors_map(self) -> ExpertMap:
        """What the live slot holders hold, plus the experts no one holds any more (read from the checkpoint)."""
        holders = self.slot_holders
        held = self._get(
            [e.held.remote() for e in holders], "a regroup", names=self.names[len(self.workers) - len(holders) :]
        )
        return ExpertMap.covering(self.map.num_experts, held, first_rank=self._first_expert_rank())

    def _first_expert_rank(self) -> int:
        """The group rank of expert rank 0: after the attention ranks, or 0 where they hold the experts."""
        return 0 if self.experts_on_attention else len(self.attention)

    def _replace(self, cls, index: int, tries: int = 1) -> None:
        """Start a new worker in the lost one's bundle (``index``: its attention index, or its expert index =
        its rank in the full placement, whose slots it loads; an attention worker that holds slots loads those
        of its index too)."""
        actor = self._spawn(cls, index, 0, len(self.workers), self.full_map)
        loaded = actor.load.remote(index)
        self._replacements.append(Replacement(cls, index, actor, loaded, tries))
        self._held.actors.append(actor)

    def admit_workers(self, block: bool = False) -> bool:
        """At a step boundary: once every replacement has loaded, all workers regroup — the expert workers
        under the full placement (survivors give back the slots they took over), new attention workers as
        the last ranks. ``block``: wait for them, up to ``step_timeout_s``. A replacement that fails to
        start is retried, then given up on. True when workers joined."""
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
                    kill(r.actor)
                    if r.tries < MAX_REPLACEMENT_TRIES:
                        self._replace(r.cls, r.index, r.tries + 1)
                    else:
                        logger.warning("dsray: giving up on replacing %s %d: %r", r.cls.__name__, r.index, exc)
            if not waiting and all(r.loaded in ready for r in self._replacements):
                break
            if time.monotonic() >= deadline:
                return False
        if not self._replacements:
            return False
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
        self._sync_workers()
        # The full placement's slots by index; a rank still missing leaves its experts to the others.
        indexes = self.attention_index if self.experts_on_attention else self.expert_index
        held = [self.full_map.rank_slots(k) for k in indexes]
        self._regroup(ExpertMap.covering(self.map.num_experts, held, first_rank=self._first_expert_rank()))
        self.losses["replacements_joined"] += len(joining)
        self.losses["last_join_s"] = round(time.perf_counter() - start, 3)
        logger.info("dsray: %d new worker(s) joined in %.2fs", len(joining), self.losses["last_join_s"])
        if (len(self.attention), len(self.experts)) == tuple(self.num_workers_wanted.values()):
            self.degraded = None
        else:
            self._set_degraded("some could not be replaced")
        return True

    def _await_replacements(self) -> None:
        """Nothing to serve with until the replacements are in (no attention or no expert worker left, or
        the survivors cannot hold the lost experts): wait for them, up to ``step_timeout_s``."""
        self.admit_workers(block=True)
        if self._replacements or self._short_of_a_role():
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
        address, port = ray.get(self.attention[0].rendezvous_address.remote())
        timeout = self.config.step_timeout_s
        refs = [w.regroup.remote(address, port, i, world, timeout, expert_map) for i, w in enumerate(self.attention)]
        refs += [
            e.regroup.remote(address, port, A + j, world, timeout, expert_map, j) for j, e in enumerate(self.experts)
        ]
        self._get(refs, "a regroup", timeout=max(600.0, timeout))
        self.map = expert_map

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
        if self.experts_on_attention:
            raise ValueError(
                "scale: the attention workers hold the experts (num_expert_workers=0), so the pools cannot change "
                "while serving; start with expert workers (num_expert_workers >= 1) to scale them"
            )
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
                pg = placement_group([bundle(resources)], strategy=c.placement_strategy)
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
            kill(actor)
        return removed
