"""What a transport knows about the peer at the other end: :class:`PeerIdentity`.

The backend decides whether a connection may act as the guest it names from
this object alone (``pciback.identity``), so every transport reports the same
typed fields instead of a dict read by string key:

* ``unix:`` and ``shm:``: the kernel's ``SO_PEERCRED`` (pid, uid, gid of the
  process that connected), which the peer cannot forge;
* ``tls://``: the names a verified client certificate carries (its CN, then
  its DNS subjectAltNames);
* ``memory:``: the peer is this very process, so its own credentials;
* ``tcp://`` and ``vsock://``: the network address only; those guests prove
  who they are with a token in the handshake.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["PeerIdentity", "peercred_identity", "own_process_identity"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The peer of one connection, as far as the transport can vouch for it.

    ``uid``/``gid``/``pid`` are None unless the kernel reported them.
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
    return PeerIdentity(transport, uid=uid, gid=gid, pid=pid)


def own_process_identity(transport: str) -> PeerIdentity:
    """This process's own credentials (the peer of an in-process ``memory:`` pair)."""
    return PeerIdentity(transport, uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())
