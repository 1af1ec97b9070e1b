"""The served API over raw HTTP: malformed bodies, request ids, auth on every route but /health, metrics text."""

from __future__ import annotations

import os

import pytest
import requests


def _error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_json_is_400(http, server):
    response = http.post(f"{server.url}/v1/completions", data=b'{"prompt": "x", ', timeout=30)
    assert _error(response, 400)["code"] == "invalid_json"
    response = http.post(f"{server.url}/v1/chat/completions", data=b"", timeout=30)
    assert _error(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stop": [1, 2]}, "stop"),
        ({"prompt": "x", "surprise": True}, "surprise"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, None),
        (["not", "an", "object"], None),
    ],
)
def test_wrong_types_are_400_not_422(http, server, body, param):
    response = http.post(f"{server.url}/v1/completions", json=body, timeout=30)
    error = _error(response, 400)
    assert error["type"] == "BadRequestError"
    if param is not None:
        assert error["param"].split(".")[0] == param


def test_chat_body_errors(http, server):
    url = f"{server.url}/v1/chat/completions"
    assert _error(http.post(url, json={"messages": []}, timeout=30), 400)["param"] == "messages"
    bad_role = {"messages": [{"role": "wizard", "content": "x"}]}
    assert _error(http.post(url, json=bad_role, timeout=30), 400)["param"].startswith("messages")
    top_without_logprobs = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    _error(http.post(url, json=top_without_logprobs, timeout=30), 400)


def test_batch_of_prompts_is_refused(http, server):
    response = http.post(f"{server.url}/v1/completions", json={"prompt": ["a", "b"]}, timeout=30)
    assert "one prompt per request" in _error(response, 400)["message"]


def test_out_of_vocab_token_ids_are_400(http, server):
    response = http.post(f"{server.url}/v1/completions", json={"prompt": [10**9]}, timeout=30)
    _error(response, 400)


def test_request_id_is_honoured_and_echoed(http, server):
    headers = {"x-request-id": "my-request-42"}
    body = {"prompt": "hi", "max_tokens": 2}
    response = http.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "my-request-42"
    assert response.json()["id"] == "cmpl-my-request-42"
    generated = http.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert generated.headers["x-request-id"] and generated.json()["id"] == f"cmpl-{generated.headers['x-request-id']}"
    error = http.post(f"{server.url}/v1/completions", json={"prompt": 1}, headers=headers, timeout=30)
    assert error.headers["x-request-id"] == "my-request-42"


def test_auth_on_every_route_but_health(server):
    for method, path in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/admin/rebalance"),
    ]:
        response = requests.request(method, f"{server.url}{path}", json={}, timeout=30)
        error = _error(response, 401)
        assert error["type"] == "AuthenticationError" and "Missing API key" in error["message"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


def test_rebalancing_an_instance_without_expert_workers_is_a_conflict(http, server):
    response = http.post(f"{server.url}/admin/rebalance", timeout=30)
    assert "--expert-workers" in _error(response, 409)["message"]


def test_unknown_route_is_an_openai_404(http, server):
    assert _error(http.get(f"{server.url}/v1/nothing", timeout=30), 404)["type"] == "NotFoundError"


def test_sse_framing(http, server):
    body = {"prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with http.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.content.decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_metrics_text(http, server):
    http.post(f"{server.url}/v1/completions", json={"prompt": "count me", "max_tokens": 3}, timeout=30)
    text = http.get(f"{server.url}/metrics", timeout=30).text
    for name in [
        "dsray:num_requests_running",
        "dsray:num_requests_waiting",
        "dsray:kv_cache_usage_perc",
        "dsray:prompt_tokens_total",
        "dsray:generation_tokens_total",
        "dsray:request_success_total",
        "dsray:time_to_first_token_seconds_bucket",
        "dsray:inter_token_latency_seconds_bucket",
        "dsray:e2e_request_latency_seconds_bucket",
        "dsray:prefix_cache_queries_total",
        "dsray:prefix_cache_hits_total",
    ]:
        assert f"{name}{{" in text, name
    assert 'model_name="tiny"' in text and 'finished_reason="length"' in text


def _listener_process(port: int) -> str | None:
    """The command name of the process listening on TCP ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
    return None


def test_http_reaches_the_ingress_through_haproxy(http, server):
    """The fixture starts its cluster as `dsray serve` does: HAProxy, not Serve's Python proxy, holds the port."""
    from deploy import launch

    if not launch.fast_ingress_env() and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ:
        pytest.skip("fast ingress is off (DSRAY_SERVE_FAST_INGRESS=0) or this Ray has no HAProxy mode")
    assert _listener_process(int(server.url.rsplit(":", 1)[1])) == "haproxy"
    assert http.get(f"{server.url}/v1/models", timeout=30).status_code == 200
