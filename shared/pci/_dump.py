"""Reading and writing ``lspci -x`` / ``-xxx`` / ``-xxxx`` dumps.

lspci prints, for each device::

    00:14.0 USB controller: Intel Corporation 200 Series ...
    00: 86 80 af a2 06 04 90 02 00 30 03 0c 00 00 80 00
    ...
    f0: 00 00 00 00 00 00 00 00 b3 0f 00 08 00 00 00 00
    100: 01 00 01 14 ...        (4096-byte dumps; 3-digit offsets from 0x100)

    (blank line)

The header line is kept verbatim: lspci renders it from ``pci.ids`` and the
flags it was given, and a dump must round-trip byte for byte. Lines that
``lspci -v``/``-vv``/``-vvv`` print between the header and the hex lines
(they start with a tab) are kept verbatim too, so ``lspci -vvvxxxx`` logs load
and round-trip as well.

The parser is strict about structure, because a dump that silently loses a
line would give a snapshot device the wrong registers: offsets must be
contiguous from 0, each line holds exactly 16 bytes, and a device holds 64,
256 or 4096 bytes. Hex digits may be upper or lower case; the writer prints
lowercase, as lspci does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import AddressError, DumpFormatError
from shared.pci._address import PciAddress
from shared.pci._config import CONFIG_SIZES, ConfigSpace

__all__ = ["DumpEntry", "parse_dump", "format_dump", "format_hex_lines"]

_BYTES_PER_LINE = 16
_MAX_SIZE = max(CONFIG_SIZES)
#: Sizes a dump entry can hold: the config sizes, plus the 128 bytes ``lspci -x``
#: prints for a CardBus bridge (its header is longer than 64 bytes).
DUMP_SIZES = (64, 128, 256, 4096)
_HEADER = re.compile(
    r"^(?P<address>(?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])(?: |$)"
)
_HEX_LINE = re.compile(r"^(?P<offset>[0-9a-fA-F]{1,8}):(?P<rest>.*)$")
_HEX_BYTE = re.compile(r"^[0-9a-fA-F]{2}$")


@dataclass(frozen=True, slots=True)
class DumpEntry:
    """One device of a dump.

    ``header`` is the verbatim first line (``00:14.0 USB controller: ...``),
    ``address`` its parsed address, ``data`` the 64, 256 or 4096 config bytes
    and ``details`` any verbatim ``lspci -v`` lines between header and hex.
    """

    header: str
    address: PciAddress
    data: bytes
    details: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.data) not in DUMP_SIZES:
            raise DumpFormatError(
                f"device {self.address} has {len(self.data)} bytes of config; a dump entry "
                f"holds {', '.join(map(str, DUMP_SIZES))} bytes"
            )
        if len(self.data) == 128 and self.data[0x0E] & 0x7F != 2:
            raise DumpFormatError(
                f"device {self.address} has 128 bytes of config, which lspci -x prints only for "
                f"CardBus bridges (header type 2), but its header type is {self.data[0x0E]:#04x}"
            )
        if "\n" in self.header or any("\n" in line for line in self.details):
            raise DumpFormatError(
                f"device {self.address}: header and detail lines must not contain newlines"
            )
        match = _HEADER.match(self.header)
        try:
            named = PciAddress.parse(match["address"]) if match else None
        except AddressError as exc:
            raise DumpFormatError(f"header line {self.header!r}: {exc}") from exc
        if named != self.address:
            raise DumpFormatError(
                f"header line {self.header!r} must start with the device's address "
                f"({self.address.lspci_name()} or {self.address})"
            )

    @classmethod
    def for_device(
        cls,
        address: PciAddress,
        description: str,
        data: bytes,
        *,
        show_domain: bool | None = None,
    ) -> DumpEntry:
        """Build an entry with lspci's header: ``<slot> <description>``.

        lspci prints the domain only when some device has a non-zero one;
        ``show_domain`` forces either form (default: domain when non-zero).
        """
        if show_domain is None:
            show_domain = address.domain != 0
        name = str(address) if show_domain else address.slot
        header = f"{name} {description}" if description else name
        return cls(header, address, bytes(data))

    def config_space(self) -> ConfigSpace:
        """A fresh, mutable :class:`ConfigSpace` holding this entry's bytes.

        A 128-byte CardBus ``-x`` dump is padded to 256 bytes with zeros (the rest of
        conventional config space was not captured).
        """
        data = self.data if len(self.data) != 128 else self.data + bytes(128)
        return ConfigSpace(data)


def format_hex_lines(data: bytes | bytearray | memoryview) -> str:
    """lspci's hex lines for ``data``, each ending in a newline.

    ``data`` must be a whole number of 16-byte lines, at most 4096 bytes.
    Offsets below 0x100 print with two hex digits, the rest with three.
    """
    raw = bytes(data)
    if len(raw) % _BYTES_PER_LINE or len(raw) > _MAX_SIZE:
        raise DumpFormatError(
            f"cannot print {len(raw)} bytes as lspci hex lines: the length must be a "
            f"multiple of 16 and at most {_MAX_SIZE}"
        )
    out: list[str] = []
    for offset in range(0, len(raw), _BYTES_PER_LINE):
        chunk = raw[offset : offset + _BYTES_PER_LINE]
        out.append(f"{offset:02x}: {' '.join(f'{b:02x}' for b in chunk)}\n")
    return "".join(out)


def format_dump(entries: Iterable[DumpEntry]) -> str:
    """Render entries exactly as lspci prints them (blank line after each device)."""
    parts: list[str] = []
    for entry in entries:
        parts.append(entry.header + "\n")
        parts.extend(line + "\n" for line in entry.details)
        parts.append(format_hex_lines(entry.data))
        parts.append("\n")
    return "".join(parts)


class _Builder:
    """Accumulates one device while the parser reads its lines."""

    def __init__(self, header: str, address: PciAddress, line_no: int) -> None:
        self.header = header
        self.address = address
        self.line_no = line_no
        self.details: list[str] = []
        self.data = bytearray()

    def finish(self, end_line: int) -> DumpEntry:
        size = len(self.data)
        if size == 0:
            raise DumpFormatError(
                f"line {self.line_no}: device {self.address.lspci_name()} has no hex lines; "
                "dump it with lspci -x, -xxx or -xxxx"
            )
        if size not in DUMP_SIZES:
            raise DumpFormatError(
                f"line {end_line}: device {self.address.lspci_name()} (line {self.line_no}) "
                f"ends after {size} bytes (last offset {size - _BYTES_PER_LINE:#x}); a dump "
                f"holds {', '.join(map(str, DUMP_SIZES))} bytes, so lines are missing or extra"
            )
        return DumpEntry(self.header, self.address, bytes(self.data), tuple(self.details))


def _parse_hex_line(line_no: int, match: re.Match[str], expected: int) -> bytes:
    offset_text = match["offset"]
    offset = int(offset_text, 16)
    if offset != expected:
        hint = "a line is missing" if offset > expected else "a line is repeated or out of order"
        raise DumpFormatError(
            f"line {line_no}: expected offset {expected:02x} but found {offset_text} ({hint})"
        )
    rest = match["rest"]
    if not rest.startswith(" "):
        raise DumpFormatError(
            f"line {line_no}: expected a space after '{offset_text}:' (lspci prints 'XX: ')"
        )
    tokens = rest[1:].rstrip(" \t\r").split(" ")
    if len(tokens) != _BYTES_PER_LINE:
        raise DumpFormatError(
            f"line {line_no}: offset {offset_text} holds {len(tokens)} space-separated "
            f"fields, expected 16 hex bytes"
        )
    for token in tokens:
        if not _HEX_BYTE.match(token):
            raise DumpFormatError(
                f"line {line_no}: {token!r} is not a hex byte (two hex digits) at offset "
                f"{offset_text}"
            )
    return bytes(int(token, 16) for token in tokens)


def parse_dump(text: str) -> list[DumpEntry]:
    """Parse an lspci dump holding one or more devices.

    Devices are separated by blank lines (a header line right after hex lines
    also starts a new device). Raises :class:`DumpFormatError` naming the
    (1-based) line and the problem. Text with no device at all yields ``[]``.
    """
    if not isinstance(text, str):
        raise DumpFormatError(f"a dump must be text (str), not {type(text).__name__}")
    entries: list[DumpEntry] = []
    current: _Builder | None = None
    lines = text.split("\n")
    for line_no, raw_line in enumerate(lines, start=1):
        line = raw_line.rstrip("\r")
        if not line.strip():
            if current is not None:
                entries.append(current.finish(line_no))
                current = None
            continue
        # Check for a header first: "00:14.0 ..." would also match the hex-line pattern.
        header_match = _HEADER.match(line)
        hex_match = None if header_match else _HEX_LINE.match(line)
        if current is not None and hex_match is not None:
            if len(current.data) >= _MAX_SIZE:
                raise DumpFormatError(
                    f"line {line_no}: device {current.address.lspci_name()} already holds "
                    f"{_MAX_SIZE} bytes; config space has no offset {hex_match['offset']}"
                )
            current.data += _parse_hex_line(line_no, hex_match, len(current.data))
            continue
        if current is not None and line.startswith("\t"):
            if current.data:
                raise DumpFormatError(
                    f"line {line_no}: a detail line (starting with a tab) follows the hex "
                    "lines; lspci prints details between the header and the hex lines"
                )
            current.details.append(line)
            continue
        if header_match is None:
            where = "where a device header (BB:DD.F or DDDD:BB:DD.F ...) was expected"
            if current is not None:
                where = "where a hex line ('XX: ' and 16 hex bytes) was expected"
            raise DumpFormatError(f"line {line_no}: unexpected text {line[:60]!r} {where}")
        if current is not None:
            if not current.data:
                raise DumpFormatError(
                    f"line {line_no}: a new device starts but "
                    f"{current.address.lspci_name()} (line {current.line_no}) has no hex lines"
                )
            entries.append(current.finish(line_no))
        try:
            address = PciAddress.parse(header_match["address"])
        except AddressError as exc:
            raise DumpFormatError(f"line {line_no}: bad device address: {exc}") from exc
        current = _Builder(line, address, line_no)
    if current is not None:
        entries.append(current.finish(len(lines)))
    return entries
