"""The pool autoscaler's decisions, from the figures an engine reports (no workers needed), and its config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dsray.autoscaler import AutoscalingConfig, PoolAutoscaler
from dsray.engine_config import EngineConfig


class FakeEngine:
    """What the autoscaler reads (stats, schedulers' queues, expert timings) and the scale calls it makes."""

    def __init__(self, attention: int = 1, experts: int = 2):
        self.workers = {"attention": attention, "expert": experts}
        self.kv_usage, self.waiting = 0.5, 0
        self.compute = self.step = 0.0
        self.rebalancing = False
        self.calls: list[tuple[int | None, int | None]] = []
        self.executor = SimpleNamespace(timings=self._timings)

    @property
    def schedulers(self):
        return [SimpleNamespace(num_waiting=self.waiting)]

    def stats(self) -> dict:
        return {"kv_cache_usage": self.kv_usage, "num_waiting": self.waiting, "workers": dict(self.workers)}

    def _timings(self) -> dict:
        n = self.workers["expert"]
        return {"expert": [{"compute_seconds": self.compute / n, "step_seconds": self.step / n}] * n}

    def scale(self, attention=None, experts=None):
        self.calls.append((attention, experts))
        if attention:
            self.workers["attention"] = attention
        if experts:
            self.workers["expert"] = experts

    def run(self, scaler: PoolAutoscaler, t: float, busy: float = 0.5, seconds: float = 10.0) -> None:
        """One interval of serving in which the experts computed ``busy`` of the step time."""
        self.executor.rebalancing = self.rebalancing
        self.compute += busy * seconds
        self.step += seconds
        scaler.tick(now=t)


CONFIG = AutoscalingConfig(attention_min=1, attention_max=3, experts_min=1, experts_max=3, interval_s=10, cooldown_s=25)


def test_experts_grow_when_busy_and_shrink_when_idle_within_bounds_and_cooldown():
    engine = FakeEngine(attention=1, experts=2)
    scaler = PoolAutoscaler(engine, CONFIG)
    scaler._next = 0
    engine.run(scaler, 0)  # first look: no expert figure yet, the attention pool is fine
    assert engine.calls == []
    engine.run(scaler, 10, busy=0.9)
    assert engine.calls == [(None, 3)]
    engine.run(scaler, 20, busy=0.95)  # at max already (and in cooldown): nothing
    engine.run(scaler, 40, busy=0.95)  # workers changed at the last look: the first figure is dropped
    engine.run(scaler, 50, busy=0.95)
    assert engine.calls == [(None, 3)]
    engine.run(scaler, 60, busy=0.05)
    assert engine.calls == [(None, 3), (None, 2)]
    engine.run(scaler, 70, busy=0.05)  # cooldown: 10 s since the last change
    engine.run(scaler, 80, busy=0.05)  # first figure after the change
    assert engine.calls[-1] == (None, 2)
    engine.run(scaler, 90, busy=0.05)
    assert engine.calls[-1] == (None, 1)
    for t in (120, 130, 140):
        engine.run(scaler, t, busy=0.0)
    assert engine.workers["expert"] == 1  # never below experts_min


def test_attention_grows_on_a_queue_with_a_full_cache_and_shrinks_when_empty():
    engine = FakeEngine(attention=1, experts=1)
    scaler = PoolAutoscaler(engine, CONFIG)
    scaler._next = 0
    engine.waiting, engine.kv_usage = 5, 0.95
    engine.run(scaler, 0)
    assert engine.calls == [(2, None)]
    engine.waiting, engine.kv_usage = 5, 0.5  # a queue, but room in the cache: the scheduler's business
    engine.run(scaler, 30)
    assert engine.calls == [(2, None)]
    engine.waiting, engine.kv_usage = 0, 0.1
    engine.run(scaler, 40)
    assert engine.calls == [(2, None), (1, None)]
    engine.run(scaler, 70)
    assert engine.workers["attention"] == 1  # never below attention_min


def test_nothing_changes_while_workers_are_joining():
    engine = FakeEngine(attention=1, experts=1)
    scaler = PoolAutoscaler(engine, CONFIG)
    scaler._next = 0
    engine.rebalancing, engine.waiting, engine.kv_usage = True, 3, 1.0
    engine.run(scaler, 0)
    assert engine.calls == []
    engine.rebalancing = False
    engine.run(scaler, 10)
    assert engine.calls == [(2, None)]


def test_bad_bounds_and_starts_outside_them_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="experts_min"):
        AutoscalingConfig(experts_min=3, experts_max=2)
    with pytest.raises(ValidationError, match="needs executor='ray'"):
        EngineConfig(model=str(tmp_path), autoscaling={"experts_max": 2})
    with pytest.raises(ValidationError, match=r"start with experts workers within \[experts_min, experts_max\]"):
        EngineConfig(
            model=str(tmp_path), executor="ray", num_expert_workers=4, autoscaling={"experts_min": 1, "experts_max": 2}
        )
