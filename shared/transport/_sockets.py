"""Socket-based transports: ``unix:``, ``tcp://``, ``tls://`` and ``vsock://``.

All of them are byte streams carrying length-prefixed frames
(:class:`StreamFrameTransport`). They differ only in how they connect and
listen, which is all this module does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import ssl
import stat
from typing import Any

import trio

from shared.errors import reason
from shared.transport._base import (
    FrameListener,
    FrameTransport,
    TransportAddressError,
    TransportConnectError,
    TransportOptions,
)
from shared.transport._budget import limit_broken
from shared.transport._identity import PeerIdentity
from shared.transport._stream import StreamFrameTransport, UnixFrameTransport

__all__ = [
    "connect_unix",
    "listen_unix",
    "connect_tcp",
    "listen_tcp",
    "connect_tls",
    "listen_tls",
    "connect_vsock",
    "listen_vsock",
    "parse_host_port",
    "parse_vsock",
    "vsock_family",
    "vsock_loopback_problem",
    "StreamListener",
]


def parse_host_port(rest: str, scheme: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) and validate the port."""
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit():
        raise TransportAddressError(f"{scheme}://{rest} needs the form {scheme}://HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise TransportAddressError(f"{scheme}://{rest}: port {port} is out of range 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise TransportAddressError(f"{scheme}://{rest}: the host is missing")
    return host, port


class StreamListener(FrameListener):
    """Wraps a trio :class:`~trio.abc.Listener` of streams into a frame listener."""

    def __init__(
        self,
        listeners: list[trio.abc.Listener[Any]],
        address: str,
        options: TransportOptions,
        *,
        cleanup_path: str | None = None,
        wrap_tls: bool = False,
        passes_fds: bool = False,
    ) -> None:
        self._listeners = listeners
        self.address = address
        self._options = options
        self._cleanup_path = cleanup_path
        # The socket file we bound: on close we remove that file, never a successor's.
        self._cleanup_inode = None if cleanup_path is None else _inode(cleanup_path)
        self._wrap_tls = wrap_tls
        self._passes_fds = passes_fds
        self._accepted: trio.MemoryReceiveChannel[trio.abc.Stream] | None = None
        self._closed = False

    async def accept(self) -> FrameTransport:
        if self._closed:
            raise trio.ClosedResourceError("listener closed")
        if len(self._listeners) != 1:
            raise TransportAddressError(
                f"{self.address} resolved to {len(self._listeners)} sockets; "
                "name one address (e.g. 127.0.0.1 rather than localhost)"
            )
        stream = await self._listeners[0].accept()
        name, options = f"{self.address}(peer)", self._options
        limit = options.max_frame_size
        if self._passes_fds and isinstance(stream, trio.SocketStream):
            return UnixFrameTransport(stream, max_frame_size=limit, name=name, options=options)
        return StreamFrameTransport(stream, max_frame_size=limit, name=name, options=options)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            await listener.aclose()
        if self._cleanup_path is not None:
            _unlink_if_ours(self._cleanup_path, self._cleanup_inode)


# --------------------------------------------------------------------------- unix


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _unlink_if_ours(path: str, inode: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` only if it is still the one we bound.

    Another backend may have replaced a path it found stale (ours, after we
    stopped accepting) and bound its own socket there; unlinking that would
    cut its guests off.
    """
    if inode is not None and _inode(path) == inode:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def unix_connect_problem(address: str, path: str, exc: OSError) -> str:
    """Why connecting to ``address`` (a UNIX socket at ``path``) failed, and what to do.

    A refused permission names the socket's owner and mode and the backend's keys
    that open it (``listen_mode``, ``listen_group``) and decide who may act as a
    guest (the guest's ``uid``/``gid``), instead of asking whether a backend runs.
    """
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.stat(path)
        except OSError:
            what = "the socket or a directory above it"
        else:
            what = (
                f"the socket (owner uid {st.st_uid}, group gid {st.st_gid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})"
            )
        return (
            f"cannot connect to {address}: permission denied: this process (uid {os.geteuid()}) "
            f"may not open {what}; run it as the backend's user, or let it in with the "
            'backend config\'s listen_mode = "0660" and listen_group = "GROUP" (and the '
            "guest's uid or gid keys)"
        )
    hint = "is `pciback serve` running and listening there?"
    if address.startswith("shm:"):
        hint = "is `pciback serve` listening there with shm:?"
    return f"cannot connect to {address}: {exc.strerror or exc}; {hint}"


async def connect_unix(path: str, options: TransportOptions) -> FrameTransport:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise TransportConnectError(unix_connect_problem(f"unix:{path}", path, exc)) from exc
    return UnixFrameTransport(stream, max_frame_size=options.max_frame_size, name=f"unix:{path}")


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` only if it is a UNIX socket nobody listens on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportConnectError(
            f"cannot listen on unix:{path}: a non-socket file is in the way; remove it or pick "
            "another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: the previous owner died without cleaning up
        return
    except OSError as exc:
        raise TransportConnectError(f"cannot check existing socket unix:{path}: {exc}") from exc
    finally:
        probe.close()
    raise TransportConnectError(
        f"unix:{path} is already served by another process; stop it or pick another path"
    )


async def open_unix_listener_socket(path: str) -> trio.socket.SocketType:
    """A bound, listening trio UNIX socket at ``path`` (stale sockets are replaced)."""
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportConnectError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    return sock


async def listen_unix(path: str, options: TransportOptions) -> FrameListener:
    sock = await open_unix_listener_socket(path)
    return StreamListener(
        [trio.SocketListener(sock)], f"unix:{path}", options, cleanup_path=path, passes_fds=True
    )


def _why(exc: BaseException) -> str:
    """Why a connect failed, never empty (a broken TLS stream's reason is its cause)."""
    if isinstance(exc, trio.BrokenResourceError):
        if exc.__cause__ is not None:
            return reason(exc.__cause__)
        return "the peer closed the connection during the TLS handshake"
    return reason(exc)


# --------------------------------------------------------------------------- tcp


async def connect_tcp(rest: str, options: TransportOptions) -> FrameTransport:
    host, port = parse_host_port(rest, "tcp")
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise TransportConnectError(f"cannot connect to tcp://{rest}: {_why(exc)}") from exc
    return StreamFrameTransport(stream, max_frame_size=options.max_frame_size, name=f"tcp://{rest}")


async def _tcp_listeners(rest: str, scheme: str) -> tuple[list[trio.SocketListener], str]:
    host, port = parse_host_port(rest, scheme)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise TransportConnectError(f"cannot listen on {scheme}://{rest}: {exc}") from exc
    bound = listeners[0].socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return listeners, f"{scheme}://{shown}:{bound[1]}"


async def listen_tcp(rest: str, options: TransportOptions) -> FrameListener:
    listeners, address = await _tcp_listeners(rest, "tcp")
    return StreamListener(list(listeners), address, options)


# --------------------------------------------------------------------------- tls


def _require_context(options: TransportOptions, scheme: str) -> ssl.SSLContext:
    ctx = options.ssl_context
    if not isinstance(ctx, ssl.SSLContext):
        raise TransportAddressError(
            f"{scheme}:// needs an ssl.SSLContext (TransportOptions.ssl_context); configure "
            "certificates in the [tls] section or pass --cert/--key/--ca"
        )
    return ctx


class _TlsStreamTransport(StreamFrameTransport):
    """Frames over TLS. A server end does its handshake on first use, per connection.

    The listener's ``accept`` returns before the handshake, so a client that
    connects and sends nothing holds only its own connection (issue 8, stall 7);
    the handshake runs in the connection's task under
    ``TransportOptions.tls_handshake_timeout``.
    """

    _handshake_timeout: float | None = None
    _handshaken = False

    async def do_handshake(self) -> None:
        await self._ensure_handshake()
        await trio.lowlevel.checkpoint()

    async def _ensure_handshake(self) -> None:
        if self._handshaken:
            return
        stream = self.stream
        assert isinstance(stream, trio.SSLStream)
        timeout = self._handshake_timeout
        with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
            await stream.do_handshake()
        if scope.cancelled_caught:
            message = f"{self.describe()}: no TLS handshake within {timeout} s; disconnecting"
            self._broken = message
            raise limit_broken("handshake_timeout", message)
        self._handshaken = True

    async def receive_frame(self) -> bytes:
        await self._ensure_handshake()
        return await super().receive_frame()

    async def send_frame(self, frame: bytes) -> None:
        await self._ensure_handshake()
        await super().send_frame(frame)

    async def send_frames(self, frames: list[bytes]) -> None:
        await self._ensure_handshake()
        await super().send_frames(frames)

    def peer_identity(self) -> PeerIdentity:
        identity = super().peer_identity()
        stream = self.stream
        if isinstance(stream, trio.SSLStream) and self._handshaken:
            # getpeercert() is empty unless the handshake verified the certificate
            # against the configured CA, so these names are vouched for.
            cert = stream.getpeercert()
            if cert:
                subject = cert.get("subject", ())
                names = [v for rdn in subject for (k, v) in rdn if k == "commonName"]
                names += [v for (k, v) in cert.get("subjectAltName", ()) if k == "DNS"]
                identity = dataclasses.replace(identity, cert_names=tuple(names))
        return identity


class _TlsListener(StreamListener):
    async def accept(self) -> FrameTransport:
        if self._closed:
            raise trio.ClosedResourceError("listener closed")
        stream = await self._listeners[0].accept()
        assert isinstance(stream, trio.SSLStream)
        options = self._options
        transport = _TlsStreamTransport(
            stream,
            max_frame_size=options.max_frame_size,
            name=f"{self.address}(peer)",
            options=options,
        )
        transport._handshake_timeout = options.tls_handshake_timeout
        return transport


async def connect_tls(rest: str, options: TransportOptions) -> FrameTransport:
    host, port = parse_host_port(rest, "tls")
    ctx = _require_context(options, "tls")
    try:
        tcp = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(
            tcp, ctx, server_hostname=options.server_hostname or host, https_compatible=False
        )
        await stream.do_handshake()
    except (OSError, trio.BrokenResourceError) as exc:
        raise TransportConnectError(f"cannot connect to tls://{rest}: {_why(exc)}") from exc
    transport = _TlsStreamTransport(
        stream, max_frame_size=options.max_frame_size, name=f"tls://{rest}"
    )
    transport._handshaken = True
    return transport


async def listen_tls(rest: str, options: TransportOptions) -> FrameListener:
    ctx = _require_context(options, "tls")
    listeners, address = await _tcp_listeners(rest, "tls")
    ssl_listeners: list[trio.abc.Listener[Any]] = [
        trio.SSLListener(lst, ctx, https_compatible=False) for lst in listeners
    ]
    return _TlsListener(ssl_listeners, address, options)


# --------------------------------------------------------------------------- vsock


def parse_vsock(rest: str) -> tuple[int, int]:
    """``CID:PORT`` (after ``vsock://``) as numbers; ``any`` or ``-1`` is VMADDR_CID_ANY."""
    cid_text, sep, port_text = rest.partition(":")
    if not sep or not port_text.isdigit():
        raise TransportAddressError(f"vsock://{rest} needs the form vsock://CID:PORT")
    if cid_text in ("any", "-1"):
        cid = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
    elif cid_text.isdigit():
        cid = int(cid_text)
    else:
        raise TransportAddressError(f"vsock://{rest}: CID {cid_text!r} is not a number")
    return cid, int(port_text)


def vsock_family() -> int:
    """``socket.AF_VSOCK``, or :class:`TransportConnectError` where the platform has none."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise TransportConnectError("this platform has no AF_VSOCK support")
    return int(family)


def vsock_loopback_problem(timeout: float = 2.0) -> str | None:
    """Why loopback vsock (CID 1) cannot carry a connection here, or None when it can.

    Listens on a free port and connects to it through CID 1 (blocking, at
    most ``timeout`` seconds). Many machines (CI runners, containers) have no
    vsock transport for it; tests that need it skip with this reason.
    """
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return "this Python has no AF_VSOCK"
    try:
        srv = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot create an AF_VSOCK socket: {exc}"
    try:
        srv.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        srv.listen(1)
        port = srv.getsockname()[1]
        cli = socket.socket(family, socket.SOCK_STREAM)
        cli.settimeout(timeout)
        try:
            cli.connect((1, port))  # CID 1: local loopback
        finally:
            cli.close()
    except OSError as exc:
        return f"vsock loopback (CID 1) does not answer on this machine: {exc}"
    finally:
        srv.close()
    return None


async def connect_vsock(rest: str, options: TransportOptions) -> FrameTransport:
    cid, port = parse_vsock(rest)
    sock = trio.socket.socket(vsock_family(), socket.SOCK_STREAM)
    try:
        await sock.connect((cid, port))
    except OSError as exc:
        sock.close()
        hint = (
            " (the kernel has no vsock transport for this CID)"
            if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL, errno.ENETUNREACH)
            else ""
        )
        raise TransportConnectError(f"cannot connect to vsock://{rest}: {_why(exc)}{hint}") from exc
    stream = trio.SocketStream(sock)
    return StreamFrameTransport(
        stream, max_frame_size=options.max_frame_size, name=f"vsock://{rest}"
    )


async def listen_vsock(rest: str, options: TransportOptions) -> FrameListener:
    cid, port = parse_vsock(rest)
    sock = trio.socket.socket(vsock_family(), socket.SOCK_STREAM)
    try:
        await sock.bind((cid, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportConnectError(f"cannot listen on vsock://{rest}: {exc}") from exc
    bound_cid, bound_port = sock.getsockname()
    return StreamListener([trio.SocketListener(sock)], f"vsock://{bound_cid}:{bound_port}", options)
