"""Errors a client caused, each with its HTTP status and an OpenAI-style error code.

They carry only a message and plain fields, so they survive being raised in one Ray replica and
re-raised in another; nothing here imports Ray.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the gateway turns into a JSON error body instead of a 500."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.limit = limit

    def __reduce__(self):  # keep the fields across pickling (Ray re-raises remote errors)
        return (type(self), (self.message, self.param, self.limit))

    def body(self) -> dict:
        err = {"message": self.message, "type": self.code, "param": self.param, "code": self.code}
        if self.limit is not None:
            err["limit"] = self.limit
        return {"error": err}


class BadRequest(ServiceError):
    status, code = 400, "invalid_request"


class InvalidAdapter(ServiceError):
    """Malformed, non-finite, pickle-carrying or wrongly shaped adapter weights."""

    status, code = 400, "invalid_adapter"


class WrongBaseModel(ServiceError):
    status, code = 400, "wrong_base_model"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class UnknownAdapter(NotFound):
    code = "adapter_not_found"


class UnknownModel(NotFound):
    code = "model_not_found"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class PromptTooLong(TooLarge):
    code = "prompt_too_long"


class Invalid(ServiceError):
    """A well-typed request whose values do not go together (422, like a schema error)."""

    status, code = 422, "invalid_value"


class GenerationFailed(ServiceError):
    """One request's decoding could not go on (e.g. its adapter made the next-token scores non-finite); the
    other requests of its batch carry on."""

    status, code = 400, "generation_failed"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


def as_service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError inside `exc`, also when Ray wrapped it in a RayTaskError."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ServiceError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
