"""Typed exceptions of the guest API. Each carries the protocol ``ErrorCode``."""

from __future__ import annotations

from shared.errors import ErrorCode, PcisplitError, RequestError

__all__ = [
    "RequestError",
    "DeviceNotFoundError",
    "InvalidAccessError",
    "AccessDeniedError",
    "NotImplementedOpError",
    "OperationFailedError",
    "BackendBusyError",
    "HandshakeError",
    "ConnectionLostError",
    "error_for_code",
]


class DeviceNotFoundError(RequestError):
    """The device is not on this guest's bus (``NOT_FOUND``)."""


class InvalidAccessError(RequestError):
    """Bad offset, size or alignment (``INVALID_OFFSET`` / ``INVALID_SIZE``)."""


class AccessDeniedError(RequestError):
    """The config-space policy refused the access (``ACCESS_DENIED``)."""


class NotImplementedOpError(RequestError):
    """The backend or device does not implement this (``NOT_IMPLEMENTED``)."""


class OperationFailedError(RequestError):
    """The device failed to carry out the operation (``OPERATION_FAILED``)."""


class BackendBusyError(RequestError):
    """The backend refused for load reasons; retry later (``BUSY``)."""


class HandshakeError(PcisplitError):
    """The backend refused the connection (unknown guest, version mismatch, ...)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"backend refused the connection ({code.name}): {message}", code=code)


class ConnectionLostError(PcisplitError):
    """The connection to the backend ended while requests were outstanding or being made."""


_BY_CODE: dict[ErrorCode, type[RequestError]] = {
    ErrorCode.NOT_FOUND: DeviceNotFoundError,
    ErrorCode.INVALID_OFFSET: InvalidAccessError,
    ErrorCode.INVALID_SIZE: InvalidAccessError,
    ErrorCode.ACCESS_DENIED: AccessDeniedError,
    ErrorCode.NOT_IMPLEMENTED: NotImplementedOpError,
    ErrorCode.OPERATION_FAILED: OperationFailedError,
    ErrorCode.BUSY: BackendBusyError,
}


def error_for_code(code: ErrorCode, message: str) -> RequestError:
    """The most specific exception for an error reply."""
    return _BY_CODE.get(code, RequestError)(code, message)
