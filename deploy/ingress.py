"""The OpenAI-compatible HTTP front door: routes, body validation, SSE framing, error bodies, metrics.

Holds no model state: every request becomes a ``GenerateRequest`` streamed through a handle
to an LLMServer replica. The admission rules (API key, request id, model name, what a failure
means) are ``deploy/front_door.py``'s; this module reads them from and writes them to HTTP.
The first message decides the HTTP status (an ``ErrorInfo`` becomes an OpenAI error body; a
chunk starts a 200 stream), so refusals are real 4xx/5xx responses, never an error hidden
inside a 200 — except for a stream whose first message is slow to come (``stream_keepalive_s``):
it gets its 200 and SSE comments while it queues, so that read timeouts see bytes. The FastAPI
routes are methods of ``OpenAIIngress``; ``serve.ingress`` is applied where the class is defined
because it rewrites the route signatures, and a replica importing this module must get the
rewritten ones.
"""

# No `from __future__ import annotations` here: FastAPI must see the route parameters' real
# types after Serve rewrites the signatures, not strings.
import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.config import DsrayServeArgs
from deploy.front_door import (
    api_key_error,
    chunks,
    control,
    handle_failure,
    model_error,
    next_message,
    request_id_error,
    scheduling_error,
    unhealthy,
)
from deploy.launch import replica_handle
from deploy.messages import ErrorInfo, GenerateRequest, StreamChunk
from deploy.metrics import RequestObserver, ServingMetrics
from deploy.mux import MuxStream, RequestMux
from deploy.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponseBuilder

logger = logging.getLogger(__name__)

ChunkStream = DeploymentResponseGenerator | MuxStream  # what open_stream returns

REQUEST_ID_HEADER = "x-request-id"
KEEPALIVE_EVENT = ": queued\n\n"  # an SSE comment: sent while a committed stream waits for its first token
RETRY_AFTER_S = 1  # a full queue drains within a few decode steps of the running batch
# Request bodies by default: room for a context of text prompt, JSON-escaped (a CJK character is 6 bytes
# as \uXXXX and about a token), and never under 1 MiB. Past it: 413, before the body is read whole.
BODY_BYTES_PER_TOKEN = 32
MIN_BODY_LIMIT_BYTES = 1 << 20

# FastAPI's own /docs, /redoc and /openapi.json would answer without the API key; the routes below
# serve them behind it.
app = FastAPI(
    title="dsray",
    description="OpenAI-compatible serving of DeepSeek-architecture models.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


# Errors ---------------------------------------------------------------------------------------


def error_response(info: ErrorInfo) -> JSONResponse:
    """An OpenAI error body (``{"error": {message, type, param, code}}``) with ``info.status``."""
    headers = {}
    if info.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": {"message": info.message, "type": info.type, "param": info.param, "code": info.code}}
    return JSONResponse(body, status_code=info.status, headers=headers)


def validation_error_info(exc: ValidationError | RequestValidationError) -> ErrorInfo:
    """Pydantic's first complaint as a 400 naming the field (FastAPI's default would be a 422)."""
    errors = exc.errors()
    if not errors:
        return ErrorInfo("invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ErrorInfo(f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    return ErrorInfo(f"{param}: {message}" if param else message, param=param)


_STATUS_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "BadRequestError"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = _STATUS_TYPES.get(exc.status_code, "APIError")
    return error_response(ErrorInfo(str(exc.detail), type=kind, status=exc.status_code))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error_info(exc))


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(ErrorInfo(f"internal error: {exc!r}", type="InternalServerError", status=500))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def default_body_limit(max_model_len: int) -> int:
    """The request-body limit for a model of this context length when none is configured."""
    return max(MIN_BODY_LIMIT_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


def body_too_large(limit: int) -> Response:
    """413, and the connection closed: the rest of the body is never read."""
    info = ErrorInfo(
        f"request body is larger than {limit} bytes (the server's max_request_body_bytes)",
        type="BadRequestError",
        code="request_too_large",
        status=413,
    )
    response = error_response(info)
    response.headers["Connection"] = "close"
    return response


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes (Content-Length, or counted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def disconnected(request: Request) -> None:
    """Return when the client has gone away (call once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: asyncio.Future, timeout: float | None = None) -> bool | None:
    """Wait for ``work``: True once it is done; False once the client has gone (``work`` is cancelled
    then, as it is if this wait is); None after ``timeout`` seconds, ``work`` still running.

    While a request waits for its first token, or a non-streaming one for its last, nothing is
    written to the client, so nothing else would notice it leave.
    """
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return not work.cancelled()
    if gone.done():
        work.cancel()
        return False
    return None


async def keepalive_until(work: asyncio.Future, interval_s: float) -> AsyncIterator[str]:
    """An SSE comment line every ``interval_s`` seconds until ``work`` is done (clients skip comments)."""
    while not work.done():
        await asyncio.wait({work}, timeout=interval_s)
        if not work.done():
            yield KEEPALIVE_EVENT


# The deployment ---------------------------------------------------------------------------
# serve.ingress pickles the app while this class is being defined, so the route methods are
# copied by value with the module globals that exist at that moment: everything they use is
# defined above this line.


@serve.ingress(app)
class OpenAIIngress:
    """Routes of the OpenAI API, one LLMServer handle behind them."""

    def __init__(self, llm_server: DeploymentHandle, args: DsrayServeArgs | dict[str, Any]):
        self.args = DsrayServeArgs.model_validate(args)
        self.model_name = self.args.served_model_name
        self.api_key = self.args.api_key or None
        llm_server = replica_handle(llm_server)
        self.server = llm_server
        # open_stream(request) -> the request's chunks (async iterator with cancel()), over a batch call
        # shared with other requests (deploy/mux.py) or a handle call of its own.
        stream_server = llm_server.options(stream=True)
        self.open_stream = (
            RequestMux(llm_server).generate if self.args.batches_requests else stream_server.generate.remote
        )
        self.metrics = ServingMetrics(self.model_name, self.args.expert_metrics)
        self._models: list[dict[str, Any]] | None = None
        self._body_limit: int | None = self.args.max_request_body_bytes

    # Routes -----------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        try:
            return JSONResponse({"object": "list", "data": await self._model_list()})
        except Exception as exc:
            return error_response(handle_failure(exc))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        return JSONResponse(request.app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="dsray")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        return get_redoc_html(openapi_url="/openapi.json", title="dsray")

    @app.post("/admin/rebalance")
    async def rebalance(self, request: Request) -> Response:
        """Re-plan the expert placement from the load seen so far and move to it while serving.

        An admin route: refused unless the server has an API key and the request carries it."""
        if not self.api_key:
            return error_response(
                ErrorInfo("admin routes need an API key: start the server with --api-key", status=403)
            )
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        try:
            started = await control(self.server.rebalance.remote())
        except Exception as exc:
            return error_response(handle_failure(exc))
        if not started:
            message = "this model instance holds every expert itself: serve with --expert-workers N to rebalance"
            return error_response(ErrorInfo(message, status=409, type="ConflictError"))
        return JSONResponse({"status": "rebalancing"}, status_code=202)

    @app.post("/admin/scale")
    async def scale(self, request: Request) -> Response:
        """Grow or shrink the model instance's attention and expert worker pools while it serves: a JSON
        body ``{"attention": A, "experts": E}`` (either may be left out). 202 once asked; new workers
        join when loaded (``/metrics`` and the server's stats show the counts). An admin route: refused
        unless the server has an API key and the request carries it."""
        if not self.api_key:
            return error_response(
                ErrorInfo("admin routes need an API key: start the server with --api-key", status=403)
            )
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body.keys() <= {"attention", "experts"} or not body:
            return error_response(ErrorInfo('give a JSON object {"attention": A, "experts": E} (either or both)'))
        for name, value in body.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return error_response(ErrorInfo(f"{name} must be a whole number of workers >= 1", param=name))
        try:
            started = await control(self.server.scale.remote(body.get("attention"), body.get("experts")))
        except Exception as exc:
            return error_response(handle_failure(exc))
        if not started:
            message = "this model instance runs in one process: serve with --attention-workers/--expert-workers"
            return error_response(ErrorInfo(message, status=409, type="ConflictError"))
        return JSONResponse({"status": "scaling", **body}, status_code=202)

    @app.get("/health")
    async def health(self) -> Response:
        """200 when a model instance answers its health check — ``{"status": "ok"}``, or ``"degraded"``
        with the reason while it serves with fewer workers than configured; 503 while none can serve
        (dead, starting)."""
        try:
            degraded = await control(self.server.check_health.remote())
        except Exception as exc:
            return error_response(unhealthy(exc))
        if degraded:
            return JSONResponse({"status": "degraded", "message": degraded})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        try:
            self.metrics.engine_stats.update(await control(self.server.stats.remote()))
        except Exception as exc:  # still export what this ingress observed itself
            logger.warning("could not read LLMServer stats: %r", exc)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Generation -------------------------------------------------------------------------------

    async def _generate(self, request: Request, body_cls: type[CompletionRequest | ChatCompletionRequest]) -> Response:
        # Serve's proxy puts an x-request-id on every request (the client's, or a fresh one) and
        # echoes it on the response; it is this request's id in the engine too.
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if (refusal := request_id_error(request_id, REQUEST_ID_HEADER)) is not None:
            return error_response(refusal)
        if (refusal := self._auth_error(request)) is not None:
            return error_response(refusal)
        if self._body_limit is None:
            try:
                self._body_limit = default_body_limit((await self._model_list())[0]["max_model_len"])
            except Exception as exc:
                return error_response(handle_failure(exc))
        raw = await read_body(request, self._body_limit)
        if raw is None:
            return body_too_large(self._body_limit)
        try:
            body = body_cls.model_validate_json(raw)
            generate_request = self._generate_request(body, request_id)
        except ValidationError as exc:
            return error_response(validation_error_info(exc))
        except ValueError as exc:
            return error_response(ErrorInfo(str(exc), param="prompt"))
        if (refusal := model_error(body.model, self.model_name)) is not None:
            return error_response(refusal)
        if (refusal := scheduling_error(generate_request.sampling)) is not None:
            return error_response(refusal)

        observer = self.metrics.observer()
        stream = self.open_stream(generate_request)
        response = ResponseBuilder(request_id, self.model_name, body_cls is ChatCompletionRequest, body)
        first = asyncio.ensure_future(next_message(stream))
        # A stream commits to its 200 early when its first token is slow to come (a long queue), so
        # that bytes flow; one with a deadline keeps its status for the 504 a missed deadline gets.
        keepalive_s = self.args.stream_keepalive_s
        patience = keepalive_s if body.stream and keepalive_s > 0 and body.deadline_s is None else None
        try:
            answered = await until_disconnected(request, first, patience)
        except BaseException:
            stream.cancel()
            raise
        if answered is False:
            stream.cancel()  # the client left while the request queued or prefilled: abort it
            return Response(status_code=499)
        if answered is None:  # still queued: a 200 now, comments until the first token
            events = self._stream_events(response, first, stream, observer)
            return StreamingResponse(events, media_type="text/event-stream")
        if isinstance(first.result(), ErrorInfo):
            return error_response(first.result())
        if body.stream:
            events = self._stream_events(response, first, stream, observer)
            return StreamingResponse(events, media_type="text/event-stream")
        final = asyncio.ensure_future(self._collect(response, first.result(), stream, observer))
        try:
            answered = await until_disconnected(request, final)
        finally:
            if not observer.done:
                stream.cancel()  # the client left (or the stream failed): abort the request
        if not answered:
            return Response(status_code=499)  # nobody is there to read it
        if isinstance(final.result(), ErrorInfo):
            return error_response(final.result())
        return JSONResponse(response.full(final.result()))

    def _generate_request(self, body: CompletionRequest | ChatCompletionRequest, request_id: str) -> GenerateRequest:
        if isinstance(body, ChatCompletionRequest):
            fields: dict[str, Any] = {"messages": [m.plain() for m in body.messages]}
        else:
            fields = body.prompt_fields()
        return GenerateRequest(request_id=request_id, sampling=body.sampling(), **fields)

    async def _collect(
        self,
        response: ResponseBuilder,
        first: StreamChunk,
        stream: ChunkStream,
        observer: RequestObserver,
    ) -> StreamChunk | ErrorInfo:
        async for chunk in chunks(stream, observer, first):
            if isinstance(chunk, ErrorInfo):
                return chunk
            response.add(chunk)
            if chunk.finish_reason is not None:
                return chunk
        raise AssertionError("unreachable: chunks ends with a finished chunk or an error")

    async def _stream_events(
        self,
        response: ResponseBuilder,
        first: asyncio.Future,
        stream: ChunkStream,
        observer: RequestObserver,
    ) -> AsyncIterator[str]:
        """SSE events: one per chunk, an error event if the request fails midway, usage, ``[DONE]``.

        While ``first`` (the first message) is still to come, a keep-alive comment every
        ``stream_keepalive_s``; a refusal that comes then is an error event, the 200 being sent.
        The last chunk's event, the usage event and ``[DONE]`` go out as one write: each write is a
        trip through the ASGI stack and the HTTP front door, and the client reads events, not writes.
        """
        try:
            async for comment in keepalive_until(first, self.args.stream_keepalive_s):
                yield comment
            async for chunk in chunks(stream, observer, first.result()):
                if isinstance(chunk, ErrorInfo):
                    error = {"message": chunk.message, "type": chunk.type, "param": chunk.param}
                    yield _sse({"error": {**error, "code": chunk.code or chunk.status}}) + "data: [DONE]\n\n"
                    return
                if chunk.finish_reason is None:
                    yield _sse(response.delta(chunk))
                    continue
                usage = _sse(response.usage_event(chunk)) if response.include_usage else ""
                yield _sse(response.delta(chunk)) + usage + "data: [DONE]\n\n"
                return
            yield "data: [DONE]\n\n"
        finally:
            first.cancel()  # a no-op once it is done
            if not observer.done:
                stream.cancel()  # the client disconnected: abort the request in the engine

    # Helpers ----------------------------------------------------------------------------------

    async def _model_list(self) -> list[dict[str, Any]]:
        if self._models is None:
            self._models = await control(self.server.models.remote())
        return self._models

    def _auth_error(self, request: Request) -> ErrorInfo | None:
        authorization = request.headers.get("authorization", "")
        return api_key_error(self.api_key, authorization, "'Authorization: Bearer <key>'")
