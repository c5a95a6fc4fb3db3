"""The error a vfio-user command is refused with: an errno for the reply, a reason to log."""

from __future__ import annotations

import errno

from shared.errors import ErrorCode, PcisplitError

__all__ = ["ClientStalledError", "CommandRefusedError"]


class CommandRefusedError(PcisplitError):
    """A command answered with ``errno`` (the connection goes on); the message says why."""

    code = ErrorCode.INVALID_STATE

    def __init__(self, errno_value: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.errno = errno_value
        #: After the errno reply the connection ends (a VERSION this server cannot speak).
        self.fatal = fatal

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


class ClientStalledError(PcisplitError):
    """The client stopped reading its replies, made an eventfd block, or left: its
    connection ends."""

    code = ErrorCode.OPERATION_FAILED
