"""deploy/grafana-dashboard.json: a loadable dashboard whose queries name only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from deploy.messages import StreamChunk
from deploy.metrics import ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def _exported_names() -> set[str]:
    """Every sample name the ingress's /metrics renders once a request and EP stats went through."""
    metrics = ServingMetrics("m")
    observer = metrics.observer()
    observer.on_chunk(StreamChunk(request_id="r", new_text="ab", new_token_ids=[1, 2], num_prompt_tokens=3))
    last = StreamChunk(request_id="r", new_text="c", new_token_ids=[3], finish_reason="length", num_prompt_tokens=3)
    observer.on_chunk(last)
    observer.on_finish(last)
    stats = {
        "replica": "a",
        "num_requests_running": 1,
        "num_requests_waiting": 0,
        "kv_cache_usage_perc": 0.1,
        "prefix_cache_queries": 1,
        "prefix_cache_hits": 0,
        "num_refused": 0,
        "expert_load": [[1, 2, 3, 4]],
        "eplb": {"ok": 1, "failed": 0, "seconds": 1.0, "slots_moved": 2, "imbalance": 1.1},
    }
    metrics.engine_stats.update(stats)
    text = metrics.render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_loads_and_every_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and dashboard["uid"]
    exported = _exported_names()
    wanted = {
        "throughput": "generation_tokens",
        "ttft": "time_to_first_token",
        "itl": "inter_token_latency",
        "kv": "kv_cache_usage",
        "queue": "num_requests_waiting",
        "heatmap": "expert_tokens",
        "imbalance": "imbalance",
        "rebalances": "eplb_rebalances",
    }
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for what, fragment in wanted.items():
        assert any(fragment in e for e in exprs), f"no panel for {what}"
    for expr in exprs:
        for name in re.findall(r"dsray:[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported; exported: {sorted(exported)}"
