"""The HTTP clients of a dsray server: ``Client`` (sync) and ``AsyncClient`` (asyncio)."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from dsray import envs
from dsray.client.errors import APIConnectionError, DsrayAPIError, ServiceUnavailableError, api_error
from dsray.client.results import REQUEST_ID_HEADER, AsyncStream, Completion, ModelInfo, Stream, completion

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0  # a whole non-streamed answer, or the longest pause between two chunks


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:  # Retry-After may also be an HTTP date; dsray sends seconds
        return None


def _response_error(response: httpx2.Response) -> DsrayAPIError:
    try:
        error = json.loads(response.content).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):  # not an OpenAI error body (a proxy's page, say)
        error = {"message": response.text or f"HTTP {response.status_code}"}
    return api_error(
        response.status_code,
        error.get("message") or f"HTTP {response.status_code}",
        error.get("type"),
        error.get("param"),
        error.get("code"),
        request_id=response.headers.get(REQUEST_ID_HEADER),
        retry_after=_seconds(response.headers.get("retry-after")),
    )


def _messages(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


class _ClientBase:
    """What the sync and async clients share: where, who, and how a request body is made."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None):
        # Both the server root and its OpenAI base (…/v1) are accepted.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else envs.api_key()
        self.model = model

    def _headers(self, request_id: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        return headers

    def _body(self, key: str, value: Any, model: str | None, stream: bool, sampling: dict[str, Any]) -> dict[str, Any]:
        body = {key: value, **sampling}
        if (model or self.model) is not None:
            body["model"] = model or self.model
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
        return body


def _unreachable(request: httpx2.Request, exc: Exception) -> APIConnectionError:
    return APIConnectionError(f"could not get an answer from {request.url}: {exc!r}")


class Client(_ClientBase):
    """Synchronous HTTP client of a dsray server.

    ``api_key`` defaults to ``DSRAY_API_KEY``; ``model`` (default None: the server's only model)
    is sent with every request that does not name one. Sampling options are the server's body
    fields by name (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``ignore_eos``, …).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        super().__init__(base_url, api_key, model)
        self._http = httpx2.Client(base_url=self.base_url, timeout=timeout)

    def completions(
        self,
        prompt: str | list[int],
        model: str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **sampling: Any,
    ) -> Completion | Stream:
        """Complete ``prompt`` (text or token ids): a ``Completion``, or with ``stream`` a ``Stream``."""
        body = self._body("prompt", prompt, model, stream, sampling)
        return self._generate("/v1/completions", body, False, request_id)

    def chat(
        self,
        messages: str | list[dict[str, Any]],
        model: str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **sampling: Any,
    ) -> Completion | Stream:
        """Answer ``messages`` (OpenAI chat messages; a string is one user message)."""
        body = self._body("messages", _messages(messages), model, stream, sampling)
        return self._generate("/v1/chat/completions", body, True, request_id)

    def models(self) -> list[ModelInfo]:
        data = self._send(self._http.build_request("GET", "/v1/models", headers=self._headers(None))).json()["data"]
        return [ModelInfo(m["id"], m.get("owned_by"), m.get("max_model_len"), m) for m in data]

    def health(self) -> bool:
        """True when a model instance can serve, False while none can (HTTP 503)."""
        try:
            self._send(self._http.build_request("GET", "/health"))
        except ServiceUnavailableError:
            return False
        return True

    def _generate(self, path: str, body: dict[str, Any], chat: bool, request_id: str | None) -> Completion | Stream:
        request = self._http.build_request("POST", path, json=body, headers=self._headers(request_id))
        response = self._send(request, stream=bool(body.get("stream")))
        if body.get("stream"):
            return Stream(response, chat)
        return completion(response.json(), chat, response.headers.get(REQUEST_ID_HEADER))

    def _send(self, request: httpx2.Request, stream: bool = False) -> httpx2.Response:
        try:
            response = self._http.send(request, stream=stream)
            if response.status_code >= 400:
                response.read()
        except httpx2.RequestError as exc:
            raise _unreachable(request, exc) from exc
        if response.status_code >= 400:
            response.close()
            raise _response_error(response)
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """``Client`` for asyncio: the same methods, awaited; streams are ``AsyncStream``s."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        super().__init__(base_url, api_key, model)
        self._http = httpx2.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def completions(
        self,
        prompt: str | list[int],
        model: str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **sampling: Any,
    ) -> Completion | AsyncStream:
        body = self._body("prompt", prompt, model, stream, sampling)
        return await self._generate("/v1/completions", body, False, request_id)

    async def chat(
        self,
        messages: str | list[dict[str, Any]],
        model: str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **sampling: Any,
    ) -> Completion | AsyncStream:
        body = self._body("messages", _messages(messages), model, stream, sampling)
        return await self._generate("/v1/chat/completions", body, True, request_id)

    async def models(self) -> list[ModelInfo]:
        response = await self._send(self._http.build_request("GET", "/v1/models", headers=self._headers(None)))
        return [ModelInfo(m["id"], m.get("owned_by"), m.get("max_model_len"), m) for m in response.json()["data"]]

    async def health(self) -> bool:
        try:
            await self._send(self._http.build_request("GET", "/health"))
        except ServiceUnavailableError:
            return False
        return True

    async def _generate(
        self, path: str, body: dict[str, Any], chat: bool, request_id: str | None
    ) -> Completion | AsyncStream:
        request = self._http.build_request("POST", path, json=body, headers=self._headers(request_id))
        response = await self._send(request, stream=bool(body.get("stream")))
        if body.get("stream"):
            return AsyncStream(response, chat)
        return completion(response.json(), chat, response.headers.get(REQUEST_ID_HEADER))

    async def _send(self, request: httpx2.Request, stream: bool = False) -> httpx2.Response:
        try:
            response = await self._http.send(request, stream=stream)
            if response.status_code >= 400:
                await response.aread()
        except httpx2.RequestError as exc:
            raise _unreachable(request, exc) from exc
        if response.status_code >= 400:
            await response.aclose()
            raise _response_error(response)
        return response

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
