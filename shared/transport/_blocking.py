"""Blocking frame transports for code that runs without trio (``pcifront.blocking``).

The same wire formats as the trio transports, driven from the calling thread:
``unix:``, ``tcp://``, ``tls://`` and ``vsock://`` carry length-prefixed frames
(``shared.protocol._framing``) on a socket; ``shm:`` runs the same bootstrap
as :mod:`shared.transport._shm` (handshake on the UNIX socket, then one sealed
memfd with a ring per direction and an eventfd doorbell per side) and then
moves frames on the ring.

Waiting is one ``poll(2)`` on the doorbell and the control socket (whose EOF
is the peer's death, as in the trio transport). With ``poll_us`` the receiver
first spins on the ring index in C (``pcisplit_ring_spin``, called through
cffi with the GIL released) for up to that budget after each message, which
saves the eventfd wake-up when the peer answers quickly.

Errors follow the trio transports' contract, reusing trio's exception
classes (nothing here runs a trio event loop): :class:`trio.EndOfChannel`
on a clean close, :class:`trio.BrokenResourceError` when the connection broke
or the peer corrupted the ring, :class:`trio.ClosedResourceError` after
:meth:`BlockingTransport.close`, and :class:`trio.BusyResourceError` when a
second thread sends (or receives) while another one is (the rule of
:class:`shared.sync.ThreadConflictDetector`). A receive whose deadline passes
returns None. ``shared.transport.blocking_conformance`` checks all of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import time

import trio

from shared.errors import RemoteProtocolError
from shared.protocol._framing import FrameDecoder, encode_frame
from shared.ring import RingCorruptError, RingError, RingFullError
from shared.sync import ThreadConflictDetector
from shared.transport._base import (
    RECEIVE_CONFLICT,
    SEND_CONFLICT,
    FdPassingUnsupportedError,
    FrameTooLargeError,
    TransportAddressError,
    TransportConnectError,
    TransportOptions,
)
from shared.transport._fdpass import close_fds, rights_message
from shared.transport._identity import PeerIdentity, peercred_identity
from shared.transport._shm_setup import _GOODBYE, _Session, check_setup_reply, offer_session
from shared.transport._sockets import (
    parse_host_port,
    parse_vsock,
    unix_connect_problem,
    vsock_family,
)

__all__ = [
    "BlockingTransport",
    "BlockingStreamTransport",
    "BlockingShmTransport",
    "open_blocking_transport",
    "BLOCKING_SCHEMES",
]

#: Address schemes :func:`open_blocking_transport` understands.
BLOCKING_SCHEMES = ("unix", "shm", "tcp", "tls", "vsock")
_CHUNK = 65536


def _ms_until(deadline: float | None) -> int | None:
    """``poll(2)`` timeout in ms for ``deadline`` (time.monotonic seconds); None: forever."""
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))


def _broken(what: str, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError(f"transport closed during {what}")
    return trio.BrokenResourceError(f"{what} failed: {exc.strerror or exc}")


class BlockingTransport:
    """One end of a connection carrying frames, driven by blocking calls.

    One thread may send while another receives; a second sender or receiver
    gets :class:`trio.BusyResourceError`.
    """

    max_frame_size: int

    @property
    def can_pass_fds(self) -> bool:
        """True when :meth:`send_frame` takes ``fds`` now."""
        return False

    @property
    def receiving(self) -> bool:
        """True while a thread is inside :meth:`receive_frame`."""
        return False

    def send_frame(self, frame: bytes, fds: list[int] | None = None) -> None:
        """Send one whole frame, with ``fds`` attached where :attr:`can_pass_fds`."""
        raise NotImplementedError

    def receive_frame(self, deadline: float | None = None) -> bytes | None:
        """The next frame, or None once ``deadline`` (``time.monotonic()``) has passed."""
        raise NotImplementedError

    def receive_frame_nowait(self) -> bytes | None:
        """A frame that is already here, or None; never waits."""
        return None

    def peer_identity(self) -> PeerIdentity:
        """Who is at the other end, as far as the transport can tell (see PeerIdentity)."""
        return PeerIdentity(self.describe())

    def set_max_frame_size(self, size: int) -> None:
        self.max_frame_size = size

    def start_session(self, max_frame_size: int) -> None:
        """After the handshake (``shm:`` moves onto the ring here)."""

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None:
        raise NotImplementedError


class BlockingStreamTransport(BlockingTransport):
    """Length-prefixed frames on a blocking socket (``unix:``, ``tcp://``, ``tls://``)."""

    def __init__(self, sock: socket.socket, max_frame_size: int, *, name: str) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._decoder = FrameDecoder(max_frame_size)
        self.max_frame_size = max_frame_size
        self._name = name
        self._eof = False
        self._closed = False
        self._send_conflicts = ThreadConflictDetector(SEND_CONFLICT)
        self._receive_conflicts = ThreadConflictDetector(RECEIVE_CONFLICT)

    @property
    def can_pass_fds(self) -> bool:
        return self._sock.family == socket.AF_UNIX and not self._closed

    @property
    def receiving(self) -> bool:
        return self._receive_conflicts.held

    def peer_identity(self) -> PeerIdentity:
        """SO_PEERCRED on UNIX sockets (``unix:``, ``shm:``), else the peer's address."""
        sock = self._sock
        if sock.family == socket.AF_UNIX:
            return peercred_identity(sock, self._name)
        try:
            peer = sock.getpeername()
        except OSError:
            return PeerIdentity(self._name)
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        return PeerIdentity(self._name, address=address)

    def describe(self) -> str:
        return self._name

    def set_max_frame_size(self, size: int) -> None:
        self.max_frame_size = size
        self._decoder.max_frame_size = size

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"{self._name} was closed")

    def send_frame(self, frame: bytes, fds: list[int] | None = None) -> None:
        sending = self._send_conflicts
        if not sending.claim():
            raise sending.error()
        try:
            self._send_stream(frame, fds)
        finally:
            sending.release()

    def _send_stream(self, frame: bytes, fds: list[int] | None) -> None:
        """One frame on the socket; the caller holds the send side."""
        self._check_open()
        if fds and not self.can_pass_fds:
            raise FdPassingUnsupportedError(
                f"{self._name} cannot pass file descriptors (only unix: and shm: before its "
                "session starts can); send the frame without them"
            )
        if len(frame) > self.max_frame_size:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the {self.max_frame_size}-byte limit"
            )
        data = encode_frame(frame)
        try:
            if fds:
                sent = self._sock.sendmsg([data], rights_message(fds))
                data = data[sent:]
            if data:
                self._sock.sendall(data)
        except OSError as exc:
            raise _broken(f"sending on {self._name}", exc) from exc

    def _readable(self, deadline: float | None) -> bool:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes wait inside the TLS layer, invisible to poll
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(_ms_until(deadline)))

    def receive_frame(self, deadline: float | None = None) -> bytes | None:
        receiving = self._receive_conflicts
        if not receiving.claim():
            raise receiving.error()
        try:
            return self._receive_stream(deadline)
        finally:
            receiving.release()

    def _receive_stream(self, deadline: float | None) -> bytes | None:
        """The next frame from the socket; the caller holds the receive side."""
        self._check_open()
        while True:
            try:
                frame = self._decoder.next_frame()
            except RemoteProtocolError as exc:  # an oversized frame announced
                raise trio.BrokenResourceError(f"{self._name}: {exc}") from exc
            if frame is not None:
                return frame
            if self._eof:
                if self._decoder.buffered:
                    raise trio.BrokenResourceError(
                        f"{self._name}: peer closed the connection in the middle of a frame"
                    )
                raise trio.EndOfChannel(f"{self._name}: peer closed the connection")
            if not self._readable(deadline):
                return None
            try:
                data = self._sock.recv(_CHUNK)
            except OSError as exc:
                raise _broken(f"receiving on {self._name}", exc) from exc
            if not data:
                self._eof = True
            self._decoder.feed(data)

    def receive_frame_nowait(self) -> bytes | None:
        """A frame already decoded from bytes received earlier, or None (no system call).

        None too while another thread receives (its decoder is not ours to touch).
        """
        receiving = self._receive_conflicts
        if not receiving.claim():
            return None
        try:
            return self._decoder.next_frame()
        except RemoteProtocolError:
            return None  # reported by the next receive_frame
        finally:
            receiving.release()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):
            # A clean TLS end is a close_notify: without it the peer sees a truncated
            # stream (a broken connection), not the end of one. Sent without waiting
            # for the peer's own close_notify (SSLWantReadError), which may never come.
            with contextlib.suppress(OSError, ValueError):
                sock.setblocking(False)
                sock.unwrap()
        with contextlib.suppress(OSError):
            sock.close()


class BlockingShmTransport(BlockingStreamTransport):
    """``shm:``: the handshake on the UNIX socket, then frames on the shared ring."""

    def __init__(
        self, sock: socket.socket, options: TransportOptions, *, name: str
    ) -> None:
        super().__init__(sock, options.max_frame_size, name=name)
        self._options = options
        poll_us = 0.0 if options.poll_us is None else float(options.poll_us)
        if poll_us < 0:
            raise ValueError(f"poll_us must be >= 0, not {poll_us}")
        self._poll_ns = int(poll_us * 1000)
        self._session: _Session | None = None
        self._rx = -1
        self._tx = -1
        self._peer_gone: str | None = None  # why; "" for a clean goodbye
        self.spin_hits = 0
        self.spin_misses = 0
        self.doorbell_sleeps = 0

    @property
    def can_pass_fds(self) -> bool:
        # After the session starts fds would need the FDS/FDA control exchange; the
        # blocking client never sends fds then (interrupts travel in band).
        return self._session is None and not self._closed

    def start_session(self, max_frame_size: int) -> None:
        self._check_open()
        sending, receiving = self._send_conflicts, self._receive_conflicts
        if not sending.claim():
            raise trio.BusyResourceError("cannot start the session while a send or receive runs")
        if not receiving.claim():
            sending.release()
            raise trio.BusyResourceError("cannot start the session while a send or receive runs")
        try:
            self.set_max_frame_size(max_frame_size)
            try:
                # The same offer as the trio client's (see shared.transport._shm_setup).
                session, setup, fds = offer_session(self._options.ring_size, max_frame_size)
                try:
                    self._send_stream(setup, fds)
                    check_setup_reply(self._receive_stream(None) or b"")
                except trio.EndOfChannel as exc:
                    session.close()
                    raise trio.BrokenResourceError(
                        "server closed the connection during shm setup"
                    ) from exc
                except BaseException:
                    session.close()
                    raise
                finally:
                    close_fds(fds[:1])  # the memfd: the mapping keeps the memory
            except (RingError, OSError, ValueError) as exc:
                raise trio.BrokenResourceError(f"shm session setup failed: {exc}") from exc
            self._session = session
            self._rx, self._tx = session.rx_port.fileno(), session.tx_port.fileno()
        finally:
            sending.release()
            receiving.release()

    # -- frames ---------------------------------------------------------------------
    def _check_peer(self) -> None:
        if self._peer_gone is not None:
            if self._peer_gone == "":
                raise trio.EndOfChannel("peer closed the connection")
            raise trio.BrokenResourceError(self._peer_gone)

    def _ring(self) -> None:
        try:
            os.eventfd_write(self._tx, 1)
        except BlockingIOError:
            pass  # the counter is saturated: a notification is pending anyway
        except OSError as exc:
            raise _broken("ringing the peer's doorbell", exc) from exc

    def _control(self) -> None:
        """The control socket is readable: the peer's goodbye, its death, or nonsense."""
        try:
            frame = self._receive_stream(time.monotonic())
        except trio.EndOfChannel:
            self._peer_gone = "peer closed the shm control socket without saying goodbye (died?)"
            return
        except trio.BrokenResourceError as exc:
            self._peer_gone = f"shm control socket broke: {exc}"
            return
        if frame is None:
            return
        if frame == _GOODBYE:
            self._peer_gone = ""
        else:
            self._peer_gone = (
                f"peer sent an unexpected {len(frame)}-byte frame on the shm control socket"
            )

    def _wait(self, deadline: float | None) -> bool:
        """Sleep until the doorbell rings or the socket speaks. False: deadline passed."""
        poller = select.poll()
        poller.register(self._rx, select.POLLIN)
        poller.register(self._sock, select.POLLIN)
        self.doorbell_sleeps += 1
        events = poller.poll(_ms_until(deadline))
        if not events:
            return False
        for fd, _ in events:
            if fd == self._rx:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._rx)
            else:
                self._control()
        return True

    def send_frame(self, frame: bytes, fds: list[int] | None = None) -> None:
        session = self._session
        if session is None:
            super().send_frame(frame, fds)
            return
        sending = self._send_conflicts
        if not sending.claim():
            raise sending.error()
        try:
            self._check_open()
            if fds:
                raise FdPassingUnsupportedError(
                    "the blocking shm: transport sends no file descriptors after the session "
                    "started (can_pass_fds is False)"
                )
            producer = session.producer
            while True:
                if self._peer_gone is not None:
                    # A send never reports a goodbye as the end of the stream: the
                    # frame cannot arrive, so the connection is broken for us.
                    raise trio.BrokenResourceError(
                        self._peer_gone or "peer closed the connection; cannot send"
                    )
                try:
                    notify = producer.send_nowait(frame)
                except RingFullError:
                    if producer.prepare_wait_space(len(frame)):
                        continue
                    self._wait(None)
                    continue
                except RingCorruptError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
                except RingError as exc:
                    raise FrameTooLargeError(str(exc)) from exc
                break
            if notify:
                self._ring()
        finally:
            sending.release()

    def receive_frame(self, deadline: float | None = None) -> bytes | None:
        session = self._session
        if session is None:
            return super().receive_frame(deadline)
        self._check_open()
        receiving = self._receive_conflicts
        if not receiving.claim():
            raise receiving.error()
        consumer = session.consumer
        try:
            while True:
                gone = self._peer_gone  # frames sent before the goodbye still count
                item = consumer.receive_nowait()
                if item is not None:
                    frame, wake = item
                    if wake:
                        self._ring()
                    return frame
                if gone is not None:
                    self._check_peer()
                if self._poll_ns:
                    if consumer.spin(self._poll_ns):
                        self.spin_hits += 1
                        continue
                    self.spin_misses += 1
                if consumer.prepare_wait():
                    continue
                if not self._wait(deadline):
                    return None
        except RingCorruptError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        finally:
            receiving.release()

    def receive_frame_nowait(self) -> bytes | None:
        session = self._session
        if session is None:
            return super().receive_frame_nowait()
        receiving = self._receive_conflicts
        if not receiving.claim():
            return None  # another thread receives
        try:
            item = session.consumer.receive_nowait()
            if item is None:
                return None
            if item[1]:
                self._ring()
            return item[0]
        except RingCorruptError:
            return None  # the next receive_frame reports it
        finally:
            receiving.release()

    def close(self) -> None:
        if self._closed:
            return
        session, self._session = self._session, None
        if session is not None and self._peer_gone is None:
            # Without the goodbye the backend reports our close as a death.
            with contextlib.suppress(OSError):
                self._sock.send(encode_frame(_GOODBYE))
        super().close()
        if session is not None:
            session.close()


def open_blocking_transport(address: str, options: TransportOptions) -> BlockingTransport:
    """Connect to ``address`` (``unix:``, ``shm:``, ``tcp://``, ``tls://``, ``vsock://``).

    Raises :class:`TransportAddressError` for another scheme or a malformed
    address and :class:`TransportConnectError` when nothing answers there.
    """
    scheme, _, rest = address.partition(":")
    if scheme not in BLOCKING_SCHEMES or not rest:
        raise TransportAddressError(
            f"the blocking client speaks {', '.join(BLOCKING_SCHEMES)}; {address!r} is not "
            "one of them (use pcifront.connect from trio for other transports)"
        )
    limit = options.max_frame_size
    if scheme in ("unix", "shm"):
        if rest.startswith("//"):
            raise TransportAddressError(f"address {address!r}: {scheme}: takes a path, not //")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(rest)
        except OSError as exc:
            sock.close()
            raise TransportConnectError(unix_connect_problem(address, rest, exc)) from exc
        if scheme == "shm":
            return BlockingShmTransport(sock, options, name=address)
        return BlockingStreamTransport(sock, limit, name=address)
    if scheme == "vsock":
        return _connect_vsock(address, rest, limit)
    if not rest.startswith("//"):
        raise TransportAddressError(f"address {address!r} needs the form {scheme}://HOST:PORT")
    host, port = parse_host_port(rest[2:], scheme)
    try:
        tcp = socket.create_connection((host, port))
    except OSError as exc:
        raise TransportConnectError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if scheme == "tcp":
        return BlockingStreamTransport(tcp, limit, name=address)
    ctx = options.ssl_context
    if not isinstance(ctx, ssl.SSLContext):
        tcp.close()
        raise TransportConnectError(
            f"{address} needs TransportOptions(ssl_context=...) with the CA and client certificate"
        )
    try:
        tls = ctx.wrap_socket(tcp, server_hostname=options.server_hostname or host)
    except (OSError, ssl.SSLError) as exc:
        tcp.close()
        raise TransportConnectError(f"cannot connect to {address}: {exc}") from exc
    return BlockingStreamTransport(tls, limit, name=address)


def _connect_vsock(address: str, rest: str, limit: int) -> BlockingStreamTransport:
    """``vsock://CID:PORT``: frames on an AF_VSOCK stream socket, as on TCP."""
    if not rest.startswith("//"):
        raise TransportAddressError(f"address {address!r} needs the form vsock://CID:PORT")
    cid, port = parse_vsock(rest[2:])
    sock = socket.socket(vsock_family(), socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect((cid, port))
    except OSError as exc:
        sock.close()
        raise TransportConnectError(
            f"cannot connect to {address}: {exc.strerror or exc}; is `pciback serve` listening "
            "there, and does this kernel have a vsock transport for that CID?"
        ) from exc
    return BlockingStreamTransport(sock, limit, name=address)
