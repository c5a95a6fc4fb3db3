"""Typed exceptions of the guest API. Each carries the protocol ``ErrorCode``."""

from __future__ import annotations

from shared.errors import ErrorCode, PcisplitError, RequestError

__all__ = [
    "RequestError",
    "DeviceNotFoundError",
    "DeviceRemovedError",
    "InvalidAccessError",
    "AccessDeniedError",
    "NotImplementedOpError",
    "OperationFailedError",
    "BackendBusyError",
    "HandshakeError",
    "ConnectionLostError",
    "OutcomeUnknownError",
    "ResourceLostError",
    "error_for_code",
    "removed_error",
]


class DeviceNotFoundError(RequestError):
    """The device is not on this guest's bus (``NOT_FOUND``)."""


class DeviceRemovedError(DeviceNotFoundError):
    """The device was hot-unplugged from this guest's bus (``DEVICE_REMOVED``).

    Raised by requests that were in flight on the device when it was
    removed, and by any later request through its :class:`~pcifront.Device`
    object (which never turns into another device that takes its address).
    A :class:`DeviceNotFoundError`, so code that handles a missing device
    handles this too.
    """


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
    """The connection to the backend ended while requests were outstanding or being made.

    ``request_sent`` is False when the request never left this process (it
    is then safe to make it again), True when it went out and its reply
    never came, and None when no particular request is concerned.
    """

    def __init__(self, message: str, *, request_sent: bool | None = None) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class OutcomeUnknownError(ConnectionLostError):
    """A write went out and the connection was lost before its reply.

    The backend may or may not have carried it out. With
    ``connect(..., reconnect=True)`` reads are retried on the new connection,
    but a write is never replayed (a replay could apply it twice): read the
    device back, then decide whether to write again.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=True)


class ResourceLostError(ConnectionLostError):
    """An ``interrupts()`` block or a :class:`~pcifront.DmaBuffer` outlived its connection.

    Both live in the backend's session of the connection they were made on.
    When that connection is lost the backend releases them, and resets the
    device (the guest's last connection ended, or the backend restarted), so
    even ``connect(..., reconnect=True)`` cannot bring them back: the device
    has forgotten its MSI set-up and the DMA addresses it was programmed
    with. Every task waiting in :meth:`Interrupts.receive` gets this error, and
    so does every later use of the block or buffer. Leave the block (drop the
    buffer), re-initialise the device, then enter ``interrupts()`` again and
    map new buffers.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, request_sent=None)


_BY_CODE: dict[ErrorCode, type[RequestError]] = {
    ErrorCode.NOT_FOUND: DeviceNotFoundError,
    ErrorCode.DEVICE_REMOVED: DeviceRemovedError,
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


def removed_error(address: str, why: str) -> DeviceRemovedError:
    """The error for a request on the device at ``address``, which left the bus (``why``)."""
    return DeviceRemovedError(
        ErrorCode.DEVICE_REMOVED,
        f"device {address} was removed from this guest's bus ({why}); "
        "bus.devices lists the devices it has now",
    )
