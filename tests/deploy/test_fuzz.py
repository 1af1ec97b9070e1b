"""Hypothesis fuzz of request bodies: whatever a client sends, the answer is never a 5xx, and the server stays up.

Bodies start valid (each field drawn from its legal range, extremes included) and then get up
to two fields replaced by junk of any JSON type, so both the happy paths and every field's
error path are exercised; now and then the body is not even an object.
"""

from __future__ import annotations

import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=2000), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_text = st.text(max_size=60)
_sampling = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(min_value=1, max_value=24) | st.sampled_from([0, 255, 300, 10**6]),
    "temperature": st.floats(min_value=0, max_value=2) | st.sampled_from([0.0, 1e-6, 100.0]),
    "top_p": st.floats(min_value=0.01, max_value=1.0),
    "top_k": st.integers(min_value=-1, max_value=50) | st.just(10**6),
    "min_p": st.floats(min_value=0, max_value=1),
    "n": st.just(1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "seed": st.integers(min_value=-(2**64), max_value=2**64),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.01, max_value=5) | st.just(1e300),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=10**12), max_size=3),
    "min_tokens": st.integers(min_value=0, max_value=4),
    "user": st.text(max_size=5),
}
_stream = {"stream": st.just(True), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={"content": _text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), max_size=2)},
)
_completion = st.fixed_dictionaries(
    {"prompt": _text | st.lists(st.integers(min_value=0, max_value=999), min_size=1, max_size=8)},
    optional={**_sampling, "logprobs": st.integers(min_value=0, max_value=5)},
)
_chat = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=1, max_size=3)},
    optional={
        **_sampling,
        "max_completion_tokens": _sampling["max_tokens"],
        "logprobs": st.just(True),
        "top_logprobs": st.integers(min_value=0, max_value=5),
    },
)


@st.composite
def _cases(draw) -> tuple[str, object]:
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = draw(_chat if chat else _completion)
    if draw(st.booleans()):
        body.update(draw(st.fixed_dictionaries(_stream)))
    fields = sorted({*body, *_sampling, "prompt", "messages", "logprobs", "top_logprobs", "stream_options"})
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        body[draw(st.sampled_from(fields))] = draw(_junk)
    if draw(st.integers(min_value=0, max_value=30)) == 0:
        return path, draw(_junk)
    return path, body


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_no_5xx_for_any_body(server, case):
    path, body = case
    response = requests.post(f"{server.url}{path}", json=body, headers=server.auth, timeout=60)
    event(f"status {response.status_code}")
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif isinstance(body, dict) and body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in response.text, response.text


def test_still_healthy_after_fuzzing(server):
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    stats = server.stats()
    assert stats["healthy"] and stats["num_requests_admitted"] == 0 and stats["kv_cache_usage_perc"] == 0
