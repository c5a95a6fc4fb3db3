"""Transport selection by address string, and third-party plugins.

An address is ``SCHEME:REST``. Built-in schemes: ``memory:NAME`` (in-process),
``unix:/path``, ``shm:/path``, ``tcp://host:port``, ``tls://host:port`` and
``vsock://cid:port``. Third parties add schemes through the entry-point group
``pcisplit.transports``: each entry point loads to a :class:`TransportScheme`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shared.errors import did_you_mean
from shared.transport._base import (
    FrameListener,
    FrameTransport,
    TransportAddressError,
    TransportOptions,
)

__all__ = [
    "TransportScheme",
    "ENTRY_POINT_GROUP",
    "register_transport",
    "get_scheme",
    "available_schemes",
    "split_address",
    "open_transport",
    "open_listener",
]

ENTRY_POINT_GROUP = "pcisplit.transports"

Connector = Callable[[str, TransportOptions], Awaitable[FrameTransport]]
ListenerFactory = Callable[[str, TransportOptions], Awaitable[FrameListener]]


@dataclass(frozen=True, slots=True)
class TransportScheme:
    """How to reach one address scheme.

    ``connect(rest, options)`` and ``listen(rest, options)`` receive the part
    of the address after ``SCHEME:`` (after ``SCHEME://`` when ``slashes``).
    ``secure`` marks schemes that authenticate and encrypt (plain TCP is not).
    ``passes_fds`` marks schemes that can carry file descriptors.
    """

    name: str
    connect: Connector
    listen: ListenerFactory
    slashes: bool = False
    secure: bool = True
    local_only: bool = True
    passes_fds: bool = False


_SCHEMES: dict[str, TransportScheme] = {}
_plugins_loaded = False


def register_transport(scheme: TransportScheme, *, replace: bool = False) -> None:
    """Register ``scheme``. Registering a name twice is an error unless ``replace``."""
    if scheme.name in _SCHEMES and not replace:
        raise TransportAddressError(f"transport scheme {scheme.name!r} is already registered")
    _SCHEMES[scheme.name] = scheme


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        scheme = loaded
        if callable(loaded) and not isinstance(loaded, TransportScheme):
            scheme = loaded()
        if not isinstance(scheme, TransportScheme):
            raise TransportAddressError(
                f"entry point {ep.name!r} in {ENTRY_POINT_GROUP} loaded {scheme!r}, "
                "not a TransportScheme"
            )
        if scheme.name in _SCHEMES:
            continue  # built-ins win; a plugin cannot hijack unix: or tls:
        _SCHEMES[scheme.name] = scheme


def available_schemes() -> list[str]:
    _builtin()
    _load_plugins()
    return sorted(_SCHEMES)


def split_address(address: str) -> tuple[TransportScheme, str]:
    """Return the scheme and the rest of ``address``. Raises TransportAddressError."""
    if not isinstance(address, str) or ":" not in address:
        raise TransportAddressError(
            f"address {address!r} has no scheme; use e.g. unix:/run/pciback.sock, "
            "shm:/run/pciback.sock, tcp://127.0.0.1:7070, tls://host:7071 or vsock://2:7072"
        )
    name, _, rest = address.partition(":")
    scheme = get_scheme(name)
    if scheme.slashes:
        if not rest.startswith("//"):
            raise TransportAddressError(f"address {address!r} needs the form {name}://...")
        rest = rest[2:]
    elif rest.startswith("//"):
        raise TransportAddressError(f"address {address!r}: {name}: takes a path, not //")
    if not rest:
        raise TransportAddressError(f"address {address!r} is missing its {name} target")
    return scheme, rest


def get_scheme(name: str) -> TransportScheme:
    _builtin()
    scheme = _SCHEMES.get(name)
    if scheme is None:
        _load_plugins()
        scheme = _SCHEMES.get(name)
    if scheme is None:
        raise TransportAddressError(
            f"unknown transport scheme {name!r}; {did_you_mean(name, _SCHEMES)} "
            f"(plugins register more through the {ENTRY_POINT_GROUP!r} entry-point group)"
        )
    return scheme


async def open_transport(address: str, options: TransportOptions | None = None) -> FrameTransport:
    """Connect to ``address`` and return the client end."""
    scheme, rest = split_address(address)
    return await scheme.connect(rest, options or TransportOptions())


async def open_listener(address: str, options: TransportOptions | None = None) -> FrameListener:
    """Listen on ``address``."""
    scheme, rest = split_address(address)
    return await scheme.listen(rest, options or TransportOptions())


_builtin_done = False


def _builtin() -> None:
    global _builtin_done
    if _builtin_done:
        return
    _builtin_done = True
    from shared.transport import _memory, _sockets

    async def connect_memory(rest: str, options: TransportOptions) -> FrameTransport:
        return await _memory.connect_memory(rest, options.max_frame_size)

    async def listen_memory(rest: str, options: TransportOptions) -> FrameListener:
        return _memory.MemoryListener(rest, max_frame_size=options.max_frame_size)

    for scheme in (
        TransportScheme("memory", connect_memory, listen_memory),
        TransportScheme("unix", _sockets.connect_unix, _sockets.listen_unix, passes_fds=True),
        TransportScheme(
            "tcp",
            _sockets.connect_tcp,
            _sockets.listen_tcp,
            slashes=True,
            secure=False,
            local_only=False,
        ),
        TransportScheme(
            "tls", _sockets.connect_tls, _sockets.listen_tls, slashes=True, local_only=False
        ),
        TransportScheme(
            "vsock", _sockets.connect_vsock, _sockets.listen_vsock, slashes=True, local_only=False
        ),
    ):
        _SCHEMES[scheme.name] = scheme
    try:
        from shared.transport import _shm_listen as _shm  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # the ring extension is not built: shm: is unavailable, say so on use
        return
    _SCHEMES["shm"] = TransportScheme("shm", _shm.connect_shm, _shm.listen_shm, passes_fds=True)
