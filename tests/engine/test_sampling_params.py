"""SamplingParams: defaults, normalisation, and a ValueError naming each bad parameter."""

from __future__ import annotations

import math

import pytest

from dsray.sampling_params import SamplingParams


def test_defaults_are_valid():
    params = SamplingParams()
    assert params.n == 1
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.max_tokens == 16
    assert params.stop == []
    assert params.stop_token_ids == []
    assert not params.is_greedy


def test_normalisation():
    params = SamplingParams(stop="###", stop_token_ids=(7, 8), top_k=-1)
    assert params.stop == ["###"]
    assert params.stop_token_ids == [7, 8]
    assert params.top_k == 0
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_valid_edges():
    SamplingParams(
        temperature=0,
        top_p=1,
        top_k=1,
        min_p=1.0,
        seed=0,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=0.01,
        max_tokens=None,
        min_tokens=5,
        logprobs=20,
    )
    SamplingParams(max_tokens=1, min_tokens=1, logprobs=0)


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("n", 2, "n must be 1"),
        ("temperature", -1, "temperature must be >= 0, got -1"),
        ("temperature", math.nan, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("top_k", -2, "top_k must be -1 or 0 (disabled) or >= 1"),
        ("top_k", 2.5, "top_k"),
        ("min_p", -0.1, "min_p must be in [0, 1]"),
        ("min_p", 1.1, "min_p must be in [0, 1]"),
        ("seed", 1.5, "seed must be an int"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2]"),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2]"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0"),
        ("stop", [""], "stop must hold non-empty strings"),
        ("stop", [3], "stop must hold non-empty strings"),
        ("stop_token_ids", [-1], "stop_token_ids must hold non-negative ints"),
        ("stop_token_ids", ["a"], "stop_token_ids"),
        ("max_tokens", 0, "max_tokens must be >= 1 or None"),
        ("min_tokens", -1, "min_tokens must be >= 0"),
        ("logprobs", 21, "logprobs must be in [0, 20]"),
        ("logprobs", -1, "logprobs must be in [0, 20]"),
    ],
)
def test_invalid_parameter_is_named(name, value, fragment):
    with pytest.raises(ValueError, match=name) as info:
        SamplingParams(**{name: value})
    assert fragment in str(info.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
