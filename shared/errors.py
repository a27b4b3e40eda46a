"""Typed errors, each with the HTTP status and OpenAI error type it maps to.

Anything a client, an operator or a peer can cause raises one of these (never
an assert); the gateway turns them into `{"error": {...}}` bodies.
"""

from __future__ import annotations

from http import HTTPStatus


class PdserveError(Exception):
    """Base class. `status` and `error_type` shape the HTTP error response."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(PdserveError):
    """The configuration (file, flags, environment) is invalid."""

    status = HTTPStatus.BAD_REQUEST
    error_type = "ConfigError"


class InvalidRequestError(PdserveError):
    """The request is malformed or asks for something out of range."""

    status = HTTPStatus.BAD_REQUEST
    error_type = "BadRequestError"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested output does not fit the model's context."""


class AuthenticationError(PdserveError):
    status = HTTPStatus.UNAUTHORIZED
    error_type = "AuthenticationError"


class ModelNotFoundError(PdserveError):
    status = HTTPStatus.NOT_FOUND
    error_type = "NotFoundError"


class CapacityError(PdserveError):
    """No healthy instance can take the request now; the client may retry."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "ServiceUnavailableError"


class EngineError(PdserveError):
    """An engine instance failed while serving the request."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "EngineError"


class EngineDeadError(EngineError):
    """The instance's actor is gone; its requests cannot finish there."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
