"""What a transport knows about the peer at the other end: :class:`PeerIdentity`.

The backend decides whether a connection may act as the guest it names from
this object alone (``pciback.guests.identity``), so every transport reports the same
typed fields instead of a dict read by string key:

* ``unix:`` and ``shm:``: the kernel's ``SO_PEERCRED`` (pid, uid, gid of the
  process that connected) and ``SO_PEERGROUPS`` (its supplementary groups,
  Linux >= 4.13), both as they were at ``connect()``, which the peer cannot
  forge;
* ``tls://``: the names a verified client certificate carries (its CN, then
  its DNS subjectAltNames);
* ``memory:``: the peer is this very process, so its own credentials;
* ``tcp://`` and ``vsock://``: the network address only; those guests prove
  who they are with a token in the handshake.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["PeerIdentity", "peercred_identity", "peer_groups", "own_process_identity"]

log = logging.getLogger("pcisplit.transport")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: ``SO_PEERGROUPS`` (Linux >= 4.13); Python's socket module may not define it.
SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")  # gid_t
#: The largest buffer Python's ``socket.getsockopt`` accepts: 256 groups.
_STDLIB_BUFLEN = 1024


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The peer of one connection, as far as the transport can vouch for it.

    ``uid``/``gid``/``pid`` are None unless the kernel reported them;
    ``gid`` is the effective gid, ``groups`` the supplementary groups (empty
    when the kernel cannot report them: not Linux, or older than 4.13).
    ``cert_names`` holds the CN and DNS subjectAltNames of a client
    certificate that the TLS handshake verified (empty otherwise).
    ``address`` is a printable peer address for logs (``127.0.0.1:5123``).
    ``transport`` names the endpoint (``unix:/run/pciback.sock(peer)``).
    """

    transport: str = ""
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    cert_names: tuple[str, ...] = ()
    address: str | None = None
    groups: tuple[int, ...] = ()

    def in_group(self, gids: tuple[int, ...]) -> bool:
        """True when the effective gid or a supplementary group is one of ``gids``."""
        return (self.gid is not None and self.gid in gids) or any(g in gids for g in self.groups)

    @property
    def has_credentials(self) -> bool:
        """True when uid and gid come from the kernel (``unix:``, ``shm:``, ``memory:``)."""
        return self.uid is not None and self.gid is not None

    def describe(self) -> str:
        """A short text for logs: ``unix:/x.sock(peer) pid 12 uid 1000 gid 1000``."""
        parts = [self.transport or "peer"]
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.uid is not None:
            parts.append(f"uid {self.uid}")
        if self.gid is not None:
            parts.append(f"gid {self.gid}")
        if self.groups:
            parts.append("groups " + ",".join(map(str, self.groups)))
        if self.cert_names:
            parts.append("certificate " + ",".join(self.cert_names))
        if self.address:
            parts.append(f"from {self.address}")
        return " ".join(parts)


def peercred_identity(sock: Any, transport: str) -> PeerIdentity:
    """The ``SO_PEERCRED`` identity of a connected UNIX socket (stdlib or trio).

    A socket whose credentials cannot be read (closed, not AF_UNIX) yields an
    identity without credentials, which authorizes nothing that needs them.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return PeerIdentity(transport)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerIdentity(transport, uid=uid, gid=gid, pid=pid, groups=peer_groups(sock))


def _unpack_gids(raw: bytes) -> tuple[int, ...]:
    return tuple(dict.fromkeys(g for (g,) in _GID.iter_unpack(raw[: len(raw) // 4 * 4])))


def peer_groups(sock: Any) -> tuple[int, ...]:
    """The supplementary groups of a connected UNIX socket's peer (``SO_PEERGROUPS``).

    Empty when the kernel does not support it (not Linux, or Linux < 4.13):
    then only the effective gid of ``SO_PEERCRED`` is known, which is the
    rule ``pciback`` applied before groups were read. A peer in more than
    256 groups is read through libc's ``getsockopt`` (Python's limits its
    buffer to 1024 bytes).
    """
    try:
        return _unpack_gids(sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _STDLIB_BUFLEN))
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            # ENOPROTOOPT: no SO_PEERGROUPS here; anything else: no groups we can vouch for.
            return ()
    return _peer_groups_libc(sock.fileno())


def _peer_groups_libc(fd: int) -> tuple[int, ...]:
    """``SO_PEERGROUPS`` with a buffer as large as the kernel asks for."""
    try:
        getsockopt = ctypes.CDLL(None, use_errno=True).getsockopt
    except (OSError, AttributeError) as exc:
        log.warning("cannot read a peer's supplementary groups: no libc getsockopt (%s)", exc)
        return ()
    size = 4096 * _GID.size
    for _ in range(3):  # the kernel says how much it needs; groups may change in between
        buf = ctypes.create_string_buffer(size)
        length = ctypes.c_uint32(size)
        if getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(length)) == 0:
            return _unpack_gids(buf.raw[: length.value])
        err = ctypes.get_errno()
        if err != errno.ERANGE:
            break
        size = max(length.value, size * 2)
    log.warning(
        "cannot read the supplementary groups of the peer on fd %d (%s); only its effective "
        "gid counts",
        fd,
        os.strerror(ctypes.get_errno()),
    )
    return ()


def own_process_identity(transport: str) -> PeerIdentity:
    """This process's own credentials (the peer of an in-process ``memory:`` pair)."""
    return PeerIdentity(
        transport,
        uid=os.geteuid(),
        gid=os.getegid(),
        pid=os.getpid(),
        groups=tuple(dict.fromkeys(os.getgroups())),
    )
