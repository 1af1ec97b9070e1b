"""Typed errors a request can meet: each carries its HTTP status and OpenAI error fields.

Front ends map an error to their wire format by its attributes (``status``, ``type``, ``param``,
``code``), never by reading its message. Refusals of a request's content are ``ValueError``
subclasses, so ``except ValueError`` keeps working for offline callers. They pickle (they cross
the engine process's pipe and Ray).
"""

from __future__ import annotations


class DsrayError(Exception):
    """Base: ``status`` (HTTP), ``type`` (OpenAI error type), ``param`` (the field at fault), ``code``."""

    status = 500
    type = "InternalServerError"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self):
        return type(self), (self.message, self.param, self.code)


class InvalidRequestError(DsrayError, ValueError):
    """The request itself is wrong (a sampling field, an empty prompt, bad token ids): 400."""

    status = 400
    type = "BadRequestError"


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens do not fit the model's context or the KV cache: 400."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str | None = "prompt", code: str | None = None):
        super().__init__(message, param, code)


class RequestIdInUseError(InvalidRequestError):
    """Another request in flight has this id: 409."""

    status = 409
    type = "ConflictError"

    # The header that carries the id over HTTP (gRPC and handle callers give it as request_id).
    def __init__(self, message: str, param: str | None = "x-request-id", code: str | None = None):
        super().__init__(message, param, code)


class EngineDeadError(DsrayError, RuntimeError):
    """The engine loop stopped on an error; no request can be served: 503."""

    status = 503
    type = "ServiceUnavailableError"


class DeadlineExceededError(DsrayError):
    """The request's ``deadline_s`` passed before it produced a token: refused with 504.

    Not a ``ValueError``: the request was valid, the engine was too busy to start it in time.
    A request that had started keeps its tokens instead and ends with ``finish_reason="length"``,
    ``stop_reason="deadline"``.
    """

    status = 504
    type = "DeadlineExceededError"
    code = "deadline_exceeded"

    def __init__(self, message: str, param: str | None = "deadline_s", code: str | None = None):
        super().__init__(message, param, code)
