"""Payloads of the device-description and mapping commands.

DMA_MAP/DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (with the
sparse-mmap and type capabilities), DEVICE_GET_REGION_IO_FDS,
DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS, each as the specification lays it
out. Every class validates itself when built (``check``), so a decoded message
is a valid one; decoders also insist on exact sizes, so trailing or missing
bytes are errors, never ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.protocol.vfio_user._wire import VfioUserLimits, check

__all__ = [
    "Empty",
    "DmaMap",
    "DmaUnmap",
    "DeviceInfoRequest",
    "DeviceInfo",
    "RegionInfoRequest",
    "RegionInfo",
    "SparseArea",
    "RegionIoFdsRequest",
    "RegionIoFds",
    "IoFdSubregion",
    "DMA_READABLE", "DMA_WRITEABLE", "DMA_UNMAP_ALL",
    "DEVICE_FLAG_RESET", "DEVICE_FLAG_PCI",
    "REGION_FLAG_READ", "REGION_FLAG_WRITE", "REGION_FLAG_MMAP", "REGION_FLAG_CAPS",
    "CAP_SPARSE_MMAP", "CAP_TYPE",
    "IO_FD_IOEVENTFD", "IO_FD_IOREGIONFD",
    "PCI_BAR0_REGION", "PCI_ROM_REGION", "PCI_CONFIG_REGION", "PCI_VGA_REGION",
    "PCI_NUM_REGIONS",
]

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

DMA_READABLE = 1 << 0
DMA_WRITEABLE = 1 << 1
#: DMA_UNMAP: unmap every region (address and size must be 0).
DMA_UNMAP_ALL = 1 << 1
_DMA_UNMAP_GET_DIRTY_BITMAP = 1 << 0  # the old dirty-page interface: refused

DEVICE_FLAG_RESET = 1 << 0
DEVICE_FLAG_PCI = 1 << 1

REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3
CAP_SPARSE_MMAP = 1
CAP_TYPE = 2

IO_FD_IOEVENTFD = 0
IO_FD_IOREGIONFD = 1

#: PCI region indexes: BAR0-5 are 0-5.
PCI_BAR0_REGION = 0
PCI_ROM_REGION = 6
PCI_CONFIG_REGION = 7
PCI_VGA_REGION = 8
PCI_NUM_REGIONS = 9


def _u32(value: int, name: str) -> None:
    check(isinstance(value, int) and 0 <= value <= _U32, f"{name} {value!r} is not a u32")


def _u64(value: int, name: str) -> None:
    check(isinstance(value, int) and 0 <= value <= _U64, f"{name} {value!r} is not a u64")


def _exact(payload: bytes, size: int, what: str) -> None:
    check(len(payload) == size, f"{what} payload is {len(payload)} bytes, not {size}")


@dataclass(frozen=True, slots=True)
class Empty:
    """A payload with no bytes (most replies, DEVICE_RESET)."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> Empty:
        _exact(payload, 0, "an empty")
        return cls()


_DMA_MAP = struct.Struct("<IIQQQ")


@dataclass(frozen=True, slots=True)
class DmaMap:
    """DMA_MAP: the client's memory ``[address, address + size)`` (fd-backed at ``offset``
    when a descriptor comes with the message)."""

    address: int
    size: int
    flags: int = DMA_READABLE | DMA_WRITEABLE
    offset: int = 0

    def __post_init__(self) -> None:
        _u64(self.address, "address")
        _u64(self.size, "size")
        _u64(self.offset, "offset")
        check(self.size > 0, "a DMA map of size 0 maps nothing")
        check(self.address + self.size - 1 <= _U64, "the DMA map wraps around the address space")
        check(self.flags & ~(DMA_READABLE | DMA_WRITEABLE) == 0,
              f"DMA_MAP flags {self.flags:#x} set unknown bits")

    def encode(self) -> bytes:
        return _DMA_MAP.pack(_DMA_MAP.size, self.flags, self.offset, self.address, self.size)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DmaMap:
        _exact(payload, _DMA_MAP.size, "DMA_MAP")
        argsz, flags, offset, address, size = _DMA_MAP.unpack(payload)
        check(argsz == _DMA_MAP.size, f"DMA_MAP argsz {argsz} is not {_DMA_MAP.size}")
        return cls(address, size, flags, offset)


_DMA_UNMAP = struct.Struct("<IIQQ")


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """DMA_UNMAP (request and reply): one earlier map exactly, or all with ``DMA_UNMAP_ALL``."""

    address: int
    size: int
    flags: int = 0
    argsz: int = _DMA_UNMAP.size

    def __post_init__(self) -> None:
        _u64(self.address, "address")
        _u64(self.size, "size")
        _u32(self.argsz, "argsz")
        check(self.flags & ~DMA_UNMAP_ALL == 0,
              f"DMA_UNMAP flags {self.flags:#x} are not supported (only DMA_UNMAP_ALL)")
        if self.flags & DMA_UNMAP_ALL:
            check(self.address == 0 and self.size == 0,
                  "DMA_UNMAP with DMA_UNMAP_ALL must give address 0 and size 0")
        check(self.argsz >= _DMA_UNMAP.size, f"DMA_UNMAP argsz {self.argsz} is under 24")

    @property
    def all(self) -> bool:
        return bool(self.flags & DMA_UNMAP_ALL)

    def encode(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DmaUnmap:
        _exact(payload, _DMA_UNMAP.size, "DMA_UNMAP")
        argsz, flags, address, size = _DMA_UNMAP.unpack(payload)
        return cls(address, size, flags, argsz)


_INFO = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class DeviceInfoRequest:
    """DEVICE_GET_INFO request: only ``argsz`` (the reply space) is meaningful."""

    argsz: int = _INFO.size

    def __post_init__(self) -> None:
        _u32(self.argsz, "argsz")

    def encode(self) -> bytes:
        return _INFO.pack(self.argsz, 0, 0, 0)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DeviceInfoRequest:
        _exact(payload, _INFO.size, "DEVICE_GET_INFO")
        argsz, flags, regions, irqs = _INFO.unpack(payload)
        check(flags == regions == irqs == 0, "DEVICE_GET_INFO request fields must be zero")
        return cls(argsz)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """DEVICE_GET_INFO reply."""

    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = _INFO.size

    def __post_init__(self) -> None:
        for name in ("flags", "num_regions", "num_irqs", "argsz"):
            _u32(getattr(self, name), name)

    def encode(self) -> bytes:
        return _INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> DeviceInfo:
        _exact(payload, _INFO.size, "DEVICE_GET_INFO reply")
        argsz, flags, regions, irqs = _INFO.unpack(payload)
        return cls(flags, regions, irqs, argsz)


_REGION = struct.Struct("<IIIIQQ")
_CAP_HEADER = struct.Struct("<HHI")
_SPARSE_HEAD = struct.Struct("<II")
_AREA = struct.Struct("<QQ")
_TYPE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class RegionInfoRequest:
    """DEVICE_GET_REGION_INFO request for region ``index`` with ``argsz`` bytes of reply space."""

    index: int
    argsz: int = _REGION.size

    def __post_init__(self) -> None:
        _u32(self.index, "index")
        _u32(self.argsz, "argsz")

    def encode(self) -> bytes:
        return _REGION.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionInfoRequest:
        _exact(payload, _REGION.size, "DEVICE_GET_REGION_INFO")
        argsz, flags, index, cap_offset, size, offset = _REGION.unpack(payload)
        check(flags == cap_offset == size == offset == 0,
              "DEVICE_GET_REGION_INFO request fields other than argsz and index must be zero")
        return cls(index, argsz)


@dataclass(frozen=True, slots=True)
class SparseArea:
    """One mmap-able part of a region: ``offset`` from the region's mmap offset, ``size``."""

    offset: int
    size: int

    def __post_init__(self) -> None:
        _u64(self.offset, "sparse area offset")
        _u64(self.size, "sparse area size")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO reply.

    ``sparse`` (the sparse-mmap capability) and ``region_type`` (``(type, subtype)``)
    are the capabilities this codec understands; ``unknown_caps`` lists the ids of
    others found in the chain. When the client's ``argsz`` was too small, the
    server sends the 32-byte structure alone with ``argsz`` saying how much room
    the whole reply needs, and ``complete`` is false: ask again with that ``argsz``.
    """

    index: int
    flags: int
    size: int
    offset: int = 0
    sparse: tuple[SparseArea, ...] | None = None
    region_type: tuple[int, int] | None = None
    unknown_caps: tuple[int, ...] = ()
    argsz: int = 0  # 0: exactly what the capabilities need
    complete: bool = True

    def __post_init__(self) -> None:
        _u32(self.index, "index")
        _u32(self.flags, "flags")
        _u64(self.size, "size")
        _u64(self.offset, "offset")
        _u32(self.argsz, "argsz")
        if self.sparse is not None:
            check(len(self.sparse) <= 0xFFFFFFFF, "too many sparse areas")
            for area in self.sparse:
                check(area.offset + area.size <= self.size,
                      f"sparse area {area.offset:#x}+{area.size:#x} is outside the region")
        if self.region_type is not None:
            _u32(self.region_type[0], "region type")
            _u32(self.region_type[1], "region subtype")
        if self.has_caps and self.complete:
            check(bool(self.flags & REGION_FLAG_CAPS),
                  "a region info with capabilities must set REGION_FLAG_CAPS")

    @property
    def has_caps(self) -> bool:
        return self.sparse is not None or self.region_type is not None

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_FLAG_WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & REGION_FLAG_MMAP)

    def _caps_bytes(self) -> bytes:
        caps: list[tuple[int, bytes]] = []
        if self.sparse is not None:
            caps.append((CAP_SPARSE_MMAP, _SPARSE_HEAD.pack(len(self.sparse), 0) + b"".join(
                _AREA.pack(a.offset, a.size) for a in self.sparse
            )))
        if self.region_type is not None:
            caps.append((CAP_TYPE, _TYPE.pack(*self.region_type)))
        out = bytearray()
        at = _REGION.size
        for i, (cap_id, body) in enumerate(caps):
            end = at + _CAP_HEADER.size + len(body)
            out += _CAP_HEADER.pack(cap_id, 1, end if i + 1 < len(caps) else 0) + body
            at = end
        return bytes(out)

    def encode(self) -> bytes:
        caps = self._caps_bytes() if self.complete else b""
        need = _REGION.size + (len(self._caps_bytes()) if self.has_caps else 0)
        argsz = self.argsz or need
        cap_offset = _REGION.size if caps else 0
        head = _REGION.pack(argsz, self.flags, self.index, cap_offset, self.size, self.offset)
        return head + caps

    def fitted(self, room: int) -> RegionInfo:
        """The reply to a request with ``argsz = room``: whole, or the bare structure
        with ``argsz`` saying how much room the whole needs."""
        need = len(self.encode())
        if need <= room:
            return self
        return RegionInfo(self.index, self.flags, self.size, self.offset, self.sparse,
                          self.region_type, self.unknown_caps, need, complete=False)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionInfo:
        check(len(payload) >= _REGION.size,
              f"DEVICE_GET_REGION_INFO reply of {len(payload)} bytes is under 32")
        argsz, flags, index, cap_offset, size, offset = _REGION.unpack_from(payload)
        if len(payload) == _REGION.size:
            if flags & REGION_FLAG_CAPS and argsz > _REGION.size:
                # Capabilities not sent: the client's argsz was too small.
                return cls(index, flags, size, offset, argsz=argsz, complete=False)
            if cap_offset == 0:
                return cls(index, flags, size, offset, argsz=argsz)
        check(len(payload) <= argsz or argsz == 0,
              f"DEVICE_GET_REGION_INFO reply of {len(payload)} bytes is over its argsz {argsz}")
        check(bool(flags & REGION_FLAG_CAPS) and cap_offset >= _REGION.size,
              "DEVICE_GET_REGION_INFO reply carries bytes after the structure but no capability")
        sparse: tuple[SparseArea, ...] | None = None
        region_type: tuple[int, int] | None = None
        unknown: list[int] = []
        at, seen = cap_offset, 0
        while at:
            seen += 1
            check(seen <= limits.max_region_caps,
                  f"region info chains more than {limits.max_region_caps} capabilities")
            check(at + _CAP_HEADER.size <= len(payload), f"capability at {at} is outside the reply")
            cap_id, _version, nxt = _CAP_HEADER.unpack_from(payload, at)
            end = nxt if nxt else len(payload)
            # Each capability lies after the one before it: no loops, no overlap.
            check(at + _CAP_HEADER.size <= end <= len(payload),
                  f"capability at {at} points to {nxt}, not past itself inside the reply")
            body = payload[at + _CAP_HEADER.size:end]
            if cap_id == CAP_SPARSE_MMAP:
                check(sparse is None, "two sparse-mmap capabilities")
                check(len(body) >= _SPARSE_HEAD.size, "sparse-mmap capability is truncated")
                count, _reserved = _SPARSE_HEAD.unpack_from(body)
                check(count <= limits.max_sparse_areas,
                      f"{count} sparse areas are over the limit of {limits.max_sparse_areas}")
                check(len(body) == _SPARSE_HEAD.size + count * _AREA.size,
                      f"sparse-mmap capability of {len(body)} bytes does not hold {count} areas")
                sparse = tuple(
                    SparseArea(*_AREA.unpack_from(body, _SPARSE_HEAD.size + i * _AREA.size))
                    for i in range(count)
                )
            elif cap_id == CAP_TYPE:
                check(region_type is None, "two region-type capabilities")
                check(len(body) == _TYPE.size, "region-type capability is not 8 bytes")
                region_type = _TYPE.unpack(body)
            else:
                unknown.append(cap_id)
            at = nxt
        return cls(index, flags, size, offset, sparse, region_type, tuple(unknown), argsz)


_IO_FDS = struct.Struct("<IIII")
_SUBREGION = struct.Struct("<QQIIIIQ")


@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest:
    """DEVICE_GET_REGION_IO_FDS request for region ``index``."""

    index: int
    argsz: int = _IO_FDS.size

    def __post_init__(self) -> None:
        _u32(self.index, "index")
        _u32(self.argsz, "argsz")

    def encode(self) -> bytes:
        return _IO_FDS.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionIoFdsRequest:
        _exact(payload, _IO_FDS.size, "DEVICE_GET_REGION_IO_FDS")
        argsz, flags, index, count = _IO_FDS.unpack(payload)
        check(flags == count == 0, "DEVICE_GET_REGION_IO_FDS flags and count must be zero")
        return cls(index, argsz)


@dataclass(frozen=True, slots=True)
class IoFdSubregion:
    """One sub-region of an IO_FDS reply: notify through descriptor ``fd_index``.

    ``data`` is the ioeventfd's datamatch or the ioregionfd's user data.
    """

    offset: int
    size: int
    fd_index: int
    type: int = IO_FD_IOEVENTFD
    flags: int = 0
    data: int = 0

    def __post_init__(self) -> None:
        _u64(self.offset, "offset")
        _u64(self.size, "size")
        _u32(self.fd_index, "fd_index")
        check(self.type in (IO_FD_IOEVENTFD, IO_FD_IOREGIONFD), f"io fd type {self.type} unknown")
        _u32(self.flags, "flags")
        _u64(self.data, "data")


@dataclass(frozen=True, slots=True)
class RegionIoFds:
    """DEVICE_GET_REGION_IO_FDS reply. Its descriptors come with the message."""

    index: int
    subregions: tuple[IoFdSubregion, ...] = ()
    argsz: int = 0  # 0: exactly the size of the subregions

    def __post_init__(self) -> None:
        _u32(self.index, "index")
        _u32(self.argsz, "argsz")

    @property
    def fds_needed(self) -> int:
        """How many descriptors must come with it (the highest ``fd_index`` + 1)."""
        return max((s.fd_index + 1 for s in self.subregions), default=0)

    def encode(self) -> bytes:
        body = b"".join(
            _SUBREGION.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.data)
            for s in self.subregions
        )
        argsz = self.argsz or _IO_FDS.size + len(body)
        return _IO_FDS.pack(argsz, 0, self.index, len(self.subregions)) + body

    @classmethod
    def decode(cls, payload: bytes, limits: VfioUserLimits) -> RegionIoFds:
        check(len(payload) >= _IO_FDS.size, "DEVICE_GET_REGION_IO_FDS reply is under 16 bytes")
        argsz, flags, index, count = _IO_FDS.unpack_from(payload)
        check(flags == 0, "DEVICE_GET_REGION_IO_FDS reply flags must be zero")
        check(count <= limits.max_io_fds_subregions,
              f"{count} io fd sub-regions are over the limit of {limits.max_io_fds_subregions}")
        body = payload[_IO_FDS.size:]
        if not body and argsz > _IO_FDS.size:
            return cls(index, (), argsz)  # too little room was offered: ask again
        check(len(body) == count * _SUBREGION.size,
              f"IO_FDS reply holds {len(body)} bytes for {count} sub-regions of 40")
        subs = []
        for i in range(count):
            off, size, fd_index, kind, flags_i, _pad, data = _SUBREGION.unpack_from(
                body, i * _SUBREGION.size
            )
            subs.append(IoFdSubregion(off, size, fd_index, kind, flags_i, data))
        return cls(index, tuple(subs), argsz)
