"""Payloads of the data-moving commands and of device features and migration.

REGION_READ/WRITE, DMA_READ/WRITE, REGION_WRITE_MULTI, DEVICE_FEATURE and
MIG_DATA_READ/WRITE. A ``count`` always equals the data actually carried; the
connection checks it against the receiver's ``max_data_xfer_size``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.protocol.vfio_user._wire import VfioUserLimits, check

__all__ = [
    "RegionAccess",
    "RegionData",
    "DmaAccess",
    "DmaData",
    "DmaWriteReply",
    "MultiWrite",
    "WriteMulti",
    "WriteMultiReply",
    "DeviceFeature",
    "MigDataRead",
    "MigData",
    "FEATURE_MASK", "FEATURE_GET", "FEATURE_SET", "FEATURE_PROBE",
    "FEATURE_MIGRATION", "FEATURE_MIG_DEVICE_STATE",
    "FEATURE_DMA_LOGGING_START", "FEATURE_DMA_LOGGING_STOP", "FEATURE_DMA_LOGGING_REPORT",
    "MIGRATION_STOP_COPY", "MIGRATION_P2P", "MIGRATION_PRE_COPY",
    "MigDeviceState",
]

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_REGION_ACCESS = struct.Struct("<QII")
_DMA_ACCESS = struct.Struct("<QQ")
_DMA_WRITE_REPLY = struct.Struct("<QI")


def _range(offset: int, count: int, what: str, count_max: int) -> None:
    check(isinstance(offset, int) and 0 <= offset <= _U64, f"{what} offset {offset!r} is not a u64")
    check(isinstance(count, int) and 0 <= count <= count_max,
          f"{what} count {count!r} is out of range")
    check(offset + count - 1 <= _U64 or count == 0, f"{what} wraps around the address space")


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """``count`` bytes at ``offset`` of region ``region``: the REGION_READ request and the
    REGION_WRITE reply."""

    region: int
    offset: int
    count: int

    def __post_init__(self) -> None:
        check(isinstance(self.region, int) and 0 <= self.region <= _U32, "region is not a u32")
        _range(self.offset, self.count, "region access", _U32)

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionAccess:
        check(len(payload) == _REGION_ACCESS.size,
              f"region access payload is {len(payload)} bytes, not 16")
        offset, region, count = _REGION_ACCESS.unpack(payload)
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionData:
    """``data`` at ``offset`` of region ``region``: the REGION_WRITE request and the
    REGION_READ reply."""

    region: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        check(isinstance(self.region, int) and 0 <= self.region <= _U32, "region is not a u32")
        check(isinstance(self.data, bytes), "region data must be bytes")
        _range(self.offset, len(self.data), "region access", _U32)

    @property
    def count(self) -> int:
        return len(self.data)

    def encode(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionData:
        check(len(payload) >= _REGION_ACCESS.size, "region data payload is under 16 bytes")
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        data = payload[_REGION_ACCESS.size:]
        check(count == len(data), f"region access says count {count} but carries {len(data)} bytes")
        return cls(region, offset, bytes(data))


@dataclass(frozen=True, slots=True)
class DmaAccess:
    """``count`` bytes of client memory at ``address``: the DMA_READ request."""

    address: int
    count: int

    def __post_init__(self) -> None:
        _range(self.address, self.count, "DMA access", _U64)

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DmaAccess:
        check(len(payload) == _DMA_ACCESS.size, f"DMA access payload is {len(payload)} bytes")
        return cls(*_DMA_ACCESS.unpack(payload))


@dataclass(frozen=True, slots=True)
class DmaData:
    """``data`` of client memory at ``address``: the DMA_WRITE request and DMA_READ reply.

    Laid out as the specification and libvfio-user do (a 64-bit count).
    """

    address: int
    data: bytes

    def __post_init__(self) -> None:
        check(isinstance(self.data, bytes), "DMA data must be bytes")
        _range(self.address, len(self.data), "DMA access", _U64)

    @property
    def count(self) -> int:
        return len(self.data)

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DmaData:
        check(len(payload) >= _DMA_ACCESS.size, "DMA data payload is under 16 bytes")
        address, count = _DMA_ACCESS.unpack_from(payload)
        data = payload[_DMA_ACCESS.size:]
        check(count == len(data), f"DMA access says count {count} but carries {len(data)} bytes")
        return cls(address, bytes(data))


@dataclass(frozen=True, slots=True)
class DmaWriteReply:
    """DMA_WRITE reply: address and count. The specification's table gives a 32-bit
    count (12 bytes); libvfio-user sends 64 bits (16 bytes): both decode, 16 are sent."""

    address: int
    count: int

    def __post_init__(self) -> None:
        _range(self.address, self.count, "DMA write reply", _U64)

    def encode(self) -> bytes:
        return _DMA_ACCESS.pack(self.address, self.count)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DmaWriteReply:
        if len(payload) == _DMA_WRITE_REPLY.size:
            return cls(*_DMA_WRITE_REPLY.unpack(payload))
        check(len(payload) == _DMA_ACCESS.size,
              f"DMA_WRITE reply is {len(payload)} bytes, not 12 or 16")
        return cls(*_DMA_ACCESS.unpack(payload))


_MULTI_HEAD = struct.Struct("<Q")
_MULTI_ENTRY = struct.Struct("<QII8s")


@dataclass(frozen=True, slots=True)
class MultiWrite:
    """One write of REGION_WRITE_MULTI: at most 8 bytes."""

    region: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        check(isinstance(self.region, int) and 0 <= self.region <= _U32, "region is not a u32")
        check(isinstance(self.data, bytes) and 1 <= len(self.data) <= 8,
              "a coalesced write carries 1 to 8 bytes")
        _range(self.offset, len(self.data), "coalesced write", 8)


@dataclass(frozen=True, slots=True)
class WriteMulti:
    """REGION_WRITE_MULTI: writes to apply in order (only if ``write_multiple`` was agreed)."""

    writes: tuple[MultiWrite, ...]

    def __post_init__(self) -> None:
        check(len(self.writes) >= 1, "REGION_WRITE_MULTI needs at least one write")

    def encode(self) -> bytes:
        return _MULTI_HEAD.pack(len(self.writes)) + b"".join(
            _MULTI_ENTRY.pack(w.offset, w.region, len(w.data), w.data.ljust(8, b"\0"))
            for w in self.writes
        )

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> WriteMulti:
        check(len(payload) >= _MULTI_HEAD.size, "REGION_WRITE_MULTI payload is under 8 bytes")
        (count,) = _MULTI_HEAD.unpack_from(payload)
        check(1 <= count <= limits.max_write_multi,
              f"REGION_WRITE_MULTI of {count} writes (1..{limits.max_write_multi} allowed)")
        check(len(payload) == _MULTI_HEAD.size + count * _MULTI_ENTRY.size,
              f"REGION_WRITE_MULTI of {len(payload)} bytes does not hold {count} writes")
        writes = []
        for i in range(count):
            offset, region, size, data = _MULTI_ENTRY.unpack_from(
                payload, _MULTI_HEAD.size + i * _MULTI_ENTRY.size
            )
            check(1 <= size <= 8, f"coalesced write {i} has count {size} (1..8 allowed)")
            writes.append(MultiWrite(region, offset, data[:size]))
        return cls(tuple(writes))


@dataclass(frozen=True, slots=True)
class WriteMultiReply:
    """REGION_WRITE_MULTI reply: how many writes were completed."""

    count: int

    def __post_init__(self) -> None:
        check(isinstance(self.count, int) and 0 <= self.count <= _U64, "wr_cnt is not a u64")

    def encode(self) -> bytes:
        return _MULTI_HEAD.pack(self.count)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> WriteMultiReply:
        check(len(payload) == _MULTI_HEAD.size, "REGION_WRITE_MULTI reply is not 8 bytes")
        return cls(*_MULTI_HEAD.unpack(payload))


FEATURE_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_DMA_LOGGING_START = 6
FEATURE_DMA_LOGGING_STOP = 7
FEATURE_DMA_LOGGING_REPORT = 8
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
_FEATURE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class DeviceFeature:
    """DEVICE_FEATURE request and reply: ``flags`` = feature index | GET/SET/PROBE.

    ``data`` is the feature's own payload (see :class:`MigDeviceState` for the
    migration state); ``argsz`` in a request is the reply room, in a reply the
    size of the whole payload.
    """

    flags: int
    data: bytes = b""
    argsz: int = 0  # 0: exactly the payload's size

    def __post_init__(self) -> None:
        check(isinstance(self.flags, int) and 0 <= self.flags <= _U32, "flags is not a u32")
        check(self.flags & ~(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) == 0,
              f"DEVICE_FEATURE flags {self.flags:#x} set unknown bits")
        check(not (self.flags & FEATURE_GET and self.flags & FEATURE_SET)
              or bool(self.flags & FEATURE_PROBE),
              "DEVICE_FEATURE GET and SET exclude each other except with PROBE")
        check(bool(self.flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE)),
              "DEVICE_FEATURE needs GET, SET or PROBE")
        check(isinstance(self.argsz, int) and 0 <= self.argsz <= _U32, "argsz is not a u32")

    @property
    def feature(self) -> int:
        return self.flags & FEATURE_MASK

    def encode(self) -> bytes:
        return _FEATURE.pack(self.argsz or _FEATURE.size + len(self.data), self.flags) + self.data

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DeviceFeature:
        check(len(payload) >= _FEATURE.size, "DEVICE_FEATURE payload is under 8 bytes")
        argsz, flags = _FEATURE.unpack_from(payload)
        return cls(flags, bytes(payload[_FEATURE.size:]), argsz)


_MIG_STATE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class MigDeviceState:
    """The data of FEATURE_MIG_DEVICE_STATE: ``device_state`` (``data_fd`` is unused)."""

    device_state: int
    data_fd: int = 0

    def __post_init__(self) -> None:
        check(0 <= self.device_state <= 7, f"device state {self.device_state} is not 0..7")
        check(0 <= self.data_fd <= _U32, "data_fd is not a u32")

    def encode(self) -> bytes:
        return _MIG_STATE.pack(self.device_state, self.data_fd)

    @classmethod
    def decode(cls, data: bytes) -> MigDeviceState:
        check(len(data) == _MIG_STATE.size, "FEATURE_MIG_DEVICE_STATE data is not 8 bytes")
        return cls(*_MIG_STATE.unpack(data))


_MIG = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class MigDataRead:
    """MIG_DATA_READ request: up to ``size`` bytes of migration data."""

    size: int
    argsz: int = 0  # 0: room for the header and ``size`` bytes

    def __post_init__(self) -> None:
        check(isinstance(self.size, int) and 0 <= self.size <= _U32, "size is not a u32")
        check(isinstance(self.argsz, int) and 0 <= self.argsz <= _U32, "argsz is not a u32")

    def encode(self) -> bytes:
        return _MIG.pack(self.argsz or _MIG.size + self.size, self.size)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> MigDataRead:
        check(len(payload) == _MIG.size, "MIG_DATA_READ payload is not 8 bytes")
        argsz, size = _MIG.unpack(payload)
        return cls(size, argsz)


@dataclass(frozen=True, slots=True)
class MigData:
    """Migration data: the MIG_DATA_WRITE request and the MIG_DATA_READ reply."""

    data: bytes
    argsz: int = 0  # 0: the payload's own size

    def __post_init__(self) -> None:
        check(isinstance(self.data, bytes) and len(self.data) <= _U32, "migration data too long")
        check(isinstance(self.argsz, int) and 0 <= self.argsz <= _U32, "argsz is not a u32")

    def encode(self) -> bytes:
        return _MIG.pack(self.argsz or _MIG.size + len(self.data), len(self.data)) + self.data

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> MigData:
        check(len(payload) >= _MIG.size, "migration data payload is under 8 bytes")
        argsz, size = _MIG.unpack_from(payload)
        data = payload[_MIG.size:]
        check(size == len(data), f"migration data says size {size} but carries {len(data)}")
        return cls(bytes(data), argsz)
