"""Declarative config-space field tables and the one engine that applies accesses to them.

A :class:`FieldTable` says, for every register of one device's config space,
where each bit is read from and what a write to it does. It is pure data: a
reader sees in one place exactly what a guest may do to each register, and the
same :func:`apply_read` / :func:`apply_write` engine serves every table.

Vocabulary
----------
* A :class:`Field` is one register (``"command"``, ``"bar0"``, ``"msi.control"``):
  a name, an offset, a width in bytes, and the :class:`BitGroup` s that
  partition its bits.
* A :class:`BitGroup` is a named set of bits (``"command.bus_master"``) with one
  :class:`Access` kind and one policy bit, ``allowed``.
* Bytes no field covers are *unlisted*; the table's ``unlisted`` group says
  what they do (by default: read the device, refuse writes).

Read: each bit comes from the device (RO, HWINIT, RW, RW1C), from the virtual
state the backend keeps (EMULATED, EMULATED_RO), or is zero (HIDDEN).

Write, with byte enables (only the bytes the access covers take part), field
by field; the whole access is checked before anything is applied, so a
refused access changes nothing:

1. If no bit group the access touches in a field is ``allowed``, the access is
   refused, whatever the value: the register is not writable by this guest.
   (Read-only groups inside a writable register are marked ``allowed`` by the
   table builder so that writes to their siblings are accepted and they
   themselves ignore the write, as hardware does.)
2. A touched group that is not ``allowed`` may only be written with the value
   the guest reads (so read-modify-write of a register works); a write that
   would change it is refused. For RW1C bits, "change" means writing 1 to a set bit.
3. Allowed groups take effect by kind: RW bits go to the device, RW1C bits
   send their written ones to the device (which clears them), EMULATED bits go
   to the virtual state, and RO, HWINIT and EMULATED_RO bits ignore the write,
   as hardware does.

The engine does no I/O: it returns a :class:`WritePlan` of device writes
(split into aligned chunks covering only the bytes that hold device-bound bits)
and virtual-state changes, which the caller carries out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from shared.errors import ConfigAccessError, ErrorCode

__all__ = [
    "Access",
    "BitGroup",
    "Field",
    "FieldTable",
    "WritePlan",
    "DeviceWrite",
    "AccessDeniedError",
    "FieldTableError",
    "apply_read",
    "apply_write",
    "UNLISTED",
]

#: Name of the rule reported for bytes that no field covers.
UNLISTED = "unlisted"


class Access(enum.Enum):
    """How one bit behaves for reads and (allowed) writes."""

    #: Read from the device; an allowed write is ignored (hardware read-only).
    RO = "ro"
    #: Like RO, but documents that firmware/hardware initialises it.
    HWINIT = "hwinit"
    #: Read from the device; an allowed write goes to the device.
    RW = "rw"
    #: Read from the device; written ones go to the device, which clears those bits.
    RW1C = "rw1c"
    #: Read from and written to the virtual state the backend keeps; never the device.
    EMULATED = "emulated"
    #: Read from the virtual state; writes are ignored (e.g. BAR flag and size bits).
    EMULATED_RO = "emulated-ro"
    #: Reads as zero; every write that sets a bit is refused.
    HIDDEN = "hidden"

    @property
    def reads_device(self) -> bool:
        return self in _DEVICE_READ

    @property
    def reads_virtual(self) -> bool:
        return self in (Access.EMULATED, Access.EMULATED_RO)

    @property
    def reaches_device(self) -> bool:
        """True when an allowed write of this kind is passed to the device."""
        return self in (Access.RW, Access.RW1C)


_DEVICE_READ = frozenset({Access.RO, Access.HWINIT, Access.RW, Access.RW1C})


class FieldTableError(ConfigAccessError):
    """A field table is inconsistent (overlapping fields, masks outside the width, ...)."""

    code = ErrorCode.OPERATION_FAILED


class AccessDeniedError(ConfigAccessError):
    """A guest write was refused by the policy. ``rule`` names the field or bit group."""

    code = ErrorCode.ACCESS_DENIED

    def __init__(self, *, offset: int, size: int, value: int, rule: str, reason: str) -> None:
        super().__init__(
            f"write of {value:#x} ({size} byte(s) at offset {offset:#x}) denied by rule "
            f"{rule!r}: {reason}",
            code=ErrorCode.ACCESS_DENIED,
        )
        self.offset = offset
        self.size = size
        self.value = value
        self.rule = rule
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BitGroup:
    """A named set of bits of one field with one access kind and one policy decision.

    ``mask`` is relative to the field (bit 0 is bit 0 of the field's first byte).
    ``allowed`` says whether a guest write may take effect (see the module doc).
    """

    name: str
    mask: int
    access: Access
    allowed: bool
    doc: str = ""

    def __post_init__(self) -> None:
        # IntFlag members complement within their flags only; store a plain int.
        object.__setattr__(self, "mask", int(self.mask))
        if self.mask <= 0:
            raise FieldTableError(f"bit group {self.name!r}: mask {self.mask:#x} must be positive")
        if self.access is Access.HIDDEN and self.allowed:
            raise FieldTableError(
                f"bit group {self.name!r}: a HIDDEN group cannot be allowed; hidden bits "
                "read as zero and refuse writes"
            )


@dataclass(frozen=True, slots=True)
class Field:
    """One register: ``width`` bytes at ``offset``, its bits partitioned into ``groups``."""

    name: str
    offset: int
    width: int
    groups: tuple[BitGroup, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        if self.offset < 0 or self.width <= 0:
            raise FieldTableError(
                f"field {self.name!r}: offset {self.offset:#x} / width {self.width} is invalid"
            )
        full = (1 << (8 * self.width)) - 1
        seen = 0
        for group in self.groups:
            if group.mask & ~full:
                raise FieldTableError(
                    f"field {self.name!r}: group {group.name!r} mask {group.mask:#x} is wider "
                    f"than {self.width} byte(s)"
                )
            if group.mask & seen:
                raise FieldTableError(
                    f"field {self.name!r}: group {group.name!r} overlaps another group"
                )
            seen |= group.mask
        if seen != full:
            raise FieldTableError(
                f"field {self.name!r}: groups cover {seen:#x}, not every bit of {full:#x}"
            )

    @classmethod
    def simple(
        cls, name: str, offset: int, width: int, access: Access, allowed: bool, doc: str = ""
    ) -> Field:
        """A field whose bits all share one access kind and policy."""
        mask = (1 << (8 * width)) - 1
        return cls(name, offset, width, (BitGroup(name, mask, access, allowed, doc),), doc)

    @property
    def end(self) -> int:
        return self.offset + self.width

    @property
    def allowed(self) -> bool:
        """True when at least one bit group accepts writes."""
        return any(group.allowed for group in self.groups)

    def mask_of(self, access: Access) -> int:
        """Union of the masks of every group of ``access`` kind."""
        mask = 0
        for group in self.groups:
            if group.access is access:
                mask |= group.mask
        return mask

    def replace_groups(self, groups: Iterable[BitGroup]) -> Field:
        """The same register with new bit groups (validated again)."""
        return Field(self.name, self.offset, self.width, tuple(groups), self.doc)


@dataclass(frozen=True, slots=True)
class DeviceWrite:
    """One aligned write the caller must send to the device."""

    offset: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class WritePlan:
    """What an accepted write does: device writes plus virtual-state bit updates.

    ``virtual_mask``/``virtual_value`` are little-endian values over
    ``[offset, offset + size)``: the bits under the mask take the new value.
    """

    offset: int
    size: int
    device_writes: tuple[DeviceWrite, ...]
    virtual_mask: int
    virtual_value: int

    def apply_virtual(self, virtual: bytearray) -> None:
        """Merge the virtual-state update into ``virtual`` (the caller's state image)."""
        if not self.virtual_mask:
            return
        end = self.offset + self.size
        old = int.from_bytes(virtual[self.offset : end], "little")
        new = (old & ~self.virtual_mask) | (self.virtual_value & self.virtual_mask)
        virtual[self.offset : end] = new.to_bytes(self.size, "little")


class FieldTable:
    """An immutable set of non-overlapping fields over a config space of ``size`` bytes.

    ``unlisted_access``/``unlisted_allowed`` describe every byte no field covers.
    Lookups are by byte, precomputed once, so an access costs O(access size).
    """

    __slots__ = (
        "_by_name",
        "_device_mask",
        "_fields",
        "_owner",
        "_virtual_mask",
        "size",
        "unlisted",
    )

    def __init__(
        self,
        size: int,
        fields: Iterable[Field],
        *,
        unlisted_access: Access = Access.RO,
        unlisted_allowed: bool = False,
    ) -> None:
        self.size = size
        self.unlisted = BitGroup(UNLISTED, 0xFF, unlisted_access, unlisted_allowed)
        self._fields: tuple[Field, ...] = tuple(sorted(fields, key=lambda f: f.offset))
        self._owner: list[int] = [-1] * size
        self._by_name: dict[str, Field | BitGroup] = {}
        for index, field in enumerate(self._fields):
            if field.end > size:
                raise FieldTableError(
                    f"field {field.name!r} at {field.offset:#x}+{field.width} lies outside the "
                    f"{size:#x}-byte config space"
                )
            for byte in range(field.offset, field.end):
                if self._owner[byte] != -1:
                    other = self._fields[self._owner[byte]].name
                    raise FieldTableError(
                        f"field {field.name!r} overlaps field {other!r} at offset {byte:#x}"
                    )
                self._owner[byte] = index
            self._register_name(field.name, field)
            for group in field.groups:
                if group.name != field.name:
                    self._register_name(group.name, group)
        # Per-byte read composition masks: bits read from the device / the virtual state.
        self._device_mask = bytearray(size)
        self._virtual_mask = bytearray(size)
        for byte in range(size):
            index = self._owner[byte]
            groups = (self.unlisted,) if index == -1 else self._fields[index].groups
            shift = 0 if index == -1 else 8 * (byte - self._fields[index].offset)
            for group in groups:
                bits = (group.mask >> shift) & 0xFF
                if group.access.reads_device:
                    self._device_mask[byte] |= bits
                elif group.access.reads_virtual:
                    self._virtual_mask[byte] |= bits

    def _register_name(self, name: str, item: Field | BitGroup) -> None:
        if name in self._by_name:
            raise FieldTableError(f"rule name {name!r} is used twice in one table")
        self._by_name[name] = item

    # ------------------------------------------------------------------ lookup
    @property
    def fields(self) -> tuple[Field, ...]:
        """Every field, in offset order."""
        return self._fields

    def __iter__(self) -> Iterator[Field]:
        return iter(self._fields)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        """Every field and bit-group name, in offset order."""
        out: list[str] = []
        for field in self._fields:
            out.append(field.name)
            out.extend(g.name for g in field.groups if g.name != field.name)
        return out

    def get(self, name: str) -> Field | BitGroup | None:
        """The field or bit group called ``name``, or ``None``."""
        return self._by_name.get(name)

    def field_at(self, offset: int) -> Field | None:
        """The field covering byte ``offset``, or ``None`` when it is unlisted."""
        if not 0 <= offset < self.size:
            return None
        index = self._owner[offset]
        return None if index == -1 else self._fields[index]

    def fields_in(self, offset: int, size: int) -> list[Field | None]:
        """The fields an access touches, in order; ``None`` stands for a run of unlisted bytes."""
        out: list[Field | None] = []
        previous = -2
        for byte in range(max(offset, 0), min(offset + size, self.size)):
            index = self._owner[byte]
            if index != previous:
                out.append(None if index == -1 else self._fields[index])
            previous = index
        return out

    def device_read_mask(self, offset: int, size: int) -> int:
        """Bits of ``[offset, offset+size)`` that come from the device on a read."""
        return int.from_bytes(self._device_mask[offset : offset + size], "little")

    def virtual_read_mask(self, offset: int, size: int) -> int:
        """Bits of ``[offset, offset+size)`` that come from the virtual state on a read."""
        return int.from_bytes(self._virtual_mask[offset : offset + size], "little")


def _check(table: FieldTable, offset: int, size: int, virtual: bytes | bytearray) -> None:
    if size <= 0 or offset < 0 or offset + size > table.size:
        raise ConfigAccessError(
            f"access at offset {offset:#x} size {size} is outside the {table.size:#x}-byte table"
        )
    if len(virtual) < table.size:
        raise ConfigAccessError(
            f"virtual state is {len(virtual)} bytes but the table covers {table.size}"
        )


def apply_read(
    table: FieldTable, offset: int, size: int, device_value: int, virtual: bytes | bytearray
) -> int:
    """The value a guest reads: device bits, virtual bits and zeros, composed per bit.

    ``device_value`` is the device's little-endian value over the same bytes;
    ``virtual`` is the whole virtual-state image (indexed by config offset).
    """
    _check(table, offset, size, virtual)
    virtual_value = int.from_bytes(virtual[offset : offset + size], "little")
    return (device_value & table.device_read_mask(offset, size)) | (
        virtual_value & table.virtual_read_mask(offset, size)
    )


def _segments(
    table: FieldTable, offset: int, size: int
) -> Iterator[tuple[int, int, tuple[BitGroup, ...], int]]:
    """``(start, end, groups, shift)`` per touched field; shift maps access bits to field bits."""
    byte = offset
    end = offset + size
    while byte < end:
        field = table.field_at(byte)
        if field is None:
            stop = byte + 1
            while stop < end and table.field_at(stop) is None:
                stop += 1
            # Unlisted bytes act as one 8-bit group per byte; present them together.
            yield byte, stop, (table.unlisted,), -1
            byte = stop
        else:
            stop = min(end, field.end)
            yield byte, stop, field.groups, field.offset
            byte = stop


def _group_mask(group: BitGroup, field_offset: int, start: int, end: int, offset: int) -> int:
    """The group's bits restricted to ``[start, end)``, positioned in the access value."""
    span = ((1 << (8 * (end - start))) - 1) << (8 * (start - offset))
    if field_offset == -1:  # unlisted: the group covers every bit of the run
        return span
    shift = 8 * (field_offset - offset)
    positioned = group.mask << shift if shift >= 0 else group.mask >> -shift
    return positioned & span


def apply_write(
    table: FieldTable,
    offset: int,
    size: int,
    value: int,
    device_value: int,
    virtual: bytes | bytearray,
) -> WritePlan:
    """Check a guest write against ``table`` and plan its effects (see the module doc).

    Raises :class:`AccessDeniedError` naming the rule when the write is refused;
    nothing is applied in that case. ``device_value`` is the device's current
    value over the same bytes (used for read-modify-write and change checks).
    """
    _check(table, offset, size, virtual)
    if not 0 <= value < (1 << (8 * size)):
        raise ConfigAccessError(
            f"value {value:#x} does not fit in {size} byte(s)", code=ErrorCode.INVALID_SIZE
        )
    visible = apply_read(table, offset, size, device_value, virtual)
    rw_mask = rw1c_mask = all_rw1c = emulated_mask = 0

    for start, end, groups, field_offset in _segments(table, offset, size):
        touched = [(g, _group_mask(g, field_offset, start, end, offset)) for g in groups]
        touched = [(g, m) for g, m in touched if m]
        if not any(g.allowed for g, _ in touched):
            field = table.field_at(start)
            rule = field.name if field is not None else UNLISTED
            if len(touched) == 1:
                rule = touched[0][0].name
            raise AccessDeniedError(
                offset=offset,
                size=size,
                value=value,
                rule=rule,
                reason="the guest may not write this register",
            )
        for group, mask in touched:
            if group.access is Access.RW1C:
                all_rw1c |= mask
            if not group.allowed:
                if group.access is Access.RW1C:
                    changes = value & visible & mask
                else:
                    changes = (value ^ visible) & mask
                if changes:
                    raise AccessDeniedError(
                        offset=offset,
                        size=size,
                        value=value,
                        rule=group.name,
                        reason=f"the guest may not change bits {changes:#x} of this access",
                    )
                continue
            if group.access is Access.RW:
                rw_mask |= mask
            elif group.access is Access.RW1C:
                rw1c_mask |= mask
            elif group.access is Access.EMULATED:
                emulated_mask |= mask

    device_writes: tuple[DeviceWrite, ...] = ()
    # RW1C bits are device-bound only where a 1 is written: writing 0 changes nothing.
    bound = rw_mask | (rw1c_mask & value)
    if bound:
        # Keep every non-bound bit at the device's value, except RW1C bits we are
        # not clearing: those must be written as 0 or the write would clear them.
        merged = (device_value & ~bound & ~all_rw1c) | (value & rw_mask) | (value & rw1c_mask)
        device_writes = tuple(_chunks(offset, size, bound, merged))
    return WritePlan(offset, size, device_writes, emulated_mask, value & emulated_mask)


def _chunks(offset: int, size: int, bound: int, merged: int) -> Iterator[DeviceWrite]:
    """Aligned 1/2/4-byte writes covering exactly the runs of bytes that hold ``bound`` bits."""
    needed = [bool((bound >> (8 * i)) & 0xFF) for i in range(size)]
    i = 0
    while i < size:
        if not needed[i]:
            i += 1
            continue
        absolute = offset + i
        for width in (4, 2, 1):
            if absolute % width == 0 and i + width <= size and all(needed[i : i + width]):
                part = (merged >> (8 * i)) & ((1 << (8 * width)) - 1)
                yield DeviceWrite(absolute, width, part)
                i += width
                break
