"""The metrics exporter on its own: engine stats summed over replicas, expert-load metrics from a fake stats dict."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from deploy.messages import StreamChunk
from deploy.metrics import ServingMetrics, expert_load_metrics


def _samples(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _stats(replica: str, **extra) -> dict:
    return {
        "replica": replica,
        "num_requests_running": 3,
        "num_requests_waiting": 1,
        "kv_cache_usage_perc": 0.5,
        "prefix_cache_queries": 100,
        "prefix_cache_hits": 40,
        "num_refused": 2,
        **extra,
    }


def test_engine_gauges_and_counters_sum_over_replicas():
    metrics = ServingMetrics("m")
    metrics.engine_stats.update(_stats("a"))
    metrics.engine_stats.update(_stats("b", kv_cache_usage_perc=0.25))
    metrics.engine_stats.update(_stats("a", num_requests_running=5))  # a newer snapshot replaces the old one
    samples = _samples(metrics)
    label = (("model_name", "m"),)
    assert samples[("dsray:num_requests_running", label)] == 8
    assert samples[("dsray:num_requests_waiting", label)] == 2
    assert samples[("dsray:kv_cache_usage_perc", label)] == 0.375
    assert samples[("dsray:prefix_cache_queries_total", label)] == 200
    assert samples[("dsray:prefix_cache_hits_total", label)] == 80
    assert samples[("dsray:request_refused_total", label)] == 4


def test_expert_load_becomes_tokens_and_imbalance():
    load = {1: [10, 10, 10, 10], 2: [40, 0, 0, 0], 3: [0, 0, 0, 0]}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in expert_load_metrics(load, "m")
        for s in family.samples
    }
    assert samples[("dsray:expert_tokens_total", (("expert", "0"), ("layer", "2"), ("model_name", "m")))] == 40
    assert samples[("dsray:expert_tokens_total", (("expert", "3"), ("layer", "1"), ("model_name", "m")))] == 10
    assert samples[("dsray:expert_imbalance", (("layer", "1"), ("model_name", "m")))] == 1.0
    assert samples[("dsray:expert_imbalance", (("layer", "2"), ("model_name", "m")))] == 4.0
    assert samples[("dsray:expert_imbalance", (("layer", "3"), ("model_name", "m")))] == 1.0  # no tokens yet


def test_expert_load_in_stats_is_summed_and_exported():
    metrics = ServingMetrics("m")
    metrics.engine_stats.update(_stats("a", expert_load=[[1, 2], [3, 4]]))
    metrics.engine_stats.update(_stats("b", expert_load={"0": [1, 0], "1": [0, 4]}))
    samples = _samples(metrics)
    key = ("dsray:expert_tokens_total", (("expert", "1"), ("layer", "1"), ("model_name", "m")))
    assert samples[key] == 8
    assert samples[("dsray:expert_imbalance", (("layer", "0"), ("model_name", "m")))] == 1.0  # [2, 2]
    assert samples[("dsray:expert_imbalance", (("layer", "1"), ("model_name", "m")))] == 8 / 5.5  # [3, 8]


def test_no_stats_yet_exports_only_observations():
    text = ServingMetrics("m").render().decode()
    assert "dsray:num_requests_running" not in text and "dsray:e2e_request_latency_seconds" in text


def test_request_observer_records_ttft_itl_e2e_and_tokens():
    metrics = ServingMetrics("m")
    observer = metrics.observer()
    for i, ids in enumerate([[1], [2], [3, 4, 5]]):
        observer.on_chunk(StreamChunk("r", "x", ids, num_prompt_tokens=7, num_generated_tokens=i + 1))
    observer.on_finish(StreamChunk("r", "", [], finish_reason="stop", num_prompt_tokens=7, num_generated_tokens=5))
    observer.on_finish(StreamChunk("r", "", [], finish_reason="stop", num_prompt_tokens=7, num_generated_tokens=5))
    samples = _samples(metrics)
    label = (("model_name", "m"),)
    assert samples[("dsray:time_to_first_token_seconds_count", label)] == 1
    assert samples[("dsray:inter_token_latency_seconds_count", label)] == 4  # one per token after the first
    assert samples[("dsray:e2e_request_latency_seconds_count", label)] == 1  # finishing twice counts once
    assert samples[("dsray:prompt_tokens_total", label)] == 7
    assert samples[("dsray:generation_tokens_total", label)] == 5
    assert samples[("dsray:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 1


def test_rebalancing_counters_sum_over_instances_and_the_gauge_takes_the_worst():
    metrics = ServingMetrics("m")
    eplb = {"ok": 2, "failed": 1, "seconds": 3.5, "slots_moved": 12, "imbalance": 1.08, "rank_load": [30.0, 10.0]}
    metrics.engine_stats.update(_stats("a", eplb=eplb))
    metrics.engine_stats.update(_stats("b", eplb={**eplb, "ok": 1, "failed": 0, "imbalance": 1.4}))
    samples = _samples(metrics)
    label = (("model_name", "m"),)
    assert samples[("dsray:eplb_rebalances_total", (("model_name", "m"), ("result", "ok")))] == 3
    assert samples[("dsray:eplb_rebalances_total", (("model_name", "m"), ("result", "failed")))] == 1
    assert samples[("dsray:eplb_rebalance_seconds_total", label)] == 7.0
    assert samples[("dsray:eplb_slots_moved_total", label)] == 24
    assert samples[("dsray:eplb_imbalance", label)] == 1.4
    assert samples[("dsray:expert_worker_tokens", (("model_name", "m"), ("rank", "0"), ("replica", "a")))] == 30.0


def test_expert_series_are_bounded_for_big_models_and_full_on_request():
    load = [[(layer * 7 + e * 13) % 101 for e in range(256)] for layer in range(58)]  # DeepSeek-V3's shape

    def names(mode):
        return [(s.name, s.labels) for f in expert_load_metrics(load, "m", mode) for s in f.samples]

    bounded = [labels for name, labels in names("auto") if name == "dsray:expert_tokens_total"]
    assert len(bounded) == 58 * 4  # each layer's four hottest experts, not 14,848 series
    hottest = max(range(256), key=lambda e: load[0][e])
    assert {"model_name": "m", "layer": "0", "expert": str(hottest)} in bounded
    assert sum(1 for name, _ in names("auto") if name == "dsray:expert_layer_tokens_total") == 58
    assert sum(1 for name, _ in names("full") if name == "dsray:expert_tokens_total") == 58 * 256
    small = [[1, 2, 3, 4]] * 3
    assert (
        sum(1 for f in expert_load_metrics(small, "m") for s in f.samples if s.name.endswith("tokens_total")) == 12 + 3
    )
