"""VFIO_USER_VERSION: the version and the JSON capabilities, and the negotiation rules.

The payload is ``major`` (u16), ``minor`` (u16) and optional UTF-8 JSON ending
in a NUL byte: ``{"capabilities": {...}}``. Rules (specification, "Version"):

- the reply's major equals the proposal's; its minor is not greater;
- the reply's capabilities are a subset of those proposed: a boolean
  capability (``write_multiple``, ``twin_socket.supported``) may be true in
  the reply only if it was proposed true, and the reply's ``pgsizes`` are
  among the proposed ones;
- the numbers (``max_msg_fds``, ``max_data_xfer_size``, ``max_dma_maps``) are
  each side's own receive limits and are not negotiated down.

Hostile JSON is bounded before it is parsed: its size, its nesting depth
(checked by a scan, so ``json`` never recurses deeply), duplicate keys,
non-finite numbers and wrong types are all typed errors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from typing import Any

from shared.errors import LocalProtocolError
from shared.protocol.vfio_user._wire import VfioUserLimits, check

__all__ = [
    "Capabilities",
    "Version",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEFAULT_PGSIZES",
    "negotiate",
    "check_reply",
]

DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
_U64 = (1 << 64) - 1
_VERSION = struct.Struct("<HH")
_KNOWN = (
    "max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "twin_socket",
    "write_multiple", "migration",
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The ``capabilities`` object. ``None`` means "not sent" (the default applies).

    ``migration_pgsize`` is libvfio-user's ``migration.pgsize`` extension.
    ``unknown`` names keys this codec does not know; they are ignored, as the
    specification's forward compatibility asks.
    """

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    twin_socket_supported: bool | None = None
    twin_socket_fd_index: int | None = None
    write_multiple: bool | None = None
    migration_pgsize: int | None = None
    unknown: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                     "twin_socket_fd_index", "migration_pgsize"):
            value = getattr(self, name)
            check(value is None or (type(value) is int and 0 <= value <= _U64),
                  f"capability {name} must be a non-negative integer, not {value!r}")
        if self.twin_socket_fd_index is not None:
            check(self.twin_socket_fd_index < 253, "twin_socket.fd_index is out of range")

    # The values in force, with the specification's defaults.
    @property
    def effective_max_msg_fds(self) -> int:
        """How many fds the sender accepts in one message (default 1)."""
        return DEFAULT_MAX_MSG_FDS if self.max_msg_fds is None else self.max_msg_fds

    @property
    def effective_max_data_xfer_size(self) -> int:
        """The largest data transfer the sender accepts (default 1 MiB)."""
        if self.max_data_xfer_size is None:
            return DEFAULT_MAX_DATA_XFER_SIZE
        return self.max_data_xfer_size

    @property
    def effective_pgsizes(self) -> int:
        """Page sizes for DMA maps, or'ed together (default 4 KiB)."""
        return DEFAULT_PGSIZES if self.pgsizes is None else self.pgsizes

    def to_json(self) -> dict[str, Any]:
        """The ``capabilities`` object, with only the keys that were set."""
        out: dict[str, Any] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                     "write_multiple"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.twin_socket_supported is not None or self.twin_socket_fd_index is not None:
            twin: dict[str, Any] = {}
            if self.twin_socket_supported is not None:
                twin["supported"] = self.twin_socket_supported
            if self.twin_socket_fd_index is not None:
                twin["fd_index"] = self.twin_socket_fd_index
            out["twin_socket"] = twin
        if self.migration_pgsize is not None:
            out["migration"] = {"pgsize": self.migration_pgsize}
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Capabilities:
        """Validate a decoded ``capabilities`` object (raises :class:`LocalProtocolError`)."""
        check(isinstance(obj, dict), "capabilities must be a JSON object")
        fields: dict[str, Any] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if name in obj:
                fields[name] = _number(obj[name], name)
        if "write_multiple" in obj:
            fields["write_multiple"] = _boolean(obj["write_multiple"], "write_multiple")
        if "twin_socket" in obj:
            twin = obj["twin_socket"]
            check(isinstance(twin, dict), "twin_socket must be a JSON object")
            if "supported" in twin:
                fields["twin_socket_supported"] = _boolean(
                    twin["supported"], "twin_socket.supported"
                )
            if "fd_index" in twin:
                fields["twin_socket_fd_index"] = _number(twin["fd_index"], "twin_socket.fd_index")
        if "migration" in obj:
            migration = obj["migration"]
            check(isinstance(migration, dict), "migration must be a JSON object")
            if "pgsize" in migration:
                fields["migration_pgsize"] = _number(migration["pgsize"], "migration.pgsize")
        unknown = tuple(sorted(str(k) for k in obj if k not in _KNOWN))
        return cls(unknown=unknown, **fields)


def _number(value: Any, name: str) -> int:
    check(type(value) is int and 0 <= value <= _U64,
          f"capability {name} must be a non-negative integer, not {value!r}")
    return int(value)


def _boolean(value: Any, name: str) -> bool:
    check(type(value) is bool, f"capability {name} must be true or false, not {value!r}")
    return bool(value)


@dataclass(frozen=True, slots=True)
class Version:
    """The VERSION payload, the same in the proposal and the reply.

    ``capabilities`` is None when the message carries no JSON at all.
    """

    major: int = 0
    minor: int = 0
    capabilities: Capabilities | None = None

    def __post_init__(self) -> None:
        check(0 <= self.major <= 0xFFFF and 0 <= self.minor <= 0xFFFF,
              "version numbers must be u16")

    def encode(self) -> bytes:
        head = _VERSION.pack(self.major, self.minor)
        if self.capabilities is None:
            return head
        text = json.dumps({"capabilities": self.capabilities.to_json()}, separators=(",", ":"))
        return head + text.encode() + b"\0"

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> Version:
        check(len(payload) >= 4, f"VERSION payload of {len(payload)} bytes is shorter than 4")
        major, minor = _VERSION.unpack_from(payload)
        data = payload[4:]
        if not data:
            return cls(major, minor, None)
        check(len(data) <= limits.max_json_size,
              f"VERSION JSON of {len(data)} bytes is over the {limits.max_json_size}-byte limit")
        check(data[-1] == 0, "VERSION JSON does not end in a NUL byte")
        body = data[:-1]
        check(b"\0" not in body, "VERSION JSON holds a NUL byte before its end")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LocalProtocolError(f"VERSION JSON is not UTF-8: {exc}") from None
        depth = _nesting(text)
        check(depth <= limits.max_json_depth,
              f"VERSION JSON nests {depth} deep; the limit is {limits.max_json_depth}")
        try:
            top = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise LocalProtocolError(f"VERSION data is not valid JSON: {exc}") from None
        check(isinstance(top, dict), "VERSION JSON must be an object")
        caps = Capabilities.from_json(top.get("capabilities", {}))
        return cls(major, minor, caps)

    @property
    def caps(self) -> Capabilities:
        """The capabilities, or the all-defaults set when none were sent."""
        return self.capabilities if self.capabilities is not None else Capabilities()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        check(key not in out, f"VERSION JSON repeats key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise LocalProtocolError(f"VERSION JSON holds {name}, which is not JSON")


def _nesting(text: str) -> int:
    """The deepest nesting of objects and arrays, counted without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def negotiate(proposal: Version, ours: Capabilities, *, major: int = 0, minor: int = 0) -> Version:
    """The server's reply to ``proposal``: our version and ``ours`` cut to the proposal.

    Raises :class:`LocalProtocolError` when the proposed major differs from
    ours (the server then closes the connection, as the specification says).
    """
    check(proposal.major == major,
          f"the client proposes major version {proposal.major}; this server speaks {major}")
    theirs = proposal.caps
    offered = replace(
        ours,
        write_multiple=(bool(ours.write_multiple and theirs.write_multiple)
                        if ours.write_multiple is not None else None),
        twin_socket_supported=(
            bool(ours.twin_socket_supported and theirs.twin_socket_supported)
            if ours.twin_socket_supported is not None else None
        ),
        pgsizes=(ours.pgsizes & theirs.effective_pgsizes if ours.pgsizes is not None else None),
        unknown=(),
    )
    if not offered.twin_socket_supported:
        offered = replace(offered, twin_socket_fd_index=None)
    return Version(major, min(minor, proposal.minor), offered)


def check_reply(proposal: Version, reply: Version, *, twin_fds: int = 0) -> None:
    """The client's check of the server's reply (raises :class:`LocalProtocolError`).

    ``twin_fds`` is how many descriptors came with the reply.
    """
    check(reply.major == proposal.major,
          f"the server answered major version {reply.major} to a proposal of {proposal.major}")
    check(reply.minor <= proposal.minor,
          f"the server answered minor version {reply.minor}, above the proposed {proposal.minor}")
    ours, theirs = proposal.caps, reply.caps
    if theirs.write_multiple:
        check(bool(ours.write_multiple),
              "the server enables write_multiple, which was not proposed")
    if theirs.twin_socket_supported:
        check(bool(ours.twin_socket_supported),
              "the server enables twin_socket, which was not proposed")
        check(theirs.twin_socket_fd_index is not None and theirs.twin_socket_fd_index < twin_fds,
              "the server enables twin_socket without a valid fd_index")
    if theirs.pgsizes is not None:
        check(theirs.pgsizes & ~ours.effective_pgsizes == 0,
              f"the server's pgsizes {theirs.pgsizes:#x} are not among the proposed "
              f"{ours.effective_pgsizes:#x}")
