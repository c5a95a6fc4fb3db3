"""The one error hierarchy of pcisplit, and the one error-code enum.

Every library error derives from :class:`PcisplitError`. Errors that travel on
the wire carry an :class:`ErrorCode`; there is exactly one code space (unlike
Xen, which mixes its own codes with Linux errnos).

Transport failures are not here: they reuse trio's ``ClosedResourceError``,
``BrokenResourceError`` and ``BusyResourceError`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable

__all__ = [
    "ErrorCode",
    "PcisplitError",
    "PciError",
    "ConfigAccessError",
    "AddressError",
    "DumpFormatError",
    "CapabilityError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "RequestError",
    "ConfigFileError",
    "LimitExceededError",
    "UsageError",
    "did_you_mean",
    "reason",
]


class ErrorCode(enum.IntEnum):
    """Wire error codes. Values are stable: never renumber, only append."""

    OK = 0
    NOT_FOUND = 1
    INVALID_OFFSET = 2
    INVALID_SIZE = 3
    ACCESS_DENIED = 4
    NOT_IMPLEMENTED = 5
    OPERATION_FAILED = 6
    BUSY = 7
    PROTOCOL_ERROR = 8
    VERSION_MISMATCH = 9
    UNKNOWN_GUEST = 10
    TIMED_OUT = 11
    INVALID_STATE = 12
    DMA_FAULT = 13
    #: The connection could not prove it may act as the guest it named
    #: (wrong UNIX uid/gid, certificate name or token).
    NOT_AUTHORIZED = 14
    #: The device was hot-unplugged from the guest's bus (a request on its old address).
    DEVICE_REMOVED = 15


class PcisplitError(Exception):
    """Base class of every error pcisplit raises on purpose."""

    #: The wire code this error maps to when it has to be reported to a peer.
    code: ErrorCode = ErrorCode.OPERATION_FAILED

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class PciError(PcisplitError):
    """A problem in the pure PCI model (addresses, config images, dumps)."""


class AddressError(PciError, ValueError):
    """A PCI address string or number is malformed or out of range."""

    code = ErrorCode.NOT_FOUND


class ConfigAccessError(PciError):
    """A config-space or BAR access is misaligned, of a bad size, or out of range."""

    code = ErrorCode.INVALID_OFFSET


class DumpFormatError(PciError, ValueError):
    """An ``lspci -x`` style dump cannot be parsed. The message names the line."""


class CapabilityError(PciError):
    """A capability list is malformed (a loop, a pointer out of range, ...)."""


class ProtocolError(PcisplitError):
    """A violation of the pcisplit wire protocol."""

    code = ErrorCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """*We* tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The *peer* sent something the protocol forbids (hostile or buggy peer)."""


class RequestError(PcisplitError):
    """A request was answered with an error reply. ``code`` says which error."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}", code=code)
        self.remote_message = message


class ConfigFileError(PcisplitError, ValueError):
    """The backend configuration is invalid. The message names the key."""


class LimitExceededError(RemoteProtocolError):
    """A peer went over a resource limit (``[limits]`` in the backend config).

    ``limit`` names the limit's key (``partial_frame_timeout``,
    ``max_fds_per_connection``...), so the service can count each kind.
    """

    code = ErrorCode.BUSY

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class UsageError(PcisplitError, ValueError):
    """A command line or API argument is wrong; the CLIs exit with status 2 for it."""


#: A list of known names this short is shown whole when nothing is close.
SHORT_LIST = 10


def did_you_mean(name: str, known: Iterable[str], *, listing: str = "") -> str:
    """The hint for an unknown ``name``: its closest matches, never a long list.

    ``"did you mean 'command.bus_master'?"`` when something is close; otherwise the
    known names if there are at most :data:`SHORT_LIST`, else ``listing`` (where the
    user can look them up) or a count. Every "unknown name" error uses this.
    """
    names = sorted(set(known))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close and len(name) >= 3:  # "dev" -> "pcie.devctl": a prefix or a part of it
        lowered = name.lower()
        close = [n for n in names if lowered in n.lower()][:3]
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    if len(names) <= SHORT_LIST:
        return f"known: {', '.join(names)}" if names else "none are known"
    return listing or f"none of the {len(names)} known names is close"


def reason(exc: BaseException) -> str:
    """One line saying why ``exc`` happened, never empty.

    OS errors say which file (``server.pem: No such file or directory``); TLS
    errors give OpenSSL's reason (``TLS: PEM_LIB``) rather than their often
    empty or multi-part text.
    """
    text = ""
    ssl_reason = getattr(exc, "reason", None)
    if isinstance(exc, OSError) and isinstance(ssl_reason, str) and ssl_reason:
        verify = getattr(exc, "verify_message", None)
        if verify:
            text = f"TLS: certificate verify failed: {verify}"
        else:
            text = f"TLS: {ssl_reason.replace('_', ' ').lower()}"
    elif isinstance(exc, OSError) and exc.strerror:
        target = f"{exc.filename}: " if exc.filename is not None else ""
        text = f"{target}{exc.strerror}"
    else:
        text = str(exc)
    text = " ".join(text.replace("(_ssl.c:", "(ssl:").split())
    if text.endswith(")") and "(ssl:" in text:  # OpenSSL's source line helps no user
        text = text[: text.rindex("(ssl:")].rstrip()
    return text or type(exc).__name__
