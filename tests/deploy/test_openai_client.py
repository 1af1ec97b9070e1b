"""The served API through the official openai client: completions, chat, streaming, and each error's exception."""

from __future__ import annotations

import openai
import pytest


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]


def test_completion(client, server):
    out = client.completions.create(model=server.model, prompt="The weather today is", max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == server.model and out.id.startswith("cmpl-")
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert out.usage.prompt_tokens > 0 and 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_token_ids_and_single_prompt_list(client, server):
    by_ids = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=4, temperature=0)
    by_list = client.completions.create(model=server.model, prompt=[[5, 6, 7]], max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 3
    assert by_ids.choices[0].text == by_list.choices[0].text


def test_chat(client, server):
    out = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=8,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert out.usage.completion_tokens <= 8


def test_streaming_completion_matches_non_streaming(client, server):
    kwargs = dict(model=server.model, prompt="Inference on many machines", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_with_usage(client, server):
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hi there"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == usage.total_tokens - usage.prompt_tokens


def test_chat_logprobs(client, server):
    out = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the best one


def test_seed_makes_sampling_repeatable(client, server):
    kwargs = dict(model=server.model, prompt="A good recipe", max_tokens=12, temperature=1.0, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_invalid_sampling_param_is_bad_request(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="x", max_tokens=4, temperature=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature" and "temperature" in info.value.message


def test_context_overflow_is_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="hello", max_tokens=server.max_model_len + 1)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "word " * server.max_model_len}], max_tokens=4
        )
    assert info.value.code == "context_length_exceeded" and info.value.body["param"] == "messages"


def test_parallel_sampling_is_refused(client, server):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=server.model, prompt="x", n=2, max_tokens=2)


def test_wrong_api_key(server):
    with openai.OpenAI(base_url=server.base_url, api_key="wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model=server.model, prompt="x", max_tokens=2)
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert info.value.code == "model_not_found"
