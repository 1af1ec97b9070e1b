"""Prometheus metrics of the OpenAI server: request latencies seen by the ingress, engine gauges from LLMServers.

Names follow vLLM's with a ``dsray:`` prefix and a ``model_name`` label. Two sources feed one
registry per ingress replica:

* what the ingress observes while streaming (TTFT, inter-token latency, end-to-end latency,
  token counts, finished requests) — instruments updated as chunks pass through;
* what only a model instance knows (queue, KV cache, prefix cache, expert load) — the
  ``stats()`` dicts of LLMServer replicas, kept per replica id and summed at scrape time by a
  custom collector, since those values live in other processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deploy.messages import StreamChunk

# vLLM's buckets: latencies span sub-millisecond decode steps to minutes-long requests.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0]
ITL_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0]

# A replica whose stats were not refreshed for this long is taken as gone (scaled down, replaced).
STATS_TTL_S = 60.0


# Per-(layer, expert) series do not scale (DeepSeek-V3: 58 x 256 = 14,848 per replica); above this many,
# "auto" exports each layer's hottest experts only (plus per-layer totals and per-expert-worker load).
EXPERT_SERIES_LIMIT = 2048
HOTTEST_EXPERTS_PER_LAYER = 4
EXPERT_METRICS_MODES = ("auto", "full", "bounded")


def expert_load_metrics(
    load: Mapping[Any, Sequence[int]] | Sequence[Sequence[int]], model_name: str, mode: str = "auto"
) -> list[Metric]:
    """``dsray:expert_tokens_total{layer,expert}`` and ``dsray:expert_imbalance{layer}`` from tokens per expert.

    ``load`` maps a MoE layer id to the tokens each of its experts has received so far (a list
    indexed by layer works too). Imbalance is max ÷ mean over a layer's experts: 1.0 is perfect
    balance, and a layer that has seen no tokens yet reports 1.0. ``mode``: ``full`` exports every
    (layer, expert); ``bounded`` only each layer's ``HOTTEST_EXPERTS_PER_LAYER`` hottest experts and
    ``dsray:expert_layer_tokens_total{layer}``; ``auto`` is full up to ``EXPERT_SERIES_LIMIT`` series.
    """
    if mode not in EXPERT_METRICS_MODES:
        raise ValueError(f"expert metrics mode must be one of {EXPERT_METRICS_MODES}, got {mode!r}")
    layers = [
        (layer, list(counts)) for layer, counts in (load.items() if isinstance(load, Mapping) else enumerate(load))
    ]
    bounded = mode == "bounded" or (mode == "auto" and sum(len(c) for _, c in layers) > EXPERT_SERIES_LIMIT)
    tokens = CounterMetricFamily(
        "dsray:expert_tokens",
        "Tokens routed to each expert of each MoE layer (bounded mode: each layer's hottest experts).",
        labels=["model_name", "layer", "expert"],
    )
    layer_tokens = CounterMetricFamily(
        "dsray:expert_layer_tokens", "Routed (token, expert) pairs of each MoE layer.", labels=["model_name", "layer"]
    )
    imbalance = GaugeMetricFamily(
        "dsray:expert_imbalance", "Max over mean tokens per expert of a MoE layer.", labels=["model_name", "layer"]
    )
    for layer, counts in layers:
        experts = range(len(counts))
        if bounded:
            experts = sorted(experts, key=lambda e: -counts[e])[:HOTTEST_EXPERTS_PER_LAYER]
        for expert in experts:
            tokens.add_metric([model_name, str(layer), str(expert)], counts[expert])
        layer_tokens.add_metric([model_name, str(layer)], sum(counts))
        mean = sum(counts) / len(counts) if counts else 0
        imbalance.add_metric([model_name, str(layer)], max(counts) / mean if mean else 1.0)
    return [tokens, layer_tokens, imbalance]


def eplb_metrics(by_replica: dict[str, dict[str, Any]], model_name: str) -> list[Metric]:
    """Expert rebalancing, summed over model instances: rebalances by result, seconds, slots moved,
    and each instance's placement imbalance on its newest load window (``by_replica``: each model
    instance's ``eplb`` stats by replica id)."""
    labels = [model_name]
    replicas = list(by_replica.values())
    rebalances = CounterMetricFamily(
        "dsray:eplb_rebalances", "Expert rebalances by result.", labels=["model_name", "result"]
    )
    for result in ("ok", "failed"):
        rebalances.add_metric([model_name, result], sum(r.get(result, 0) for r in replicas))
    seconds = CounterMetricFamily(
        "dsray:eplb_rebalance_seconds", "Seconds from a rebalance's start to its switch.", labels=["model_name"]
    )
    seconds.add_metric(labels, sum(r.get("seconds", 0.0) for r in replicas))
    moved = CounterMetricFamily("dsray:eplb_slots_moved", "Expert slots that changed expert.", labels=["model_name"])
    moved.add_metric(labels, sum(r.get("slots_moved", 0) for r in replicas))
    ranks = GaugeMetricFamily(
        "dsray:expert_worker_tokens",
        "Routed tokens each expert worker has served (a replicated expert's split over its replicas), per instance.",
        labels=["model_name", "replica", "rank"],
    )
    for replica, r in by_replica.items():
        for rank, value in enumerate(r.get("rank_load") or []):
            ranks.add_metric([model_name, replica, str(rank)], value)
    replicated = GaugeMetricFamily(
        "dsray:eplb_replicated_experts",
        "Logical experts with more than one slot, over all MoE layers.",
        labels=["model_name"],
    )
    replicated.add_metric(labels, sum(r.get("replicated_experts", 0) for r in replicas))
    gauge = GaugeMetricFamily(
        "dsray:eplb_imbalance",
        "Hottest expert worker over the mean on the newest load window, worst instance.",
        labels=["model_name"],
    )
    values = [r["imbalance"] for r in replicas if r.get("imbalance") is not None]
    if values:
        gauge.add_metric(labels, max(values))
    return [rebalances, seconds, moved, ranks, replicated, gauge]


def sum_expert_load(loads: list[Any]) -> dict[str, list[int]]:
    """Element-wise sum of several replicas' expert loads (layer ids as strings)."""
    total: dict[str, list[int]] = {}
    for load in loads:
        layers = load.items() if isinstance(load, Mapping) else enumerate(load)
        for layer, counts in layers:
            acc = total.setdefault(str(layer), [0] * len(counts))
            acc.extend([0] * (len(counts) - len(acc)))
            for i, n in enumerate(counts):
                acc[i] += n
    return total


class EngineStatsCollector(Collector):
    """Exports the latest ``stats()`` of every LLMServer replica seen, summed over replicas."""

    def __init__(self, model_name: str, expert_metrics: str = "auto"):
        self.model_name = model_name
        self.expert_metrics = expert_metrics
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}

    def update(self, stats: dict[str, Any]) -> None:
        now = time.monotonic()
        self._stats[str(stats.get("replica", "0"))] = (now, stats)
        self._stats = {k: v for k, v in self._stats.items() if now - v[0] < STATS_TTL_S}

    def collect(self) -> Iterator[Metric]:
        replicas = [s for _, s in self._stats.values()]
        if not replicas:
            return
        name, labels = self.model_name, [self.model_name]

        def total(key: str) -> float:
            return sum(s.get(key, 0) for s in replicas)

        for metric, key, doc in [
            ("dsray:num_requests_running", "num_requests_running", "Requests in the running batch."),
            ("dsray:num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled."),
        ]:
            gauge = GaugeMetricFamily(metric, doc, labels=["model_name"])
            gauge.add_metric(labels, total(key))
            yield gauge
        usage = GaugeMetricFamily(
            "dsray:kv_cache_usage_perc",
            "Fraction of KV blocks in use (1 = full), mean over replicas.",
            labels=["model_name"],
        )
        usage.add_metric(labels, total("kv_cache_usage_perc") / len(replicas))
        yield usage
        for metric, key, doc in [
            ("dsray:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            ("dsray:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            ("dsray:request_refused", "num_refused", "Requests refused because the queue was full."),
        ]:
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(labels, total(key))
            yield family
        eplb = {str(s.get("replica", "0")): s["eplb"] for s in replicas if s.get("eplb") is not None}
        if eplb:
            yield from eplb_metrics(eplb, name)
        loads = [s["expert_load"] for s in replicas if s.get("expert_load") is not None]
        if loads:
            yield from expert_load_metrics(sum_expert_load(loads), name, self.expert_metrics)


class ServingMetrics:
    """The registry an ingress replica renders at ``/metrics``."""

    def __init__(self, model_name: str, expert_metrics: str = "auto"):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("dsray:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("dsray:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            "dsray:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "dsray:time_to_first_token_seconds",
            "Request received to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dsray:inter_token_latency_seconds",
            "Time between tokens of a stream.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dsray:e2e_request_latency_seconds",
            "Request received to last token.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.engine_stats = EngineStatsCollector(model_name, expert_metrics)
        r.register(self.engine_stats)

    def observer(self) -> RequestObserver:
        return RequestObserver(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """Times one request as its chunks pass the ingress.

    A chunk carrying several tokens (steps merged while the consumer lagged) counts its gap
    once per token, split evenly, so the inter-token histogram still has one sample per token.
    """

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.done = False

    def on_chunk(self, chunk: StreamChunk) -> None:
        num_new = len(chunk.new_token_ids)
        if not num_new:
            return
        now = time.perf_counter()
        name = self.metrics.model_name
        if self.last is None:
            self.metrics.ttft.labels(name).observe(now - self.start)
            num_new -= 1
        else:
            gap = (now - self.last) / num_new
            itl = self.metrics.itl.labels(name)
            for _ in range(num_new):
                itl.observe(gap)
        self.last = now

    def on_finish(self, chunk: StreamChunk) -> None:
        if self.done:
            return
        self.done = True
        m, name = self.metrics, self.metrics.model_name
        m.e2e.labels(name).observe(time.perf_counter() - self.start)
        m.prompt_tokens.labels(name).inc(chunk.num_prompt_tokens)
        m.generation_tokens.labels(name).inc(chunk.num_generated_tokens)
        m.request_success.labels(name, chunk.finish_reason or "abort").inc()
