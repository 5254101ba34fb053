"""A small exception tree that speaks AWS: API errors carry their code and HTTP status."""

from __future__ import annotations

from typing import Any, ClassVar


class LambdaRuntimeError(Exception):
    """Base of every error this package raises on purpose."""


class ServiceError(LambdaRuntimeError):
    """An Invoke API error: no function ran. `code` is AWS's exception name."""

    code: ClassVar[str] = "ServiceException"
    http_status: ClassVar[int] = 500
    error_kind: ClassVar[str] = "Service"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_body(self) -> dict[str, Any]:
        """The JSON body Lambda sends with this error."""
        body: dict[str, Any] = {"Type": self.error_kind, "message": self.message}
        body.update(self.extra)
        return body

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.extra))


def _rebuild(cls: type[ServiceError], message: str, extra: dict[str, Any]) -> ServiceError:
    return cls(message, **extra)


class ResourceNotFoundException(ServiceError, LookupError):
    code = "ResourceNotFoundException"
    http_status = 404
    error_kind = "User"


class TooManyRequestsException(ServiceError):
    code = "TooManyRequestsException"
    http_status = 429
    error_kind = "User"


class RequestTooLargeException(ServiceError, ValueError):
    code = "RequestTooLargeException"
    http_status = 413
    error_kind = "User"


class InvalidRequestContentException(ServiceError, ValueError):
    code = "InvalidRequestContentException"
    http_status = 400
    error_kind = "User"


class InvalidParameterValueException(ServiceError, ValueError):
    code = "InvalidParameterValueException"
    http_status = 400
    error_kind = "User"


class ResourceConflictException(ServiceError):
    code = "ResourceConflictException"
    http_status = 409
    error_kind = "User"


class UnsupportedMediaTypeException(ServiceError, ValueError):
    code = "UnsupportedMediaTypeException"
    http_status = 415
    error_kind = "User"


class ConfigError(InvalidParameterValueException):
    """A function or service setting out of range; the message names the field and the range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConfigError, (self.field, self.message.split(": ", 1)[-1]))


class IsolationUnavailable(LambdaRuntimeError, OSError):
    """The host lacks a mechanism that was required with isolation='strict'."""
