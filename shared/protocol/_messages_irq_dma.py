"""The interrupt and DMA messages: requests, events and the backend's calls.

Interrupts: the frontend enables, disables, masks and acknowledges (EOI)
vectors with requests; the backend reports each firing with an
:class:`InterruptEvent` (or signals the eventfds the frontend sent).
DMA: the frontend maps and unmaps windows of guest memory; the backend
reports a device's access outside them with a :class:`DmaFaultEvent`, and
reaches guest memory that is not shared with it by *calling* the frontend
(:class:`DmaReadCall`, :class:`DmaWriteCall`), which answers each call with
exactly one :class:`DmaCallResult`. Registered in
``_messages.MESSAGE_TYPES`` with the rest of the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shared.errors import ErrorCode, LocalProtocolError
from shared.protocol._schema import (
    MAX_TEXT_LEN,
    U32,
    U64,
    Event,
    Message,
    Request,
    _code,
    _int,
    _str,
)

__all__ = [
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
]

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
