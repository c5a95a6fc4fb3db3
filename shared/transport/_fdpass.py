"""File-descriptor passing (SCM_RIGHTS) for frame transports on UNIX sockets.

The rules every fd-passing transport follows (``unix:`` and ``shm:``):

* The sender attaches the fds to the *first byte* of one frame: the encoded
  frame goes out in one ``sendmsg`` carrying the ``SCM_RIGHTS`` message (any
  rest of a partial send follows without fds). The kernel duplicates the fds,
  so the sender keeps its own. Linux takes at most 253 fds per message
  (``SCM_MAX_FD``), so more fds go out as one-byte pieces of the same frame
  carrying 253 fds each (:func:`rights_pieces`); every piece lies inside
  the frame, so the receiver ties all of them to it.
* The receiver always reads with ``recvmsg`` and an ancillary buffer big
  enough for :data:`MAX_FDS_PER_FRAME` fds, with ``MSG_CMSG_CLOEXEC``, so fds
  a peer attaches are never silently dropped and never leak into children.
* Which frame do received fds belong to? Linux's UNIX stream sockets end a
  ``recvmsg`` right after the segment that carried fds (they never glue a
  later segment onto it), and such a segment starts with the first byte of
  the sender's frame. So the fds belong to the frame that holds the *last*
  byte of the chunk they arrived with. :class:`FdTracker` does that
  bookkeeping relative to the frame decoder's buffer, at no cost while no fds
  are pending.
* Fds the application did not take with ``take_received_fds()`` are closed
  when the next frame is returned, and when the transport closes, so a
  hostile peer cannot make us leak descriptors. More than
  :data:`MAX_FDS_PER_FRAME` fds on one frame (or a truncated ancillary
  buffer) is a transport-level violation: the connection breaks.
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from shared.transport._budget import limit_broken

__all__ = [
    "MAX_FDS_PER_FRAME",
    "ANCILLARY_SPACE",
    "RECVMSG_FLAGS",
    "FdTracker",
    "close_fds",
    "fds_from_ancillary",
    "rights_message",
    "rights_pieces",
    "check_fds_argument",
    "send_with_fds",
    "SendProgress",
    "FDS_PER_MESSAGE",
]

#: The most fds one frame may carry: one eventfd per MSI-X vector (PCIe allows
#: 2048) plus one spare. More is a protocol violation that breaks the connection.
MAX_FDS_PER_FRAME = 2049

#: Linux's SCM_MAX_FD: the most fds one sendmsg may carry (more fails with EINVAL).
FDS_PER_MESSAGE = 253

_FD_SIZE = array.array("i").itemsize
#: Ancillary buffer for one recvmsg: room for MAX_FDS_PER_FRAME fds (about 8 KiB).
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * _FD_SIZE)
#: Received fds are close-on-exec from the start (no window for a fork+exec to inherit).
RECVMSG_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (ignoring ones already closed) and empty the list."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            # EBADF: the owner closed it already; there is nothing left to release.
            continue
    fds.clear()


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The fds in a recvmsg's ancillary data. Raises BrokenResourceError if truncated.

    On truncation (``MSG_CTRUNC``: the peer sent more fds at once than our
    buffer holds) the fds that did arrive are closed first; the kernel already
    dropped the rest.
    """
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(received)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise trio.BrokenResourceError(
            f"peer sent more than {MAX_FDS_PER_FRAME} file descriptors at once (ancillary data "
            "truncated); disconnecting it"
        )
    return fds


def check_fds_argument(fds: Sequence[int]) -> list[int]:
    """Validate what a caller wants to send: 1..MAX_FDS_PER_FRAME non-negative ints."""
    fd_list = list(fds)
    if not 1 <= len(fd_list) <= MAX_FDS_PER_FRAME:
        raise ValueError(
            f"send between 1 and {MAX_FDS_PER_FRAME} file descriptors with one frame, "
            f"not {len(fd_list)}; use send_frame for frames without fds"
        )
    for fd in fd_list:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"{fd!r} is not a file descriptor (a non-negative int)")
    return fd_list


def rights_message(fds: Sequence[int]) -> list[tuple[int, int, Any]]:
    """The ancillary data list for ``sendmsg`` that carries ``fds``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def rights_pieces(data: bytes, fds: Sequence[int]) -> list[tuple[memoryview, list[int]]]:
    """Split an encoded frame into sendmsg pieces so each carries <= FDS_PER_MESSAGE fds.

    All but the last piece are one byte long; the last piece is the rest of
    the frame and carries the last group (possibly empty when ``fds`` is).
    """
    groups = [list(fds[i : i + FDS_PER_MESSAGE]) for i in range(0, len(fds), FDS_PER_MESSAGE)]
    if len(groups) > len(data):
        raise ValueError(
            f"a {len(data)}-byte frame cannot carry {len(fds)} file descriptors "
            f"({FDS_PER_MESSAGE} per byte at most)"
        )
    view = memoryview(data)
    if not groups:
        return [(view, [])]
    pieces = [(view[i : i + 1], group) for i, group in enumerate(groups[:-1])]
    pieces.append((view[len(groups) - 1 :], groups[-1]))
    return pieces


SendPiece = Callable[[memoryview, list[int]], Awaitable[int]]


class SendProgress:
    """How many bytes of a frame :func:`send_with_fds` got out (to tell torn from unsent)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


async def send_with_fds(
    send_piece: SendPiece, data: bytes, fds: Sequence[int], progress: SendProgress
) -> None:
    """Send encoded frame ``data`` with ``fds`` tied to it (see :func:`rights_pieces`).

    ``send_piece(view, fds)`` makes one (possibly partial) ``sendmsg`` and
    returns the bytes it sent; the fds go with its first byte. ``progress``
    counts the bytes sent, so a caller that gets cancelled knows whether the
    frame is torn.
    """
    for piece, group in rights_pieces(data, fds):
        while piece:
            n = await send_piece(piece, group)
            group = []  # the fds went with the first byte of this piece
            piece = piece[n:]
            progress.sent += n


class FdTracker:
    """Associates fds received on a byte stream with the frame they came with.

    The owner feeds every received chunk to its frame decoder and then calls
    :meth:`on_chunk` with the decoder's buffered byte count and the chunk's
    fds; it calls :meth:`on_frame` for every frame it takes off the decoder,
    but only while :attr:`busy` is true (so the hot path costs one attribute
    test). Offsets are relative to the start of the decoder's buffer, which is
    always the start of the next frame.
    """

    __slots__ = ("_batches", "_pending", "_received", "busy", "limit", "what")

    def __init__(self, what: str = "transport", *, limit: int | None = None) -> None:
        # Each batch: [bytes from the next frame's start to the end of the chunk, fds].
        self._batches: deque[list[Any]] = deque()
        self._received: list[int] = []
        self._pending = 0  # fds in _batches
        #: True while fds are pending or held; the owner calls on_frame only then.
        self.busy = False
        self.what = what
        #: Most fds pending at once (``max_fds_per_connection``); at most one frame's worth.
        self.limit = MAX_FDS_PER_FRAME if limit is None else min(limit, MAX_FDS_PER_FRAME)

    @property
    def held(self) -> int:
        """Fds this tracker holds now (pending for their frame, or untaken)."""
        return self._pending + len(self._received)

    def on_chunk(self, buffered: int, fds: list[int]) -> None:
        """A chunk with ``fds`` was fed; the decoder now holds ``buffered`` bytes."""
        if not fds:
            return
        if buffered <= 0:
            # fds without a byte to hang on (cannot happen on a stream socket): refuse them.
            close_fds(fds)
            return
        self._pending += len(fds)
        self._batches.append([buffered, fds])
        self.busy = True
        if self._pending > self.limit:
            # Only one frame's worth may wait for its frame to complete; more is hostile.
            self.close()
            raise limit_broken(
                "max_fds_per_connection",
                f"{self.what}: peer sent more than {self.limit} file descriptors ahead of "
                "their frame (limits.max_fds_per_connection); disconnecting it",
            )

    def on_frame(self, frame_length: int) -> None:
        """The decoder returned a frame of ``frame_length`` bytes (header included)."""
        if self._received:
            close_fds(self._received)  # the application did not take them: never leak
        attached: list[int] = []
        batches = self._batches
        while batches and batches[0][0] <= frame_length:
            fds = batches.popleft()[1]
            self._pending -= len(fds)
            attached.extend(fds)
        for batch in batches:
            batch[0] -= frame_length
        if len(attached) > MAX_FDS_PER_FRAME:
            close_fds(attached)
            self.close()
            raise trio.BrokenResourceError(
                f"peer attached more than {MAX_FDS_PER_FRAME} file descriptors to one frame; "
                "disconnecting it"
            )
        self._received = attached
        self.busy = bool(batches or attached)

    def attach(self, fds: list[int]) -> None:
        """Make ``fds`` the fds of the frame just returned (closing untaken older ones)."""
        if self._received:
            close_fds(self._received)
        self._received = fds
        self.busy = bool(self._batches or fds)

    def drop_received(self) -> None:
        """A frame without fds was returned: close any untaken fds of the previous one."""
        if self._received:
            close_fds(self._received)
        self.busy = bool(self._batches)

    def take(self) -> list[int]:
        """The fds of the frame most recently returned; the caller owns them now."""
        fds, self._received = self._received, []
        self.busy = bool(self._batches)
        return fds

    def close(self) -> None:
        """Close every fd held or pending (the transport is closing or broke)."""
        close_fds(self._received)
        while self._batches:
            close_fds(self._batches.popleft()[1])
        self._pending = 0
        self.busy = False
