"""Autoscaling of one model instance's worker pools: attention on queue and KV cache, experts on compute.

Serve scales whole model instances (replicas); with the Ray executor each instance also has two
pools that can grow and shrink on their own, between steps (``RayExecutor.scale``):

* **attention** — each rank owns a KV cache and a batch. Requests waiting while the KV cache is
  nearly full (``kv_cache_usage`` ≥ ``attention_kv_high``) mean the ranks hold no more: add one.
  Nothing waiting and the cache mostly empty (< ``attention_kv_low``) for a whole window: remove one
  (its sequences are recomputed on the others, so this is done sparingly).
* **experts** — the share of a step the expert workers spend computing (``compute_seconds`` over
  ``step_seconds`` since the last decision, averaged over them). Above ``experts_busy_high`` the
  experts are the bottleneck: add one; below ``experts_busy_low`` they mostly wait: remove one.

Each pool stays within its ``min``/``max`` (``AutoscalingConfig``; ``deploy/serve.yaml``'s engine
section). Decisions come every ``interval_s`` from the figures of that interval, at most one change
per pool per decision, and none within ``cooldown_s`` of the last change or while workers are still
joining — new workers need a while to load, and a pool that flapped would pay that every time.
"""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attention_min: int = Field(1, ge=1, description="Fewest attention workers.")
    attention_max: int = Field(1, ge=1, description="Most attention workers.")
    experts_min: int = Field(1, ge=1, description="Fewest expert workers.")
    experts_max: int = Field(1, ge=1, description="Most expert workers.")
    interval_s: float = Field(10.0, gt=0, description="Seconds between decisions (the window each one looks at).")
    cooldown_s: float = Field(30.0, ge=0, description="No change to a pool this soon after its last one.")
    attention_kv_high: float = Field(0.85, gt=0, le=1, description="Requests wait and KV use is at least this: grow.")
    attention_kv_low: float = Field(0.25, ge=0, lt=1, description="Nothing waits and KV use is below this: shrink.")
    experts_busy_high: float = Field(0.7, ge=0, le=1, description="Expert workers compute this share or more: grow.")
    experts_busy_low: float = Field(0.2, ge=0, lt=1, description="Expert workers compute less than this: shrink.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        for pool in ("attention", "experts"):
            low, high = getattr(self, f"{pool}_min"), getattr(self, f"{pool}_max")
            if low > high:
                raise ValueError(f"autoscaling: {pool}_min ({low}) is above {pool}_max ({high})")
        return self


class PoolAutoscaler:
    """Decides, every ``interval_s``, whether each pool grows or shrinks by one; ``tick`` runs between steps."""

    def __init__(self, engine, config: AutoscalingConfig):
        self.engine = engine
        self.config = config
        self.decisions: list[tuple[float, str, int]] = []  # (time, pool, new size), newest last
        self._next = time.monotonic() + config.interval_s
        self._last_change = {"attention": -float("inf"), "experts": -float("inf")}
        self._saw_waiting = False
        self._last_timings: tuple[int, float, float] | None = None  # (expert workers, compute s, step s)

    def tick(self, now: float | None = None) -> None:
        """Look at the engine's figures; at the end of an interval, decide and ask the engine to scale."""
        now = time.monotonic() if now is None else now
        self._saw_waiting = self._saw_waiting or any(s.num_waiting for s in self.engine.schedulers)
        if now < self._next:
            return
        self._next = now + self.config.interval_s
        stats = self.engine.stats()
        executor = self.engine.executor
        busy = self._expert_busy_share()
        waiting, self._saw_waiting = self._saw_waiting, False
        if executor.rebalancing:  # workers joining, replacing, or a rebalance: decide next time
            return
        sizes = stats["workers"]
        want = {
            "attention": self._attention_target(sizes["attention"], waiting, stats["kv_cache_usage"]),
            "experts": self._experts_target(sizes["expert"], busy),
        }
        changes = {
            pool: size
            for pool, size in want.items()
            if size != sizes["attention" if pool == "attention" else "expert"]
            and now - self._last_change[pool] >= self.config.cooldown_s
        }
        if not changes:
            return
        for pool, size in changes.items():
            self._last_change[pool] = now
            self.decisions.append((now, pool, size))
        share = f"{busy:.2f}" if busy is not None else "n/a"
        logger.info(
            "dsray: autoscaling to %s (KV use %.2f, waiting %s, experts busy %s)",
            changes,
            stats["kv_cache_usage"],
            waiting,
            share,
        )
        try:
            self.engine.scale(attention=changes.get("attention"), experts=changes.get("experts"))
        except (ValueError, RuntimeError) as exc:  # e.g. no room for a new worker: serving goes on as it is
            logger.warning("dsray: autoscaling to %s failed: %s", changes, exc)

    def _attention_target(self, size: int, waiting: bool, kv_usage: float) -> int:
        c = self.config
        if waiting and kv_usage >= c.attention_kv_high:
            size += 1
        elif not waiting and kv_usage < c.attention_kv_low:
            size -= 1
        return min(max(size, c.attention_min), c.attention_max)

    def _experts_target(self, size: int, busy: float | None) -> int:
        c = self.config
        if busy is not None and busy >= c.experts_busy_high:
            size += 1
        elif busy is not None and busy < c.experts_busy_low:
            size -= 1
        return min(max(size, c.experts_min), c.experts_max)

    def _expert_busy_share(self) -> float | None:
        """Expert compute ÷ step time of the expert workers since the last call (None: no steps in between)."""
        timings = self.engine.executor.timings()["expert"]
        total = (len(timings), sum(t["compute_seconds"] for t in timings), sum(t["step_seconds"] for t in timings))
        last, self._last_timings = self._last_timings, total
        if last is None or last[0] != total[0] or total[2] <= last[2]:  # first look, workers changed, or idle
            return None
        return (total[1] - last[1]) / (total[2] - last[2])
