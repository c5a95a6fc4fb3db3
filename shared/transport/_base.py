"""The frame-transport contract shared by every transport.

A transport moves whole frames (``bytes``) in order, and nothing else: it never
looks inside a frame. Framing of byte streams lives in
:mod:`shared.protocol` (``encode_frame`` / ``FrameDecoder``), in one place.

Error contract (same as trio's streams):

* ``receive_frame`` raises :class:`trio.EndOfChannel` when the peer closed
  cleanly, :class:`trio.BrokenResourceError` when the connection broke or the
  peer misbehaved at the transport level (the message says how), and
  :class:`trio.ClosedResourceError` when *we* closed the transport.
* ``send_frame`` raises ``BrokenResourceError`` / ``ClosedResourceError``
  likewise, and :class:`FrameTooLargeError` for a frame over the limit
  (the transport stays usable).
* Two tasks calling ``send_frame`` (or ``receive_frame``) at once raise
  :class:`trio.BusyResourceError`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from shared.errors import PcisplitError
from shared.transport._budget import ReceiveBudget, ReceiveLimits
from shared.transport._identity import PeerIdentity

__all__ = [
    "SEND_CONFLICT",
    "RECEIVE_CONFLICT",
    "FrameTransport",
    "FrameListener",
    "FrameTooLargeError",
    "FdPassingUnsupportedError",
    "TransportAddressError",
    "TransportConnectError",
    "TransportOptions",
    "DEFAULT_MAX_FRAME",
]

#: What a second sender or receiver is told (:class:`trio.BusyResourceError`): every
#: transport keeps the rule with a :class:`shared.sync.ConflictDetector` per direction.
SEND_CONFLICT = "another task is already sending on this transport"
RECEIVE_CONFLICT = "another task is already receiving on this transport"

#: Frame limit before a handshake has negotiated one.
DEFAULT_MAX_FRAME = 1 << 20


class FrameTooLargeError(PcisplitError, ValueError):
    """A frame is larger than the transport's negotiated maximum."""


class FdPassingUnsupportedError(PcisplitError, NotImplementedError):
    """This transport cannot carry file descriptors (only ``unix:`` and ``shm:`` can)."""


class TransportAddressError(PcisplitError, ValueError):
    """An address string names an unknown scheme or is malformed."""


class TransportConnectError(PcisplitError):
    """Connecting or listening failed (nothing listens there, permission denied...)."""


@dataclass
class TransportOptions:
    """Per-endpoint options a transport may use. Unknown keys go in ``extra``.

    ``ssl_context``: an :class:`ssl.SSLContext` for ``tls://``.
    ``server_hostname``: the name the client checks in the server certificate.
    ``ring_size``: bytes per direction for ``shm:`` rings.
    ``poll_us``: adaptive-polling budget for ``shm:`` (0 disables polling).

    Limits a server puts on the peers it accepts (None: no limit beyond the
    frame size; see :mod:`shared.transport._budget` and ``docs/security.md``):
    ``partial_frame_timeout`` (seconds a started frame may see no byte),
    ``max_buffered`` (receive-buffer bytes per connection),
    ``receive_budget`` (a :class:`ReceiveBudget` shared by all connections),
    ``max_fds`` (received fds a connection may hold in the transport at once),
    ``tls_handshake_timeout`` (seconds for a TLS handshake, run per connection).
    """

    ssl_context: Any = None
    server_hostname: str | None = None
    ring_size: int = 256 * 1024
    poll_us: float | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME
    partial_frame_timeout: float | None = None
    max_buffered: int | None = None
    receive_budget: ReceiveBudget | None = None
    max_fds: int | None = None
    tls_handshake_timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def receive_limits(self, what: str) -> ReceiveLimits:
        """One connection's receive limits (``what`` names it in errors)."""
        return ReceiveLimits(
            what,
            budget=self.receive_budget,
            max_buffered=self.max_buffered,
            idle_timeout=self.partial_frame_timeout,
        )


class ReceiveInterrupted(trio.WouldBlock):
    """:meth:`FrameTransport.receive_frame` was woken by :meth:`~FrameTransport.interrupt_receive`.

    Nothing was consumed; call ``receive_frame`` again when you still want a frame.
    """


class FrameTransport(abc.ABC):
    """One end of a connection that carries frames."""

    #: Largest frame this end sends or accepts; ``set_max_frame_size`` lowers it.
    max_frame_size: int = DEFAULT_MAX_FRAME
    #: True when :meth:`interrupt_receive` works. A caller that must be able to stop a
    #: blocked receive (a time-out, a connection failing) then needs no cancel scope
    #: around it, which on the request hot path costs as much as a scheduler pass.
    interruptible: bool = False

    def interrupt_receive(self) -> None:
        """Make the task blocked in :meth:`receive_frame` raise :class:`ReceiveInterrupted`.

        Only where :attr:`interruptible` is True; a no-op when nobody is receiving.
        Other transports raise :class:`NotImplementedError`: use a cancel scope.
        """
        raise NotImplementedError(
            f"{self.describe()} cannot interrupt a receive; use a trio cancel scope"
        )

    @abc.abstractmethod
    async def send_frame(self, frame: bytes) -> None:
        """Send one frame. Waits (back-pressure) while the peer is not reading."""

    @abc.abstractmethod
    async def receive_frame(self) -> bytes:
        """Receive the next frame, in order."""

    def receive_frame_nowait(self) -> bytes | None:
        """A frame that already arrived and sits in this end's buffers, or None.

        Never blocks, never checkpoints, never reads from the OS. A server uses
        it to drain a burst of pipelined requests and answer them as one batch
        (:meth:`send_frames`). Call it only from the task that calls
        :meth:`receive_frame`; errors are left for the next ``receive_frame``.
        The default knows of no buffer and returns None.
        """
        return None

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send several frames in order, as one batch where the transport can.

        The default sends them one by one; stream transports write them with one
        system call and ``shm:`` publishes them with at most one doorbell.
        """
        for frame in frames:
            await self.send_frame(frame)

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close this end. Idempotent. Pending operations get ClosedResourceError."""

    async def do_handshake(self) -> None:
        """Finish the transport's own handshake (TLS) now; idempotent.

        A server end returned by :meth:`FrameListener.accept` may not have done
        it yet (so one silent client cannot hold up the accept loop): it then
        happens on first send or receive, or here. Most transports have none.
        """
        await trio.lowlevel.checkpoint()

    def set_max_frame_size(self, size: int) -> None:
        """Apply the limit negotiated in the handshake."""
        self.max_frame_size = size

    async def start_session(self, *, is_server: bool, max_frame_size: int) -> None:  # noqa: B027
        """Called by both sides right after a successful handshake.

        Most transports do nothing. ``shm:`` uses it to hand over the shared
        memory and doorbells and move the session onto the ring.
        """

    @property
    def can_pass_fds(self) -> bool:
        """True when :meth:`send_frame_with_fds` works (``unix:`` and ``shm:``)."""
        return False

    async def send_frame_with_fds(self, frame: bytes, fds: Sequence[int]) -> None:
        """Send one frame with file descriptors attached (SCM_RIGHTS).

        The sender keeps ownership of ``fds``: the kernel gives the peer its own
        duplicates, so close yours when you no longer need them. Transports
        that cannot pass fds raise :class:`FdPassingUnsupportedError`.
        """
        raise FdPassingUnsupportedError(
            f"{self.describe()} cannot pass file descriptors; check can_pass_fds first "
            "(unix: and shm: can)"
        )

    def take_received_fds(self) -> list[int]:
        """The fds that came with the frame most recently returned by :meth:`receive_frame`.

        The caller owns them and must close them. Fds nobody takes are closed
        by the transport when the next frame is received (or on close), so a
        peer cannot make us leak descriptors. Transports that cannot pass fds
        always return an empty list.
        """
        return []

    def peer_identity(self) -> PeerIdentity:
        """What the transport can vouch for about the peer (UNIX credentials, certificate names).

        The default knows nothing but the endpoint's name.
        """
        return PeerIdentity(self.describe())

    def describe(self) -> str:
        """A short human-readable name of this endpoint for logs."""
        return type(self).__name__

    async def __aenter__(self) -> FrameTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class FrameListener(abc.ABC):
    """Accepts incoming frame transports."""

    #: The address actually bound (``tcp://127.0.0.1:43121`` for port 0, say).
    address: str = ""

    @abc.abstractmethod
    async def accept(self) -> FrameTransport:
        """Wait for and return the next connection."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop listening and release the address (a UNIX socket file is removed)."""

    async def __aenter__(self) -> FrameListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
