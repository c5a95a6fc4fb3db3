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

The interrupt and DMA messages are in ``_messages_irq_dma``, and the base
classes, field declarations and checks every message is built from are in
``_schema``; this module is the catalogue's one index (:data:`MESSAGE_TYPES`)
and re-exports them, so every message is importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

from shared.errors import ErrorCode, LocalProtocolError
from shared.protocol._messages_irq_dma import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    IRQ_MODES,
    MAX_DMA_CHUNK,
    MAX_DMA_WINDOW,
    MAX_MSIX_VECTORS,
    DmaCallResult,
    DmaFaultEvent,
    DmaMapRequest,
    DmaReadCall,
    DmaUnmapRequest,
    DmaWriteCall,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptEvent,
    InterruptMaskRequest,
)
from shared.protocol._schema import (
    _BAR_INDEX,
    _CONFIG_OFFSET,
    _U32_FIELD,
    _U64_FIELD,
    _VALUE,
    MAX_DEVICES,
    MAX_TEXT_LEN,
    MAX_TOKEN_LEN,
    U8,
    U16,
    U32,
    U64,
    Event,
    IntField,
    Message,
    Reply,
    Request,
    _code,
    _features,
    _int,
    _name,
    _str,
    declared_fields,
)

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

#: The feature name both sides offer in the handshake to use hot-plug events;
#: a backend sends DeviceAddedEvent/DeviceRemovedEvent only when it was granted.
HOTPLUG_FEATURE = "hotplug"


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
