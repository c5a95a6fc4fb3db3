"""Capability lists: walking (robust against any bytes), building and unlinking.

Two lists live in config space:

* the **standard** list, anchored at the capability pointer (0x34; 0x14 on a
  CardBus bridge) when ``Status.CAP_LIST`` is set. Each entry is
  ``id:8, next:8``; the low two bits of every pointer are reserved and masked.
* the **extended** list of PCIe, anchored at 0x100 in a 4096-byte space. Each
  header is ``id:16, version:4, next:12``. A header of 0 or 0xffffffff at 0x100
  means "no extended capabilities".

The walker is the part that faces hostile input (a guest's virtual copy, a
snapshot someone sent, a confused device), so it never raises and never
loops: every pointer is checked before it is followed, visited offsets are
remembered, and the first problem ends that list with a human-readable entry
in :attr:`CapabilityWalk.problems`. Reserved pointer bits are masked, as Linux
and lspci do, and reported without ending the walk.

Capability ID 0 is the *Null capability* (PCI Code and ID Assignment spec); it
is a real entry in the chain, and lspci lists it as ``Null``, so walks include
it. :func:`unlink_capability` relies on that (see there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shared.errors import CapabilityError
from shared.pci._config import ConfigSpace
from shared.pci._constants import CAP_POINTER_MASK, EXT_CAP_START, CapId, ExtCapId, Reg, Status

__all__ = [
    "Capability",
    "CapabilityWalk",
    "CapabilityBuilder",
    "ConfigImage",
    "walk_capabilities",
    "find_capability",
    "find_extended_capability",
    "unlink_capability",
    "capability_pointer_offset",
    "ext_cap_header",
    "split_ext_cap_header",
    "STD_CAP_START",
]

#: Anything the walker accepts as a config image.
ConfigImage = bytes | bytearray | memoryview | ConfigSpace

#: Standard capabilities live above the 64-byte header.
STD_CAP_START = 0x40
#: Where a CardBus bridge (header type 2) keeps its capability pointer.
_CARDBUS_CAP_POINTER = 0x14
_HEADER_TYPE_LAYOUT_MASK = 0x7F
_EXT_NEXT_SHIFT = 20
_EXT_VERSION_SHIFT = 16
_EXT_EMPTY = (0x0000_0000, 0xFFFF_FFFF)
#: A standard capability ID of 0xff is what an absent/unreadable area reads as.
_STD_ID_BROKEN = 0xFF


@dataclass(frozen=True, slots=True)
class Capability:
    """One entry of a capability list.

    ``next`` is the (masked) pointer to the following entry, 0 at the end.
    ``version`` is the 4-bit version of an extended capability and 0 for a
    standard one.
    """

    id: int
    offset: int
    extended: bool = False
    version: int = 0
    next: int = 0

    @property
    def name(self) -> str:
        """A short symbolic name (``"MSI"``, ``"ERR"``), or the ID in hex when unknown."""
        enum_type: type[CapId] | type[ExtCapId] = ExtCapId if self.extended else CapId
        if self.id == 0:
            return "NULL"
        try:
            return enum_type(self.id).name
        except ValueError:
            return f"{self.id:#x}"

    def __str__(self) -> str:
        where = f"[{self.offset:03x} v{self.version}]" if self.extended else f"[{self.offset:02x}]"
        return f"{where} {self.name}"


@dataclass(frozen=True, slots=True)
class CapabilityWalk:
    """The result of :func:`walk_capabilities`.

    ``problems`` is empty for a well-formed image. Each problem names the
    offset concerned and says whether the walk stopped there.
    """

    standard: tuple[Capability, ...]
    extended: tuple[Capability, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when both lists were walked without any problem."""
        return not self.problems

    def __iter__(self) -> Iterator[Capability]:
        """Iterate standard then extended capabilities."""
        yield from self.standard
        yield from self.extended

    def find(self, cap_id: int, *, extended: bool = False) -> Capability | None:
        """The first capability with ``cap_id`` in the chosen list, or ``None``."""
        for cap in self.extended if extended else self.standard:
            if cap.id == cap_id:
                return cap
        return None

    def find_all(self, cap_id: int, *, extended: bool = False) -> tuple[Capability, ...]:
        """Every capability with ``cap_id`` (vendor-specific ones often repeat)."""
        return tuple(c for c in (self.extended if extended else self.standard) if c.id == cap_id)


def _image_bytes(data: ConfigImage) -> bytes:
    if isinstance(data, ConfigSpace):
        return bytes(data)
    return bytes(data)


def capability_pointer_offset(header_type: int) -> int:
    """Offset of the standard capability pointer for a header-type byte.

    0x34 for type 0 (endpoint) and type 1 (bridge), 0x14 for type 2 (CardBus).
    The multi-function bit (0x80) is ignored.
    """
    return (
        _CARDBUS_CAP_POINTER if header_type & _HEADER_TYPE_LAYOUT_MASK == 2 else Reg.CAPABILITY_LIST
    )


def ext_cap_header(cap_id: int, version: int, next_offset: int) -> int:
    """Pack an extended-capability header ``id:16 | version:4 | next:12``."""
    if not 0 <= cap_id <= 0xFFFF:
        raise CapabilityError(f"extended capability ID {cap_id:#x} does not fit 16 bits")
    if not 0 <= version <= 0xF:
        raise CapabilityError(f"extended capability version {version} does not fit 4 bits (0-15)")
    if not 0 <= next_offset <= 0xFFC or next_offset % 4:
        raise CapabilityError(
            f"extended next pointer {next_offset:#x} must be a dword-aligned offset below 0x1000"
        )
    return cap_id | (version << _EXT_VERSION_SHIFT) | (next_offset << _EXT_NEXT_SHIFT)


def split_ext_cap_header(header: int) -> tuple[int, int, int]:
    """Unpack an extended-capability header into ``(id, version, raw next)``."""
    return (
        header & 0xFFFF,
        (header >> _EXT_VERSION_SHIFT) & 0xF,
        (header >> _EXT_NEXT_SHIFT) & 0xFFF,
    )


def _walk_standard(raw: bytes, problems: list[str]) -> list[Capability]:
    size = len(raw)
    if size < STD_CAP_START:
        problems.append(
            f"the image holds only {size} bytes, less than the 64-byte header; "
            "no capability list can be read"
        )
        return []
    status = int.from_bytes(raw[Reg.STATUS : Reg.STATUS + 2], "little")
    if not status & Status.CAP_LIST:
        return []
    anchor = capability_pointer_offset(raw[Reg.HEADER_TYPE])
    caps: list[Capability] = []
    seen: set[int] = set()
    where = anchor
    pointer = raw[anchor]
    while True:
        if pointer & ~CAP_POINTER_MASK:
            problems.append(
                f"capability pointer {pointer:#04x} at {where:#04x} is not dword aligned; "
                f"its reserved low bits are ignored (using {pointer & CAP_POINTER_MASK:#04x})"
            )
            pointer &= CAP_POINTER_MASK
        if pointer == 0:
            return caps
        if pointer < STD_CAP_START:
            problems.append(
                f"capability pointer {pointer:#04x} at {where:#04x} points into the 64-byte "
                "header; the standard list stops there"
            )
            return caps
        if pointer + 2 > size:
            problems.append(
                f"capability pointer {pointer:#04x} at {where:#04x} is out of range of the "
                f"{size}-byte image; the standard list stops there"
            )
            return caps
        if pointer in seen:
            problems.append(
                f"loop detected at offset {pointer:#04x}: the pointer at {where:#04x} leads "
                "back to a capability already listed; the standard list stops there"
            )
            return caps
        seen.add(pointer)
        cap_id = raw[pointer]
        if cap_id == _STD_ID_BROKEN:
            problems.append(
                f"capability at {pointer:#04x} has ID 0xff (what an absent register reads as); "
                "the chain is broken and the standard list stops there"
            )
            return caps
        where = pointer + 1
        nxt = raw[where]
        caps.append(Capability(cap_id, pointer, False, 0, nxt & CAP_POINTER_MASK))
        pointer = nxt


def _walk_extended(raw: bytes, problems: list[str]) -> list[Capability]:
    size = len(raw)
    if size < EXT_CAP_START + 4:
        return []
    caps: list[Capability] = []
    seen: set[int] = set()
    offset = EXT_CAP_START
    where = -1  # the offset of the header whose next pointer brought us here
    while True:
        header = int.from_bytes(raw[offset : offset + 4], "little")
        if header in _EXT_EMPTY:
            if where >= 0:
                problems.append(
                    f"extended next pointer at {where:#05x} leads to an empty header "
                    f"({header:#010x}) at {offset:#05x}; the extended list stops there"
                )
            return caps
        seen.add(offset)
        cap_id, version, nxt = split_ext_cap_header(header)
        if nxt & 0x3:
            problems.append(
                f"extended next pointer {nxt:#05x} at {offset:#05x} is misaligned; its reserved "
                f"low bits are ignored (using {nxt & ~0x3:#05x})"
            )
            nxt &= ~0x3
        caps.append(Capability(cap_id, offset, True, version, nxt))
        if nxt == 0:
            return caps
        if nxt < EXT_CAP_START:
            problems.append(
                f"extended next pointer {nxt:#05x} at {offset:#05x} points below 0x100 into "
                "conventional config space; the extended list stops there"
            )
            return caps
        if nxt + 4 > size:
            problems.append(
                f"extended next pointer {nxt:#05x} at {offset:#05x} is out of range of the "
                f"{size}-byte image; the extended list stops there"
            )
            return caps
        if nxt in seen:
            problems.append(
                f"loop detected at offset {nxt:#05x}: the next pointer at {offset:#05x} leads "
                "back to a capability already listed; the extended list stops there"
            )
            return caps
        where, offset = offset, nxt


def walk_capabilities(data: ConfigImage) -> CapabilityWalk:
    """Walk the standard and extended capability lists of a config image.

    Never raises and never loops, whatever the bytes: a malformed list ends at
    the first bad pointer and the reason is recorded in ``problems``.
    """
    raw = _image_bytes(data)
    problems: list[str] = []
    standard = _walk_standard(raw, problems)
    extended = _walk_extended(raw, problems)
    return CapabilityWalk(tuple(standard), tuple(extended), tuple(problems))


def find_capability(data: ConfigImage, cap_id: int) -> Capability | None:
    """The first standard capability with ``cap_id``, or ``None``."""
    return walk_capabilities(data).find(cap_id)


def find_extended_capability(data: ConfigImage, cap_id: int) -> Capability | None:
    """The first extended capability with ``cap_id``, or ``None``."""
    return walk_capabilities(data).find(cap_id, extended=True)


def unlink_capability(space: ConfigSpace, cap: Capability) -> None:
    """Remove ``cap`` from its list in ``space`` by rewriting one pointer.

    Meant for a guest's *virtual* copy of config space: the capability's body
    bytes stay where they are (hide them with the policy if they must not be
    read directly), but no walk finds it any more.

    * A standard capability: the previous entry's next byte, or the capability
      pointer (0x34/0x14) for the first one, takes the offset of the entry that
      followed ``cap`` in the walk (0 if none). When the list becomes empty,
      ``Status.CAP_LIST`` is cleared as well.
    * An extended capability after the first: the previous header's next field
      takes the following entry's offset; its ID and version are kept.
    * The first extended capability, at 0x100: the extended list must start at
      0x100, so that header is replaced by a **Null capability** (ID 0,
      version 0) whose next pointer skips ``cap``; if ``cap`` was the only one,
      the header becomes 0 ("no extended capabilities"). We do not copy the
      next capability's header into 0x100 instead: a walker would then find
      that capability at 0x100 and read its registers from ``cap``'s body.
      lspci shows the result as ``Capabilities: [100 v0] Null``.

    On a malformed chain (``walk.ok`` false) another entry's pointer may still
    lead to ``cap``; the policy should only filter lists that walk cleanly, or
    check the walk again afterwards.

    Raises :class:`CapabilityError` when ``cap`` is not in the list (walked now,
    matched by offset, kind and ID), or when asked to remove the Null header at
    0x100, which anchors the extended list and cannot be removed.
    """
    walk = walk_capabilities(space)
    chain = walk.extended if cap.extended else walk.standard
    index = next(
        (i for i, c in enumerate(chain) if c.offset == cap.offset and c.id == cap.id), None
    )
    if index is None:
        kind = "extended" if cap.extended else "standard"
        raise CapabilityError(
            f"capability {cap.id:#x} at {cap.offset:#x} is not in the {kind} list of this "
            "config space; walk the space again and pass a capability from that walk"
        )
    current = chain[index]
    # Link to what the walk actually followed, not to the raw next pointer: when
    # ``cap`` is the last entry of a malformed chain (its pointer loops or leaves
    # the space), the rewritten list simply ends, so unlinking also cleans it up.
    successor = chain[index + 1].offset if index + 1 < len(chain) else 0
    if not cap.extended:
        if index == 0:
            anchor = capability_pointer_offset(space.read(Reg.HEADER_TYPE, 1))
            space.write(anchor, 1, successor)
            if successor == 0:
                status = space.read(Reg.STATUS, 2)
                space.write(Reg.STATUS, 2, status & ~Status.CAP_LIST & 0xFFFF)
        else:
            space.write(chain[index - 1].offset + 1, 1, successor)
        return
    if index == 0:
        if current.id == 0 and current.version == 0:
            raise CapabilityError(
                "the Null capability at 0x100 anchors the extended list and cannot be unlinked"
            )
        header = ext_cap_header(0, 0, successor) if successor else 0
        space.write(EXT_CAP_START, 4, header)
        return
    prev = chain[index - 1]
    space.write(prev.offset, 4, ext_cap_header(prev.id, prev.version, successor))


def _align4(value: int) -> int:
    return (value + 3) & ~3


class CapabilityBuilder:
    """Lays out capability lists in a fresh config image, for emulated devices.

    Standard capabilities go from 0x40 upward and extended ones from 0x100
    upward, each dword aligned, in the order they are added; the list pointers
    (0x34 or the previous next byte, and the extended headers) and
    ``Status.CAP_LIST`` are kept linked after every call. The builder assumes
    it owns the capability areas of ``space``: it does not look for existing
    capabilities.

    >>> space = ConfigSpace(4096)
    >>> b = CapabilityBuilder(space)
    >>> b.add(CapId.PM, bytes(6))
    64
    >>> b.add_extended(ExtCapId.ERR, bytes(0x44), version=2)
    256
    """

    def __init__(self, space: ConfigSpace) -> None:
        self._space = space
        self._std_free = STD_CAP_START
        self._ext_free = EXT_CAP_START
        self._std_last: int | None = None
        self._ext_last: Capability | None = None
        self._added: list[Capability] = []

    @property
    def space(self) -> ConfigSpace:
        """The image being built."""
        return self._space

    @property
    def capabilities(self) -> tuple[Capability, ...]:
        """Everything added so far, in order (``next`` as it was when added)."""
        return tuple(self._added)

    def add(
        self,
        cap_id: int,
        body: bytes = b"",
        *,
        length: int | None = None,
        offset: int | None = None,
    ) -> int:
        """Append a standard capability and return its offset.

        ``body`` is what follows the 2-byte ``id, next`` header. ``length`` is
        the total size to reserve (header included; default ``2 + len(body)``),
        for capabilities whose registers start zeroed. ``offset`` places it
        explicitly: dword aligned, at or after the previous capability's end.
        """
        if not 0 <= cap_id <= 0xFE:
            raise CapabilityError(
                f"standard capability ID {cap_id:#x} is invalid; use 0x00-0xfe (0xff reads as "
                "a broken chain)"
            )
        total = self._length(2, body, length)
        start = self._place(offset, self._std_free, "standard")
        limit = min(self._space.size, EXT_CAP_START)
        if start + total > limit:
            raise CapabilityError(
                f"standard capability {cap_id:#x} of {total} bytes at {start:#x} does not fit "
                f"below {limit:#x}; shrink it or place capabilities more tightly"
            )
        self._space.write_bytes(start, bytes([cap_id, 0]) + body + bytes(total - 2 - len(body)))
        if self._std_last is None:
            anchor = capability_pointer_offset(self._space.read(Reg.HEADER_TYPE, 1))
            self._space.write(anchor, 1, start)
            status = self._space.read(Reg.STATUS, 2)
            self._space.write(Reg.STATUS, 2, status | Status.CAP_LIST)
        else:
            self._space.write(self._std_last + 1, 1, start)
        self._std_last = start
        self._std_free = _align4(start + total)
        self._added.append(Capability(cap_id, start, False, 0, 0))
        return start

    def add_extended(
        self,
        cap_id: int,
        body: bytes = b"",
        *,
        version: int = 1,
        length: int | None = None,
        offset: int | None = None,
    ) -> int:
        """Append an extended capability and return its offset.

        ``body`` follows the 4-byte header. The first extended capability
        must be at 0x100. The image must be 4096 bytes.
        """
        if self._space.size <= EXT_CAP_START:
            raise CapabilityError(
                f"extended capabilities need a 4096-byte config space, this one has "
                f"{self._space.size} bytes"
            )
        total = self._length(4, body, length)
        start = self._place(offset, self._ext_free, "extended")
        if self._ext_last is None and start != EXT_CAP_START:
            raise CapabilityError(
                f"the first extended capability must be at 0x100, not {start:#x}: the list "
                "is anchored there"
            )
        if start + total > self._space.size:
            raise CapabilityError(
                f"extended capability {cap_id:#x} of {total} bytes at {start:#x} does not fit "
                f"in the {self._space.size}-byte space"
            )
        header = ext_cap_header(cap_id, version, 0)
        self._space.write_bytes(
            start, header.to_bytes(4, "little") + body + bytes(total - 4 - len(body))
        )
        if self._ext_last is not None:
            prev = self._ext_last
            self._space.write(prev.offset, 4, ext_cap_header(prev.id, prev.version, start))
        cap = Capability(cap_id, start, True, version, 0)
        self._ext_last = cap
        self._ext_free = _align4(start + total)
        self._added.append(cap)
        return start

    @staticmethod
    def _length(header: int, body: bytes, length: int | None) -> int:
        total = header + len(body) if length is None else length
        if total < header + len(body):
            raise CapabilityError(
                f"capability length {total} is smaller than its header and body "
                f"({header + len(body)} bytes)"
            )
        return total

    @staticmethod
    def _place(offset: int | None, free: int, kind: str) -> int:
        if offset is None:
            return free
        if offset % 4:
            raise CapabilityError(f"{kind} capability offset {offset:#x} is not dword aligned")
        if offset < free:
            raise CapabilityError(
                f"{kind} capability offset {offset:#x} overlaps earlier capabilities "
                f"(the next free offset is {free:#x})"
            )
        return offset
