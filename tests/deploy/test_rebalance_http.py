"""Expert rebalancing and scaling of a served model instance: the admin routes, the metrics, and no
request lost.

An app with expert workers serves the skewed tiny model (gates biased to two experts); requests run
while ``POST /admin/rebalance`` moves the experts, or ``POST /admin/scale`` grows and shrinks the
worker pools; every request finishes with the tokens it would have had anyway, and ``/metrics``
counts the rebalance.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dsray.testing import make_skewed_model

KEY = "admin-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def eplb(server, tmp_path_factory):
    from ray import serve

    from deploy.app import build_app

    model = make_skewed_model(tmp_path_factory.mktemp("skewed") / "tiny")
    args = {
        "model": str(model),
        "api_key": KEY,
        "attention_workers": 1,
        "expert_workers": 2,
        "engine": {
            "num_redundant_experts": 2,
            "max_model_len": 512,
            "kv_cache_memory_gb": 0.05,
            "attention_worker_resources": {"CPU": 0.25},
            "expert_worker_resources": {"CPU": 0.25},
            "eplb_window_steps": 4,
        },
        "llm_server": {"num_cpus": 0},
    }
    serve.run(build_app(args), name="eplb", route_prefix="/eplb")
    try:
        yield f"{server.url}/eplb"
    finally:
        serve.delete("eplb")


def _complete(url: str, i: int) -> list[int]:
    body = {**BODY, "prompt": [5 + i, 6, 7, 8, 9, 10]}
    response = requests.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _rebalances(url: str) -> float:
    text = requests.get(f"{url}/metrics", headers=HEADERS, timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dsray:eplb_rebalances_total" and s.labels.get("result") == "ok":
                return s.value
    return 0.0


def test_admin_rebalance_moves_experts_while_streams_finish_unchanged(eplb):
    assert requests.post(f"{eplb}/admin/rebalance", timeout=30).status_code == 401
    with ThreadPoolExecutor(4) as pool:
        expected = list(pool.map(lambda i: _complete(eplb, i), range(4)))
        assert _rebalances(eplb) == 0
        response = requests.post(f"{eplb}/admin/rebalance", headers=HEADERS, timeout=30)
        assert response.status_code == 202 and response.json() == {"status": "rebalancing"}
        deadline = time.monotonic() + 120
        while _rebalances(eplb) < 1:  # each round of requests drives steps; the switch comes at one of them
            assert time.monotonic() < deadline, "the rebalance never switched"
            assert list(pool.map(lambda i: _complete(eplb, i), range(4))) == expected
    assert [_complete(eplb, i) for i in range(4)] == expected
    text = requests.get(f"{eplb}/metrics", headers=HEADERS, timeout=30).text
    assert 'dsray:expert_worker_tokens{model_name="tiny",rank="1"' in text  # per expert-worker load
    assert "dsray:eplb_imbalance{" in text and "dsray:eplb_slots_moved_total{" in text


def test_eplb_plot_reads_a_running_servers_metrics(eplb, tmp_path):
    from dsray.cli import main

    _complete(eplb, 0)
    png = tmp_path / "served.png"
    argv = ["eplb", "plot", "--url", eplb, "--api-key", KEY, "--ranks", "2", "--redundant", "2", "-o", str(png)]
    assert main(argv) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def _workers(server, app: str = "eplb") -> dict:
    return server.stats(app)["workers"]


def test_admin_scale_grows_and_shrinks_the_pools_while_requests_finish_unchanged(eplb, server):
    assert requests.post(f"{eplb}/admin/scale", json={"experts": 3}, timeout=30).status_code == 401
    for bad in ({}, {"experts": 0}, {"experts": "3"}, {"gpus": 2}, [3]):
        response = requests.post(f"{eplb}/admin/scale", json=bad, headers=HEADERS, timeout=30)
        assert response.status_code == 400, (bad, response.text)
    local = requests.post(f"{server.url}/admin/scale", json={"experts": 2}, headers=server.auth, timeout=30)
    assert local.status_code == 409 and "one process" in local.json()["error"]["message"]

    expected = [_complete(eplb, i) for i in range(4)]
    assert _workers(server) == {"attention": 1, "expert": 2}
    with ThreadPoolExecutor(4) as pool:
        for want in ({"attention": 2, "experts": 3}, {"attention": 1, "experts": 1}):
            response = requests.post(f"{eplb}/admin/scale", json=want, headers=HEADERS, timeout=30)
            assert response.status_code == 202 and response.json() == {"status": "scaling", **want}
            deadline = time.monotonic() + 120
            while _workers(server) != {"attention": want["attention"], "expert": want["experts"]}:
                assert time.monotonic() < deadline, f"never scaled to {want}: {_workers(server)}"
                assert list(pool.map(lambda i: _complete(eplb, i), range(4))) == expected  # drives steps
    assert [_complete(eplb, i) for i in range(4)] == expected
    assert server.stats("eplb")["degraded"] is None
