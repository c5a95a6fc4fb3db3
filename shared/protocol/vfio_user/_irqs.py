"""Payloads of the interrupt commands: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.protocol.vfio_user._wire import VfioUserLimits, check

__all__ = [
    "IrqInfoRequest",
    "IrqInfo",
    "SetIrqs",
    "IRQ_INFO_EVENTFD", "IRQ_INFO_MASKABLE", "IRQ_INFO_AUTOMASKED", "IRQ_INFO_NORESIZE",
    "IRQ_DATA_NONE", "IRQ_DATA_BOOL", "IRQ_DATA_EVENTFD",
    "IRQ_ACTION_MASK", "IRQ_ACTION_UNMASK", "IRQ_ACTION_TRIGGER",
    "PCI_INTX_IRQ", "PCI_MSI_IRQ", "PCI_MSIX_IRQ", "PCI_ERR_IRQ", "PCI_REQ_IRQ",
    "PCI_NUM_IRQS",
]

_U32 = 0xFFFFFFFF
_INFO = struct.Struct("<IIII")

IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

IRQ_DATA_NONE = 1 << 0
IRQ_DATA_BOOL = 1 << 1
IRQ_DATA_EVENTFD = 1 << 2
IRQ_ACTION_MASK = 1 << 3
IRQ_ACTION_UNMASK = 1 << 4
IRQ_ACTION_TRIGGER = 1 << 5
_IRQ_DATA = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
_IRQ_ACTION = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

#: PCI interrupt types (DEVICE_GET_IRQ_INFO / SET_IRQS ``index``).
PCI_INTX_IRQ = 0
PCI_MSI_IRQ = 1
PCI_MSIX_IRQ = 2
PCI_ERR_IRQ = 3
PCI_REQ_IRQ = 4
PCI_NUM_IRQS = 5


def _exact(payload: bytes, size: int, what: str) -> None:
    check(len(payload) == size, f"{what} payload is {len(payload)} bytes, not {size}")


def _u32(value: int, name: str) -> None:
    check(isinstance(value, int) and 0 <= value <= _U32, f"{name} {value!r} is not a u32")


@dataclass(frozen=True, slots=True)
class IrqInfoRequest:
    """DEVICE_GET_IRQ_INFO request for interrupt type ``index``."""

    index: int
    argsz: int = _INFO.size

    def __post_init__(self) -> None:
        _u32(self.index, "index")
        _u32(self.argsz, "argsz")

    def encode(self) -> bytes:
        return _INFO.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> IrqInfoRequest:
        _exact(payload, _INFO.size, "DEVICE_GET_IRQ_INFO")
        argsz, flags, index, count = _INFO.unpack(payload)
        check(flags == count == 0, "DEVICE_GET_IRQ_INFO flags and count must be zero")
        return cls(index, argsz)


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO reply: ``count`` interrupts of type ``index``."""

    index: int
    flags: int
    count: int
    argsz: int = _INFO.size

    def __post_init__(self) -> None:
        for name in ("index", "flags", "count", "argsz"):
            _u32(getattr(self, name), name)

    def encode(self) -> bytes:
        return _INFO.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> IrqInfo:
        _exact(payload, _INFO.size, "DEVICE_GET_IRQ_INFO reply")
        argsz, flags, index, count = _INFO.unpack(payload)
        return cls(index, flags, count, argsz)


_SET_IRQS = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class SetIrqs:
    """DEVICE_SET_IRQS: one data type and one action on ``count`` interrupts from ``start``.

    ``flags`` holds exactly one ``IRQ_DATA_*`` and one ``IRQ_ACTION_*`` bit.
    ``data`` is the boolean array for ``IRQ_DATA_BOOL`` (one byte per interrupt)
    and empty otherwise; with ``IRQ_DATA_EVENTFD`` the descriptors come with
    the message (``count`` of them, or none to de-assign).
    """

    index: int
    flags: int
    start: int = 0
    count: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        for name in ("index", "flags", "start", "count"):
            _u32(getattr(self, name), name)
        check(self.flags & ~(_IRQ_DATA | _IRQ_ACTION) == 0,
              f"SET_IRQS flags {self.flags:#x} set unknown bits")
        data_type, action = self.flags & _IRQ_DATA, self.flags & _IRQ_ACTION
        check(data_type in (IRQ_DATA_NONE, IRQ_DATA_BOOL, IRQ_DATA_EVENTFD),
              "SET_IRQS needs exactly one data type (NONE, BOOL or EVENTFD)")
        check(action in (IRQ_ACTION_MASK, IRQ_ACTION_UNMASK, IRQ_ACTION_TRIGGER),
              "SET_IRQS needs exactly one action (MASK, UNMASK or TRIGGER)")
        check(self.start + self.count <= 0xFFFFFFFF, "SET_IRQS start + count overflows")
        if data_type == IRQ_DATA_BOOL:
            check(len(self.data) == self.count,
                  f"SET_IRQS DATA_BOOL holds {len(self.data)} booleans for {self.count} interrupts")
            check(all(b in (0, 1) for b in self.data), "SET_IRQS booleans must be 0 or 1")
        else:
            check(not self.data, "SET_IRQS carries data only with DATA_BOOL")
        if self.count == 0:
            check(data_type == IRQ_DATA_NONE and action == IRQ_ACTION_TRIGGER and self.start == 0,
                  "SET_IRQS count 0 is only valid as DATA_NONE|ACTION_TRIGGER from 0 "
                  "(disable the index)")

    @property
    def data_type(self) -> int:
        return self.flags & _IRQ_DATA

    @property
    def action(self) -> int:
        return self.flags & _IRQ_ACTION

    @property
    def disables_all(self) -> bool:
        """count 0 with DATA_NONE: every interrupt of the index off."""
        return self.count == 0

    def encode(self) -> bytes:
        return _SET_IRQS.pack(
            _SET_IRQS.size + len(self.data), self.flags, self.index, self.start, self.count
        ) + self.data

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> SetIrqs:
        check(len(payload) >= _SET_IRQS.size, "DEVICE_SET_IRQS payload is under 20 bytes")
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload)
        check(argsz >= _SET_IRQS.size, f"DEVICE_SET_IRQS argsz {argsz} is under 20")
        return cls(index, flags, start, count, payload[_SET_IRQS.size:])
