"""The errors of dsray.client: one ``DsrayAPIError`` subclass per HTTP status, with OpenAI's error fields."""

from __future__ import annotations


class DsrayAPIError(Exception):
    """An error answer: OpenAI's error fields, the HTTP status, and the request's id.

    ``retry_after`` (seconds) is set where the server sent ``Retry-After`` (429 and 503).
    """

    status_code: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


class BadRequestError(DsrayAPIError):
    status_code = 400


class AuthenticationError(DsrayAPIError):
    status_code = 401


class NotFoundError(DsrayAPIError):
    status_code = 404


class ConflictError(DsrayAPIError):
    status_code = 409


class RateLimitError(DsrayAPIError):
    """The model instance's queue is full; retry after ``retry_after`` seconds."""

    status_code = 429


class InternalServerError(DsrayAPIError):
    status_code = 500


class ServiceUnavailableError(DsrayAPIError):
    """No model instance can serve (engine or worker dead, replica starting, Serve overloaded)."""

    status_code = 503


class DeadlineExceededError(DsrayAPIError):
    """The request's ``deadline_s`` passed before it produced a token (code ``deadline_exceeded``)."""

    status_code = 504


class APIConnectionError(DsrayAPIError):
    """No answer: the server could not be reached, timed out, or cut a stream short."""


_BY_STATUS: dict[int, type[DsrayAPIError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        NotFoundError,
        ConflictError,
        RateLimitError,
        InternalServerError,
        ServiceUnavailableError,
        DeadlineExceededError,
    )
}
_BY_TYPE = {cls.__name__: cls for cls in _BY_STATUS.values()}


def api_error(
    status: int | None,
    message: str,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> DsrayAPIError:
    """The error class for ``status`` (else for OpenAI's ``type`` name), filled in."""
    cls = _BY_STATUS.get(status or 0) or _BY_TYPE.get(type or "")
    if cls is None:
        cls = InternalServerError if status and status >= 500 else DsrayAPIError
    return cls(
        message,
        status_code=status or cls.status_code,
        type=type,
        param=param,
        code=code,
        request_id=request_id,
        retry_after=retry_after,
    )
