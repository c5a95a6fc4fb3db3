"""The ``shm:`` bootstrap: wire format, session state, the exchange and its validation.

Split out of ``_shm.py`` (the transport itself): :func:`offer_setup` and
:func:`accept_setup` run the exchange on the control socket (the blocking
client runs the same offer through :func:`offer_session` and
:func:`check_setup_reply`). The peer is untrusted: every
field of its setup frame and every fd it sent is checked before we map
anything (see :func:`validate_setup`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass

import trio

from shared.evtchn import EventfdPort
from shared.ring import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    RingConsumer,
    RingProducer,
    ShmLayout,
    ring_size_for,
)
from shared.transport._fdpass import close_fds
from shared.transport._stream import UnixFrameTransport

__all__ = [
    "ShmStatistics",
    "accept_session",
    "accept_setup",
    "check_setup_reply",
    "offer_session",
    "offer_setup",
    "validate_setup",
]

# Setup frame: magic, version, flags, ring sizes, max record, region size.
_SETUP = struct.Struct("<4sHHIIIQ")
_SETUP_MAGIC = b"PSHM"
_SETUP_VERSION = 1
_ACK = b"PSHM-ACK\x01"
_GOODBYE = b"PSHM-BYE"
_SETUP_FDS = 3  # memfd, doorbell to the server, doorbell to the client
# Control frames after the session started: fds for ring frame `seq`, and their ack.
_FDS_MARK = b"PSHM-FDS"
_FDS_ACK = b"PSHM-FDA"
_SEQ = struct.Struct("<Q")
#: Fd batches a peer may announce ahead of their ring frames (an honest peer: one).
_MAX_FD_BATCHES = 16
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_YIELD_EVERY = 16  # send_frame yields to the scheduler once per this many frames


@dataclass(frozen=True, slots=True)
class ShmStatistics:
    """Counters of one ``shm:`` endpoint (see :meth:`ShmTransport.statistics`)."""

    frames_sent: int
    frames_received: int
    doorbells_sent: int
    doorbell_sleeps: int
    spin_hits: int
    spin_misses: int
    space_waits: int


def _close_fds(fds: list[int]) -> None:
    close_fds(fds)


class _Session:
    """What exists only once the session moved to the ring."""

    __slots__ = ("consumer", "layout", "mm", "producer", "rx_port", "tx_port")

    def __init__(
        self, layout: ShmLayout, mm: mmap.mmap, *, is_server: bool,
        rx_port: EventfdPort, tx_port: EventfdPort,
    ) -> None:
        self.layout = layout
        self.mm = mm
        self.rx_port = rx_port
        self.tx_port = tx_port
        tx_dir, rx_dir = SERVER_TO_CLIENT, CLIENT_TO_SERVER
        if not is_server:
            tx_dir, rx_dir = rx_dir, tx_dir
        self.producer = RingProducer(mm, layout.ring_spec(tx_dir))
        try:
            self.consumer = RingConsumer(mm, layout.ring_spec(rx_dir))
        except BaseException:
            self.producer.release()
            raise

    def close(self) -> None:
        # Ring ends must let go of the mapping before mmap.close() (BufferError otherwise).
        self.producer.release()
        self.consumer.release()
        self.rx_port.close()
        self.tx_port.close()
        self.mm.close()


def validate_setup(frame: bytes, fds: list[int], max_frame_size: int) -> ShmLayout:
    """Check the client's setup frame and fds; everything later uses this private copy."""
    if len(frame) != _SETUP.size:
        raise trio.BrokenResourceError(
            f"shm setup frame has {len(frame)} bytes, expected {_SETUP.size}; "
            "is the client speaking shm:?"
        )
    magic, version, _flags, size_c2s, size_s2c, max_record, total = _SETUP.unpack(frame)
    if magic != _SETUP_MAGIC or version != _SETUP_VERSION:
        raise trio.BrokenResourceError(
            f"shm setup has magic {magic!r} version {version}; expected "
            f"{_SETUP_MAGIC!r} version {_SETUP_VERSION}"
        )
    if len(fds) != _SETUP_FDS:
        raise trio.BrokenResourceError(
            f"shm setup came with {len(fds)} file descriptors, expected {_SETUP_FDS} "
            "(memfd, two eventfds)"
        )
    if max_record != max_frame_size:
        raise trio.BrokenResourceError(
            f"client set the ring up for {max_record}-byte frames but the negotiated limit "
            f"is {max_frame_size}; both sides must pass the handshake's max_frame_size"
        )
    layout = ShmLayout(size_c2s, size_s2c, max_record)  # RingError if sizes are bad
    if total != layout.total:
        raise trio.BrokenResourceError(
            f"shm setup claims {total} bytes but its rings need exactly {layout.total}"
        )
    st = os.fstat(fds[0])
    if not stat.S_ISREG(st.st_mode) or st.st_size != layout.total:
        raise trio.BrokenResourceError(
            f"shm memory fd is not a {layout.total}-byte memfd (mode {st.st_mode:o}, "
            f"size {st.st_size})"
        )
    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise trio.BrokenResourceError(
            "shm memfd is not sealed against shrinking and growing; the client could "
            "make our accesses fault"
        )
    for fd in fds[1:]:
        kind = os.readlink(f"/proc/self/fd/{fd}")
        if kind != "anon_inode:[eventfd]":
            raise trio.BrokenResourceError(f"shm doorbell fd is {kind!r}, not an eventfd")
    return layout


def offer_session(
    ring_size: int, max_frame_size: int, *, initial_index: int = 0
) -> tuple[_Session, bytes, list[int]]:
    """The client's half of the bootstrap, up to what it sends.

    Creates a memfd holding one ring per direction, sealed so the server can
    trust its size (a shrink would make the server's accesses fault), and one
    eventfd doorbell per side. Returns the client's session, the setup frame
    and the fds to send with it: the memfd, the server's doorbell, the
    client's doorbell. The session owns the doorbells; the memfd (``fds[0]``)
    is the caller's to close once sent (the mapping keeps the memory).
    Used by the trio transport and the blocking client alike.
    """
    ring = ring_size_for(ring_size, max_frame_size)
    layout = ShmLayout(ring, ring, max_frame_size)
    memfd = os.memfd_create("pcisplit-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, layout.total)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(memfd, layout.total)
        with contextlib.ExitStack() as undo:
            undo.callback(mm.close)
            to_server = EventfdPort.create()
            undo.callback(to_server.close)
            to_client = EventfdPort.create()
            undo.callback(to_client.close)
            layout.initialise(mm, initial_index=initial_index)
            session = _Session(layout, mm, is_server=False, rx_port=to_client, tx_port=to_server)
            undo.pop_all()
    except BaseException:
        os.close(memfd)
        raise
    setup = _SETUP.pack(
        _SETUP_MAGIC, _SETUP_VERSION, 0, layout.size_c2s, layout.size_s2c,
        layout.max_record, layout.total,
    )
    return session, setup, [memfd, to_server.fileno(), to_client.fileno()]


def check_setup_reply(reply: bytes) -> None:
    """The client's check of the server's answer to its setup frame."""
    if reply != _ACK:
        raise trio.BrokenResourceError(
            f"server answered the shm setup with {reply[:32]!r}, not an "
            "acknowledgement; does it serve shm: on this socket?"
        )


def accept_session(frame: bytes, fds: list[int], max_frame_size: int) -> _Session:
    """The server's half: validate the client's setup and map it. Closes all of ``fds``.

    Raises :class:`trio.BrokenResourceError` for a setup we refuse (see
    :func:`validate_setup`); :class:`OSError` or ``RingError`` if mapping fails.
    """
    try:
        layout = validate_setup(frame, fds, max_frame_size)
        with contextlib.ExitStack() as undo:
            mm = mmap.mmap(fds[0], layout.total)
            undo.callback(mm.close)
            rx_port = EventfdPort(fds[1])  # the port owns the fd from here
            fds[1] = -1
            undo.callback(rx_port.close)
            tx_port = EventfdPort(fds[2])
            fds[2] = -1
            undo.callback(tx_port.close)
            session = _Session(layout, mm, is_server=True, rx_port=rx_port, tx_port=tx_port)
            undo.pop_all()
        return session
    finally:
        _close_fds([fd for fd in fds if fd >= 0])


async def offer_setup(
    control: UnixFrameTransport, ring_size: int, max_frame_size: int, initial_index: int = 0
) -> _Session:
    """Client: offer a new session on the control socket and map it once the server agrees."""
    session, setup, fds = offer_session(ring_size, max_frame_size, initial_index=initial_index)
    try:
        await control.send_frame_with_fds(setup, fds)
        check_setup_reply(await control.receive_frame())
    except trio.EndOfChannel as exc:
        session.close()
        raise trio.BrokenResourceError("server closed the connection during shm setup") from exc
    except BaseException:
        session.close()
        raise
    finally:
        _close_fds(fds[:1])  # the memfd: the mapping keeps the memory, the peer has its own
    return session


async def accept_setup(control: UnixFrameTransport, max_frame_size: int) -> _Session:
    """Server: take the client's offer from the control socket, check it, map it, agree."""
    try:
        frame, fds = await control.receive_frame_with_fds()
    except trio.EndOfChannel as exc:
        raise trio.BrokenResourceError("client closed the connection during shm setup") from exc
    session = accept_session(frame, fds, max_frame_size)
    try:
        await control.send_frame(_ACK)
    except BaseException:
        session.close()
        raise
    return session
