"""Protocol messages: frozen, slotted dataclasses validated when built.

An invalid message cannot exist: every constructor checks its fields' types
and ranges and raises :class:`LocalProtocolError` (the codec turns that into
:class:`RemoteProtocolError` when the bad values came off the wire).

Every concrete message class has a stable wire ``TAG``. Tags are grouped:

* 0x01-0x0f handshake and connection control
* 0x10-0x3f requests (frontend -> backend), each with a ``request_id``
* 0x40-0x5f replies (backend -> frontend), each answering one ``request_id``
* 0x60-0x7f events (backend -> frontend, unsolicited; never compete with replies)
* 0x80-0x9f call results and acknowledgements (frontend -> backend, answering a
  backend call such as :class:`DmaReadCall` by its ``call_id``, or a hot-plug
  event by its ``change_id``; outside the request range so a malformed one is
  never mistaken for an answerable request)
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

from shared.errors import ErrorCode, LocalProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "IntField",
    "declared_fields",
    "Message",
    "Request",
    "Reply",
    "Event",
    "Limits",
    "DeviceInfo",
    "Hello",
    "Welcome",
    "HandshakeRejected",
    "Goodbye",
    "PingRequest",
    "SnapshotRequest",
    "ConfigReadRequest",
    "ConfigWriteRequest",
    "BarReadRequest",
    "BarWriteRequest",
    "ResetRequest",
    "SnapshotReply",
    "ValueReply",
    "DoneReply",
    "ErrorReply",
    "MESSAGE_TYPES",
    "IRQ_MODE_INTX",
    "IRQ_MODE_MSI",
    "IRQ_MODE_MSIX",
    "IRQ_MODES",
    "MAX_MSIX_VECTORS",
    "FUNCTION_MASK_VECTOR",
    "MAX_DMA_WINDOW",
    "MAX_DMA_CHUNK",
    "InterruptEnableRequest",
    "InterruptDisableRequest",
    "InterruptEoiRequest",
    "InterruptMaskRequest",
    "DmaMapRequest",
    "DmaUnmapRequest",
    "InterruptEvent",
    "DmaFaultEvent",
    "DmaReadCall",
    "DmaWriteCall",
    "DmaCallResult",
    "DeviceAddedEvent",
    "DeviceRemovedEvent",
    "DeviceChangeAck",
    "HOTPLUG_FEATURE",
    "U8",
    "U16",
    "U32",
    "U64",
]

#: (major, minor). A different major is incompatible; minors negotiate down.
PROTOCOL_VERSION: tuple[int, int] = (1, 0)

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

MAX_NAME_LEN = 64
MAX_TEXT_LEN = 1024
MAX_FEATURES = 64
#: Longest guest token a Hello may carry (a token file holds one secret line).
MAX_TOKEN_LEN = 256
MAX_DEVICES = 256
MAX_BAR_INDEX = 5

#: The feature name both sides offer in the handshake to use hot-plug events;
#: a backend sends DeviceAddedEvent/DeviceRemovedEvent only when it was granted.
HOTPLUG_FEATURE = "hotplug"


def _int(
    owner: object,
    name: str,
    value: object,
    top: int,
    bottom: int = 0,
    *,
    code: ErrorCode | None = None,
) -> None:
    # ``code`` lets a range error map to a precise wire code (INVALID_OFFSET ...)
    # when the backend answers a request that failed this check.
    if not isinstance(value, int) or isinstance(value, bool) or not bottom <= value <= top:
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} must be an integer in {bottom}..{top:#x}, "
            f"got {value!r}",
            code=code,
        )


def _str(owner: object, name: str, value: object, max_len: int) -> None:
    if not isinstance(value, str) or len(value) > max_len:
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} must be a string of at most {max_len} characters, "
            f"got {value!r:.80}"
        )


def _name(owner: object, name: str, value: object) -> None:
    _str(owner, name, value, MAX_NAME_LEN)
    assert isinstance(value, str)
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} {value!r} must be 1-{MAX_NAME_LEN} characters "
            "of letters, digits, '-', '_' or '.'"
        )


def _access_size(owner: object, value: object, allowed: tuple[int, ...]) -> None:
    if value not in allowed or isinstance(value, bool):
        raise LocalProtocolError(
            f"{type(owner).__name__}.size must be one of {allowed}, got {value!r}",
            code=ErrorCode.INVALID_SIZE,
        )


@dataclass(frozen=True, slots=True)
class IntField:
    """How one integer field of a message is checked, declared once in its annotation.

    ``Annotated[int, IntField(top, bottom, code=...)]``: an integer in
    ``bottom..top`` (``code`` is the wire code a backend answers with when a
    request breaks it). ``IntField(sizes=(1, 2, 4))``: one of these access
    sizes (``INVALID_SIZE``). ``IntField(width_of="size")``: fits in as many
    bytes as the field ``size`` says. A message whose fields are all declared
    this way is validated by code generated from the declarations, and the
    codec decodes it through a fast path generated from the same declarations
    (``shared.protocol._codec``), so the rule is written once.
    """

    top: int = 0
    bottom: int = 0
    code: ErrorCode | None = None
    sizes: tuple[int, ...] = ()
    width_of: str | None = None

    def accepts(self, var: str, other: Callable[[str], str]) -> str:
        """A Python expression, true when ``var`` (known to be an exact int) passes.

        ``other(name)`` is the expression for another field (for ``width_of``).
        """
        if self.sizes:
            return f"{var} in {self.sizes!r}"
        if self.width_of is not None:
            return f"0 <= {var} <= (1 << (8 * {other(self.width_of)})) - 1"
        return f"{self.bottom} <= {var} <= {self.top}"

    def refuse(self, owner: str, name: str, var: str, code: str) -> str:
        """A statement raising this field's error for ``var`` (or passing, if it is valid)."""
        if self.sizes:
            return f"_access_size({owner}, {var}, {self.sizes!r})"
        if self.width_of is not None:
            return f"_int({owner}, {name!r}, {var}, (1 << (8 * {owner}.{self.width_of})) - 1)"
        return f"_int({owner}, {name!r}, {var}, {self.top}, {self.bottom}, code={code})"


def declared_fields(cls: type) -> tuple[tuple[str, IntField], ...]:
    """The ``(name, IntField)`` declarations of ``cls``'s fields, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in fields(cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(meta, IntField):
                out.append((f.name, meta))
                break
    return tuple(out)


_CHECKS: dict[type, Callable[[Any], None]] = {}


def _make_check(cls: type) -> Callable[[Any], None]:
    """Generate the validation of ``cls``'s declared fields (in order, first error wins).

    Each field costs one inline comparison when it is valid; only an invalid
    value reaches ``_int``/``_access_size``, which raise the error text.
    """
    env: dict[str, Any] = {"_int": _int, "_access_size": _access_size}
    lines = ["def check(self):"]
    for i, (name, spec) in enumerate(declared_fields(cls)):
        env[f"_c{i}"] = spec.code
        test = spec.accepts("v", lambda other: f"self.{other}")
        lines.append(f"    v = self.{name}")
        lines.append(f"    if not (type(v) is int and {test}):")
        lines.append(f"        {spec.refuse('self', name, 'v', f'_c{i}')}")
    lines.append("    return None")
    exec("\n".join(lines), env)  # generated from the declarations above, not from input
    check: Callable[[Any], None] = env["check"]
    return check


def _check_declared(msg: Any) -> None:
    cls = type(msg)
    check = _CHECKS.get(cls)
    if check is None:
        check = _CHECKS[cls] = _make_check(cls)
    check(msg)


_U32_FIELD = IntField(U32)
_U64_FIELD = IntField(U64)
_CONFIG_OFFSET = IntField(0xFFF, code=ErrorCode.INVALID_OFFSET)
_BAR_INDEX = IntField(MAX_BAR_INDEX, code=ErrorCode.NOT_FOUND)
_VALUE = IntField(width_of="size")


@dataclass(frozen=True, slots=True)
class Message:
    """Base class. ``TAG`` is the wire type; subclasses validate in ``__post_init__``."""

    TAG: ClassVar[int] = 0

    def wire_fields(self) -> list[Any]:
        """Field values in declaration order (what the codec puts on the wire)."""
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True, slots=True)
class Request(Message):
    request_id: Annotated[int, _U32_FIELD]

    def __post_init__(self) -> None:
        # The declared fields of type(self); subclasses with more rules call this first.
        _check_declared(self)


@dataclass(frozen=True, slots=True)
class Reply(Message):
    request_id: Annotated[int, _U32_FIELD]

    def __post_init__(self) -> None:
        _check_declared(self)


@dataclass(frozen=True, slots=True)
class Event(Message):
    """Backend-to-frontend notification. Later issues add interrupts, hot-plug, faults."""


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True)
class Limits:
    """What the *sender* of a Hello/Welcome is willing to receive.

    ``max_message_size``: largest frame payload it accepts, in bytes.
    ``max_in_flight``: most requests it accepts outstanding at once (for the
    backend) or most events it buffers (for the frontend).
    """

    max_message_size: int = 65536
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        _int(self, "max_message_size", self.max_message_size, 16 * 1024 * 1024, 256)
        _int(self, "max_in_flight", self.max_in_flight, 65536, 1)


@dataclass(frozen=True, slots=True)
class _Greeting(Message):
    """The fields Hello and Welcome share: version, features, limits and guest."""

    version_major: int
    version_minor: int
    features: tuple[str, ...]
    limits: Limits
    guest: str

    def __post_init__(self) -> None:
        _int(self, "version_major", self.version_major, U16)
        _int(self, "version_minor", self.version_minor, U16)
        _features(self, self.features)
        if not isinstance(self.limits, Limits):
            raise LocalProtocolError(f"{type(self).__name__}.limits must be a Limits")
        _name(self, "guest", self.guest)


@dataclass(frozen=True, slots=True)
class Hello(_Greeting):
    """Frontend -> backend, first message. Names the guest it asks to act as.

    ``token`` is the guest's secret for transports that cannot vouch for the
    peer themselves (``tcp://``, ``vsock://``); empty when none is needed.
    It is never shown in a repr, so it cannot end up in a log.
    """

    TAG: ClassVar[int] = 0x01
    # Added after 1.0 as an optional trailing field: a 1.0 Hello without it still decodes.
    token: bytes = field(default=b"", repr=False, metadata={"wire_optional": True})

    def __post_init__(self) -> None:
        _Greeting.__post_init__(self)
        if not isinstance(self.token, bytes) or len(self.token) > MAX_TOKEN_LEN:
            raise LocalProtocolError(
                f"Hello.token must be at most {MAX_TOKEN_LEN} bytes, got "
                f"{len(self.token) if isinstance(self.token, bytes) else type(self.token).__name__}"
            )


@dataclass(frozen=True, slots=True)
class Welcome(_Greeting):
    """Backend -> frontend: handshake accepted. Version is the negotiated one."""

    TAG: ClassVar[int] = 0x02


@dataclass(frozen=True, slots=True)
class HandshakeRejected(Message):
    """Backend -> frontend: handshake refused. Carries the backend's own version."""

    TAG: ClassVar[int] = 0x03
    code: ErrorCode
    message: str
    version_major: int
    version_minor: int

    def __post_init__(self) -> None:
        _code(self, self.code)
        _str(self, "message", self.message, MAX_TEXT_LEN)
        _int(self, "version_major", self.version_major, U16)
        _int(self, "version_minor", self.version_minor, U16)


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Either direction: the sender is closing, and says why."""

    TAG: ClassVar[int] = 0x04
    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        _code(self, self.code)
        _str(self, "message", self.message, MAX_TEXT_LEN)


def _features(owner: object, value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_FEATURES:
        raise LocalProtocolError(
            f"{type(owner).__name__}.features must be a tuple of at most {MAX_FEATURES} names"
        )
    for item in value:
        _name(owner, "features[]", item)


def _code(owner: object, value: object) -> None:
    if not isinstance(value, ErrorCode):
        raise LocalProtocolError(f"{type(owner).__name__}.code must be an ErrorCode, got {value!r}")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class PingRequest(Request):
    """A no-op round trip (liveness, and the benchmarks' protocol floor)."""

    TAG: ClassVar[int] = 0x10


@dataclass(frozen=True, slots=True)
class SnapshotRequest(Request):
    """Every device of the guest's virtual bus, optionally with full config images."""

    TAG: ClassVar[int] = 0x11
    include_config: bool = False

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        if not isinstance(self.include_config, bool):
            raise LocalProtocolError("SnapshotRequest.include_config must be a bool")


@dataclass(frozen=True, slots=True)
class ConfigReadRequest(Request):
    """Read 1, 2 or 4 bytes of config space. ``device`` is a packed PciAddress."""

    TAG: ClassVar[int] = 0x12
    device: Annotated[int, _U32_FIELD]
    offset: Annotated[int, _CONFIG_OFFSET]
    size: Annotated[int, IntField(sizes=(1, 2, 4))]


@dataclass(frozen=True, slots=True)
class ConfigWriteRequest(Request):
    TAG: ClassVar[int] = 0x13
    device: Annotated[int, _U32_FIELD]
    offset: Annotated[int, _CONFIG_OFFSET]
    size: Annotated[int, IntField(sizes=(1, 2, 4))]
    value: Annotated[int, _VALUE]


@dataclass(frozen=True, slots=True)
class BarReadRequest(Request):
    """Read 1, 2, 4 or 8 bytes from BAR ``bar`` (0-5) at ``offset``."""

    TAG: ClassVar[int] = 0x14
    device: Annotated[int, _U32_FIELD]
    bar: Annotated[int, _BAR_INDEX]
    offset: Annotated[int, _U64_FIELD]
    size: Annotated[int, IntField(sizes=(1, 2, 4, 8))]


@dataclass(frozen=True, slots=True)
class BarWriteRequest(Request):
    TAG: ClassVar[int] = 0x15
    device: Annotated[int, _U32_FIELD]
    bar: Annotated[int, _BAR_INDEX]
    offset: Annotated[int, _U64_FIELD]
    size: Annotated[int, IntField(sizes=(1, 2, 4, 8))]
    value: Annotated[int, _VALUE]


@dataclass(frozen=True, slots=True)
class ResetRequest(Request):
    TAG: ClassVar[int] = 0x16
    device: Annotated[int, _U32_FIELD]


# --------------------------------------------------------------------------- interrupts and DMA
#
# Interrupt modes on the wire: 0 = INTx, 1 = MSI, 2 = MSI-X.
IRQ_MODE_INTX = 0
IRQ_MODE_MSI = 1
IRQ_MODE_MSIX = 2
IRQ_MODES = (IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX)
#: PCIe allows 2048 MSI-X vectors (Xen stops at 128).
MAX_MSIX_VECTORS = 2048
#: ``InterruptMaskRequest.vector`` value naming the MSI-X *function* mask.
FUNCTION_MASK_VECTOR = 0xFFFF
#: Largest single DMA window and largest DMA data chunk carried in one message.
MAX_DMA_WINDOW = 1 << 30
MAX_DMA_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class InterruptEnableRequest(Request):
    """Enable ``mode`` with ``vectors`` vectors on ``device``.

    When ``eventfds`` is true the frontend sends one eventfd per vector with
    this frame (SCM_RIGHTS) and the backend signals them; otherwise interrupts
    arrive as in-band :class:`InterruptEvent` messages. Reply: ``ValueReply``
    with the number of vectors granted.
    """

    TAG: ClassVar[int] = 0x17
    device: int
    mode: int
    vectors: int
    eventfds: bool = False

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "device", self.device, U32)
        _int(self, "mode", self.mode, IRQ_MODE_MSIX)
        _int(self, "vectors", self.vectors, MAX_MSIX_VECTORS, 1)
        if not isinstance(self.eventfds, bool):
            raise LocalProtocolError("InterruptEnableRequest.eventfds must be a bool")


@dataclass(frozen=True, slots=True)
class InterruptDisableRequest(Request):
    """Disable ``mode`` on ``device``. Disabling a mode that is off is harmless."""

    TAG: ClassVar[int] = 0x18
    device: int
    mode: int

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "device", self.device, U32)
        _int(self, "mode", self.mode, IRQ_MODE_MSIX)


@dataclass(frozen=True, slots=True)
class InterruptEoiRequest(Request):
    """End of interrupt for ``vector``: for INTx it unmasks the line (late EOI)."""

    TAG: ClassVar[int] = 0x19
    device: int
    vector: int

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "device", self.device, U32)
        _int(self, "vector", self.vector, MAX_MSIX_VECTORS - 1)


@dataclass(frozen=True, slots=True)
class InterruptMaskRequest(Request):
    """Mask or unmask one MSI-X vector, or the function (``FUNCTION_MASK_VECTOR``)."""

    TAG: ClassVar[int] = 0x1A
    device: int
    vector: int
    masked: bool

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "device", self.device, U32)
        if self.vector != FUNCTION_MASK_VECTOR:
            _int(self, "vector", self.vector, MAX_MSIX_VECTORS - 1)
        if not isinstance(self.masked, bool):
            raise LocalProtocolError("InterruptMaskRequest.masked must be a bool")


@dataclass(frozen=True, slots=True)
class DmaMapRequest(Request):
    """Map ``size`` bytes of guest memory for device DMA. Reply: ValueReply(bus address).

    With ``shared`` the frontend sends the memory as a memfd with this frame
    (SCM_RIGHTS, zero copy); otherwise the backend reaches it through
    :class:`DmaReadCall` / :class:`DmaWriteCall` messages.
    """

    TAG: ClassVar[int] = 0x1B
    size: int
    writable: bool = True
    shared: bool = False

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "size", self.size, MAX_DMA_WINDOW, 1)
        if not isinstance(self.writable, bool) or not isinstance(self.shared, bool):
            raise LocalProtocolError("DmaMapRequest.writable and .shared must be bools")


@dataclass(frozen=True, slots=True)
class DmaUnmapRequest(Request):
    """Unmap the window at ``bus_address``; answered once in-flight DMA has finished."""

    TAG: ClassVar[int] = 0x1C
    bus_address: int

    def __post_init__(self) -> None:
        Request.__post_init__(self)
        _int(self, "bus_address", self.bus_address, U64)


# --------------------------------------------------------------------------- events and calls


@dataclass(frozen=True, slots=True)
class InterruptEvent(Event):
    """Backend -> frontend: ``vector`` of ``device`` fired ``count`` times (coalesced)."""

    TAG: ClassVar[int] = 0x60
    device: int
    vector: int
    count: int

    def __post_init__(self) -> None:
        _int(self, "device", self.device, U32)
        _int(self, "vector", self.vector, MAX_MSIX_VECTORS - 1)
        _int(self, "count", self.count, U32, 1)


@dataclass(frozen=True, slots=True)
class DmaFaultEvent(Event):
    """Backend -> frontend: ``device`` tried DMA outside the guest's windows."""

    TAG: ClassVar[int] = 0x61
    device: int
    bus_address: int
    length: int
    is_write: bool
    message: str

    def __post_init__(self) -> None:
        _int(self, "device", self.device, U32)
        _int(self, "bus_address", self.bus_address, U64)
        _int(self, "length", self.length, U64)
        if not isinstance(self.is_write, bool):
            raise LocalProtocolError("DmaFaultEvent.is_write must be a bool")
        _str(self, "message", self.message, MAX_TEXT_LEN)


@dataclass(frozen=True, slots=True)
class DmaReadCall(Event):
    """Backend -> frontend: read ``length`` bytes at ``bus_address`` (message-based DMA).

    The frontend answers with exactly one :class:`DmaCallResult` carrying ``call_id``.
    """

    TAG: ClassVar[int] = 0x62
    call_id: int
    bus_address: int
    length: int

    def __post_init__(self) -> None:
        _int(self, "call_id", self.call_id, U32)
        _int(self, "bus_address", self.bus_address, U64)
        _int(self, "length", self.length, MAX_DMA_CHUNK, 1)


@dataclass(frozen=True, slots=True)
class DmaWriteCall(Event):
    """Backend -> frontend: write ``data`` at ``bus_address`` (message-based DMA)."""

    TAG: ClassVar[int] = 0x63
    call_id: int
    bus_address: int
    data: bytes

    def __post_init__(self) -> None:
        _int(self, "call_id", self.call_id, U32)
        _int(self, "bus_address", self.bus_address, U64)
        if not isinstance(self.data, bytes) or not 1 <= len(self.data) <= MAX_DMA_CHUNK:
            raise LocalProtocolError(f"DmaWriteCall.data must be 1..{MAX_DMA_CHUNK} bytes")


@dataclass(frozen=True, slots=True)
class DmaCallResult(Message):
    """Frontend -> backend: the one answer to a DmaReadCall/DmaWriteCall.

    ``code`` is OK on success (``data`` holds what was read; empty for writes),
    or the error (e.g. ``DMA_FAULT`` when the address is outside the guest's
    buffers) with ``data`` empty.
    """

    TAG: ClassVar[int] = 0x80
    call_id: int
    code: ErrorCode
    data: bytes

    def __post_init__(self) -> None:
        _int(self, "call_id", self.call_id, U32)
        _code(self, self.code)
        if not isinstance(self.data, bytes) or len(self.data) > MAX_DMA_CHUNK:
            raise LocalProtocolError(f"DmaCallResult.data must be 0..{MAX_DMA_CHUNK} bytes")


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of a bus snapshot. ``class_code`` is 24-bit: class, subclass, prog-if.

    ``bar_sizes`` holds the size in bytes of BARs 0-5 and the expansion ROM
    (index 6), 0 where none is implemented, or is empty when the backend did
    not say. A guest whose policy refuses BAR writes cannot size BARs itself,
    so the sizes travel here (for sysfs ``resource`` and ``lspci -v``).
    """

    address: int  # packed PciAddress
    vendor_id: int
    device_id: int
    class_code: int
    revision: int
    header_type: int
    subsystem_vendor_id: int
    subsystem_id: int
    config: bytes | None = None
    bar_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _int(self, "address", self.address, U32)
        _int(self, "vendor_id", self.vendor_id, U16)
        _int(self, "device_id", self.device_id, U16)
        _int(self, "class_code", self.class_code, 0xFF_FFFF)
        _int(self, "revision", self.revision, U8)
        _int(self, "header_type", self.header_type, U8)
        _int(self, "subsystem_vendor_id", self.subsystem_vendor_id, U16)
        _int(self, "subsystem_id", self.subsystem_id, U16)
        if self.config is not None and (
            not isinstance(self.config, bytes) or len(self.config) not in (64, 256, 4096)
        ):
            raise LocalProtocolError("DeviceInfo.config must be None or 64, 256 or 4096 bytes")
        if not isinstance(self.bar_sizes, tuple) or len(self.bar_sizes) not in (0, 7):
            raise LocalProtocolError("DeviceInfo.bar_sizes must be a tuple of 0 or 7 sizes")
        for size in self.bar_sizes:
            if type(size) is not int or not 0 <= size <= U64 or size & (size - 1):
                raise LocalProtocolError(
                    f"DeviceInfo.bar_sizes: {size!r} is not 0 or a power of two below 2**64"
                )


@dataclass(frozen=True, slots=True)
class SnapshotReply(Reply):
    TAG: ClassVar[int] = 0x40
    devices: tuple[DeviceInfo, ...] = field(default=())

    def __post_init__(self) -> None:
        Reply.__post_init__(self)
        if not isinstance(self.devices, tuple) or len(self.devices) > MAX_DEVICES:
            raise LocalProtocolError(f"SnapshotReply.devices must be a tuple of <= {MAX_DEVICES}")
        for dev in self.devices:
            if not isinstance(dev, DeviceInfo):
                raise LocalProtocolError("SnapshotReply.devices must hold DeviceInfo values")


@dataclass(frozen=True, slots=True)
class ValueReply(Reply):
    """Answer to a read: the value read (up to 64 bits)."""

    TAG: ClassVar[int] = 0x41
    value: Annotated[int, _U64_FIELD] = 0


@dataclass(frozen=True, slots=True)
class DoneReply(Reply):
    """Answer to a write, reset or ping: it was carried out."""

    TAG: ClassVar[int] = 0x42


@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """Answer to any request that failed. ``message`` says what was wrong and what to do."""

    TAG: ClassVar[int] = 0x43
    code: ErrorCode = ErrorCode.OPERATION_FAILED
    message: str = ""

    def __post_init__(self) -> None:
        Reply.__post_init__(self)
        _code(self, self.code)
        if self.code is ErrorCode.OK:
            raise LocalProtocolError("ErrorReply.code must not be OK")
        _str(self, "message", self.message, MAX_TEXT_LEN)


# --------------------------------------------------------------------------- hot-plug


@dataclass(frozen=True, slots=True)
class DeviceAddedEvent(Event):
    """Backend -> frontend: ``info`` was hot-plugged into the guest's bus.

    ``info.address`` is its address on the guest's virtual bus. The frontend
    answers with exactly one :class:`DeviceChangeAck` carrying ``change_id``.
    """

    TAG: ClassVar[int] = 0x64
    change_id: int
    info: DeviceInfo

    def __post_init__(self) -> None:
        _int(self, "change_id", self.change_id, U32)
        if not isinstance(self.info, DeviceInfo):
            raise LocalProtocolError("DeviceAddedEvent.info must be a DeviceInfo")


@dataclass(frozen=True, slots=True)
class DeviceRemovedEvent(Event):
    """Backend -> frontend: the device at ``device`` (packed) left the guest's bus.

    From this event on the backend answers requests on it with ``DEVICE_REMOVED``;
    ``message`` says why it went. The frontend fails its requests in flight
    on the device and answers with exactly one :class:`DeviceChangeAck`.
    """

    TAG: ClassVar[int] = 0x65
    change_id: int
    device: int
    message: str

    def __post_init__(self) -> None:
        _int(self, "change_id", self.change_id, U32)
        _int(self, "device", self.device, U32)
        _str(self, "message", self.message, MAX_TEXT_LEN)


@dataclass(frozen=True, slots=True)
class DeviceChangeAck(Message):
    """Frontend -> backend: the guest has applied hot-plug event ``change_id``."""

    TAG: ClassVar[int] = 0x81
    change_id: int

    def __post_init__(self) -> None:
        _int(self, "change_id", self.change_id, U32)


#: Every concrete message type by wire tag. Later issues append here.
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TAG: cls
    for cls in (
        Hello,
        Welcome,
        HandshakeRejected,
        Goodbye,
        PingRequest,
        SnapshotRequest,
        ConfigReadRequest,
        ConfigWriteRequest,
        BarReadRequest,
        BarWriteRequest,
        ResetRequest,
        SnapshotReply,
        ValueReply,
        DoneReply,
        ErrorReply,
        InterruptEnableRequest,
        InterruptDisableRequest,
        InterruptEoiRequest,
        InterruptMaskRequest,
        DmaMapRequest,
        DmaUnmapRequest,
        InterruptEvent,
        DmaFaultEvent,
        DmaReadCall,
        DmaWriteCall,
        DmaCallResult,
        DeviceAddedEvent,
        DeviceRemovedEvent,
        DeviceChangeAck,
    )
}
