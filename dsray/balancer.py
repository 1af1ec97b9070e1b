"""The expert-placement policy of a running engine: watch the load, re-plan, rebalance without stopping.

Every ``eplb_window_steps`` steps the balancer closes a load window (tokens per MoE layer and
expert since the last one, read from the attention ranks) and keeps the last ``eplb_num_windows``.
A rebalance starts every ``eplb_interval_steps`` steps, or when the current placement's imbalance
on the newest window (hottest expert rank ÷ mean, averaged over layers, a replicated expert's
tokens split over its replicas) passes ``eplb_imbalance_threshold``, or on demand (``request``).
The planner (``router/eplb.py``) runs on a thread of its own, incrementally from the current
placement so few slots move; the executor then loads and switches in the background
(``RayExecutor.rebalance``). Nothing here blocks a step for longer than reading the load.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from dsray.engine_config import EngineConfig
from router.eplb import plan_placement
from router.expert_map import ExpertMap

logger = logging.getLogger(__name__)


class ExpertBalancer:
    def __init__(self, executor, config: EngineConfig):
        self.executor = executor
        self.config = config
        self.windows: deque[list[list[int]]] = deque(maxlen=config.eplb_num_windows)
        self.imbalance: float | None = None  # of the current placement on the newest window
        self.num_planned = 0
        self.last_error: str | None = None
        self._steps = 0
        self._since_rebalance = 0
        self._last_load: list[list[int]] | None = None
        self._requested = False
        self._planning: threading.Thread | None = None
        self._planned: ExpertMap | None = None
        self.rank_load: list[float] = []  # tokens each expert worker served since start (replicas share)
        self._replicated: tuple[ExpertMap, int] | None = None

    def observe(self, load: list[list[int]]) -> None:
        """The engine's periodic read of the cumulative load: keep the per-expert-worker totals current."""
        if load:
            per_layer = self.executor.map.as_placement().rank_loads(load)  # [layer][rank]
            self.rank_load = [sum(col) for col in zip(*per_layer)]

    @property
    def enabled(self) -> bool:
        c = self.config
        return bool(c.eplb_interval_steps or c.eplb_imbalance_threshold is not None)

    @property
    def active(self) -> bool:
        """Whether the engine should call ``after_step``: a policy is on, or an asked-for rebalance is under way."""
        return self.enabled or self._requested or self._planning is not None or self._planned is not None

    def request(self) -> None:
        """Rebalance at the next step boundary that can (the admin route's on-demand rebalance)."""
        self._requested = True

    def after_step(self) -> None:
        """Called by the engine after each step."""
        self._steps += 1
        self._since_rebalance += 1
        if self._planned is not None and not self.executor.rebalancing:
            expert_map, self._planned = self._planned, None
            try:
                self.executor.rebalance(expert_map)
            except (RuntimeError, ValueError) as exc:
                self._fail(f"rebalance refused: {exc}")
        if self._steps % self.config.eplb_window_steps == 0 or (self._requested and not self.windows):
            self._close_window()
        if self._planning is not None or self._planned is not None or self.executor.rebalancing or not self.windows:
            return
        c = self.config
        due = c.eplb_interval_steps and self._since_rebalance >= c.eplb_interval_steps
        hot = c.eplb_imbalance_threshold is not None and (self.imbalance or 0.0) > c.eplb_imbalance_threshold
        if self._requested or due or hot:
            self._requested = False
            self._since_rebalance = 0
            self._start_planning()

    def _close_window(self) -> None:
        load = self.executor.expert_load()
        previous, self._last_load = self._last_load, load
        window = load if previous is None else [[a - b for a, b in zip(n, p)] for n, p in zip(load, previous)]
        if sum(map(sum, window)) == 0:
            return
        self.windows.append(window)
        self.imbalance = self.executor.map.as_placement().mean_imbalance(window)

    def _start_planning(self) -> None:
        history = list(self.windows)
        current = self.executor.map
        num_redundant = current.num_redundant

        def plan() -> None:
            try:
                placement = plan_placement(history, current.num_ranks, num_redundant, current=current.as_placement())
                self._planned = ExpertMap(current.num_experts, placement.slots, first_rank=current.first_rank)
                self.num_planned += 1
            except Exception as exc:  # a planning error never reaches the step loop
                self._fail(f"planning failed: {type(exc).__name__}: {exc}")
            finally:
                self._planning = None

        self._planning = threading.Thread(target=plan, name="dsray-eplb-plan", daemon=True)
        self._planning.start()

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        logger.warning("dsray: expert rebalancing: %s", reason)

    def _replicated_experts(self) -> int:
        """Logical experts with more than one slot, over all MoE layers (counted once per placement)."""
        m = self.executor.map
        if self._replicated is None or self._replicated[0] is not m:
            self._replicated = (m, sum(int((m.num_replicas(i) > 1).sum()) for i in range(m.num_layers)))
        return self._replicated[1]

    def stats(self) -> dict:
        """What the metrics export: the executor's rebalance counters, the imbalance gauge and slots per expert."""
        out = dict(self.executor.rebalance_stats)
        out["imbalance"] = self.imbalance
        out["planning_error"] = self.last_error
        out["map_version"] = self.executor.map_version
        out["rank_load"] = self.rank_load
        out["replicated_experts"] = self._replicated_experts()
        return out
