"""lspci-compatible text for a list of devices: the pure presentation layer.

Everything here works on config-space images and returns strings; nothing does
I/O. The rules copy pciutils 3.9 (``lspci.c``, ``lib/names.c``,
``lib/filter.c``) and are checked byte for byte against the real ``lspci -F``
in ``tests/pcifront/test_lspci_format.py``. The subtle ones:

* **Domains.** lspci prints ``DDDD:`` in front of *every* slot as soon as *any*
  device on the bus has a non-zero domain, and it decides this before ``-s`` and
  ``-d`` filter devices out (so a hidden device can still switch domains on).
* **Order.** Devices are sorted by domain, bus, device, function; equal
  addresses keep their input order.
* **Names.** The class is the subclass name, else the base-class name followed
  by ``[ccss]`` (even without ``-nn``), else ``Class ccss``. The device is
  ``Vendor Device``, ``Vendor Device dddd`` when only the vendor is known, else
  ``Device vvvv:dddd``. ``-nn`` appends ``[ccss]`` and ``[vvvv:dddd]``, ``-n``
  prints only the numbers. Each of the two texts lives in a 128-byte C buffer:
  a longer one is cut to 124 bytes plus ``...``.
* **Revision.** `` (rev XX)`` only when the revision byte is not zero;
  `` (prog-if XX)`` only with ``-v`` (not supported here, so never).
* **Hex dumps.** ``-x`` shows 64 bytes (128 for a CardBus bridge, header type
  2), ``-xxx`` 256 and ``-xxxx`` 4096, each limited to what the image holds;
  lines are ``OO: bb bb ...`` with the offset in at least two hex digits
  (``100:`` past 0xff), and every dumped device is followed by a blank line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from pcifront.tools.pciids import PciIds
from shared.errors import PciError, UsageError
from shared.pci import PciAddress, format_hex_lines

__all__ = [
    "LspciDevice",
    "LspciOptionError",
    "DeviceFilter",
    "DUMP_SIZES",
    "filter_devices",
    "format_listing",
    "needs_domains",
    "render_lspci",
]

#: Valid ``dump_bytes`` values: none, ``-x``, ``-xxx``, ``-xxxx``.
DUMP_SIZES: Final = (0, 64, 256, 4096)

# lspci formats each name into ``char buf[128]`` with snprintf and marks a cut
# by overwriting the last three characters with dots (names.c).
_NAME_BUFFER: Final = 128
# lib/filter.c copies each -s/-d argument into ``char buf[64]``.
_FILTER_BUFFER: Final = 64
_U32: Final = 0xFFFF_FFFF
_HEX_VALUES: Final = {char: int(char, 16) for char in "0123456789abcdefABCDEF"}
_HEADER_TYPE_CARDBUS: Final = 2
_STANDARD_HEADER: Final = 64


class LspciDevice(Protocol):
    """What the formatter needs from a device: its address and config image.

    ``address`` is a :class:`PciAddress` or its text (``0000:00:00.0``).
    ``config`` is the image as read from the device (64, 256 or 4096 bytes;
    at least the 64-byte standard header); ``None`` (no image fetched) is
    refused with a clear error. IDs, class and revision are taken from the
    image, exactly as ``lspci -F`` does with a dump.
    """

    @property
    def address(self) -> PciAddress | str: ...

    @property
    def config(self) -> bytes | None: ...


_D = TypeVar("_D", bound=LspciDevice)


class LspciOptionError(PciError, UsageError):
    """An lspci option value is invalid (a bad ``-s``/``-d`` selector, ...).

    ``option`` is the switch (``"-s"``), ``reason`` lspci's own words for the
    problem (``"Invalid slot number"``); :attr:`lspci_message` is the line the
    real lspci prints after ``lspci: ``.
    """

    def __init__(self, option: str, value: object, reason: str, hint: str) -> None:
        super().__init__(f"{option} {value!r}: {reason}; {hint}")
        self.option = option
        self.reason = reason

    @property
    def lspci_message(self) -> str:
        return f"{self.option}: {self.reason}"


# --------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class _View:
    """The fields lspci reads from one device, decoded once."""

    address: PciAddress
    config: bytes
    vendor_id: int
    device_id: int
    class_code: int  # 16 bits: base class << 8 | subclass
    prog_if: int
    revision: int


def _view(device: LspciDevice) -> _View:
    address = device.address
    if not isinstance(address, PciAddress):
        address = PciAddress.parse(address)
    image = device.config
    if image is None:
        raise PciError(
            f"device {address} has no config image; take the bus snapshot with the "
            "config images included"
        )
    config = bytes(image)
    if len(config) < _STANDARD_HEADER:
        raise PciError(
            f"device {address}: config image is {len(config)} bytes, but lspci needs at least "
            f"the {_STANDARD_HEADER}-byte standard header; fetch the full image"
        )
    return _View(
        address=address,
        config=config,
        vendor_id=int.from_bytes(config[0:2], "little"),
        device_id=int.from_bytes(config[2:4], "little"),
        class_code=int.from_bytes(config[0x0A:0x0C], "little"),
        prog_if=config[0x09],
        revision=config[0x08],
    )


# ------------------------------------------------------------------- filtering


def _parse_hex_field(
    text: str | None, maximum: int, *, allow_wildcard_digits: bool = False
) -> tuple[int, int] | None:
    """One hex field of a selector, as lib/filter.c reads it.

    Returns ``(value, mask)``; ``(-1, mask)`` for an absent/empty/``*`` field
    (match anything); ``None`` when invalid. With ``allow_wildcard_digits`` an
    ``x`` stands for any hex digit (only the class field allows this). The
    arithmetic is 32-bit unsigned like the C, wrap-around included.
    """
    if not text or text == "*":
        return -1, _U32
    value = 0
    bound = 0  # the largest value the digits so far can stand for
    mask = _U32
    for char in text:
        if char in "xX" and allow_wildcard_digits:
            value = (value << 4) & _U32
            bound = ((bound << 4) | 1) & _U32
            mask = (mask << 4) & _U32
        else:
            digit = _HEX_VALUES.get(char)
            if digit is None:
                return None
            value = ((value << 4) | digit) & _U32
            bound = ((bound << 4) | digit) & _U32
            mask = ((mask << 4) | 0xF) & _U32
        if bound > maximum:
            return None
    return value, mask


def _split_fields(option: str, text: str, separator: str, count: int) -> list[str | None]:
    if len(text.encode()) >= _FILTER_BUFFER:
        raise LspciOptionError(
            option, text, "Expression too long", f"use at most {_FILTER_BUFFER - 1} characters"
        )
    parts = text.split(separator)
    if len(parts) > count:
        raise LspciOptionError(
            option, text, "Too many fields", f"use at most {count} {separator!r}-separated fields"
        )
    return [*parts, *([None] * (count - len(parts)))]


_SLOT_HINT: Final = "the form is [[[[<domain>]:]<bus>]:][<device>][.[<func>]] in hex"
_ID_HINT: Final = "the form is [<vendor>]:[<device>][:<class>[:<prog-if>]] in hex"


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """A parsed ``-s``/``-d`` selection. ``-1`` in a field means "any"."""

    domain: int = -1
    bus: int = -1
    device: int = -1
    function: int = -1
    vendor_id: int = -1
    device_id: int = -1
    class_code: int = -1
    class_mask: int = _U32
    prog_if: int = -1

    @classmethod
    def parse(cls, slot: str | None = None, vendor_device: str | None = None) -> DeviceFilter:
        """Parse lspci's ``-s`` and ``-d`` arguments (``None``: option not given).

        ``-s [[[[<domain>]:]<bus>]:][<device>][.[<func>]]`` and
        ``-d [<vendor>]:[<device>][:<class>[:<prog-if>]]``: hex fields, where an
        empty field or ``*`` matches anything and an ``x`` in the class stands
        for any digit (``-d ::03xx``). Raises :class:`LspciOptionError` with
        lspci's own reason for a bad selector.
        """
        fields: dict[str, int] = {}
        if slot is not None:
            fields.update(_parse_slot(slot))
        if vendor_device is not None:
            fields.update(_parse_ids(vendor_device))
        return cls(**fields)

    def matches(self, device: LspciDevice) -> bool:
        """Whether ``device`` passes this filter (lib/filter.c ``pci_filter_match``)."""
        return self._matches(_view(device))

    def _matches(self, view: _View) -> bool:
        address = view.address
        for wanted, actual in (
            (self.domain, address.domain),
            (self.bus, address.bus),
            (self.device, address.device),
            (self.function, address.function),
            (self.vendor_id, view.vendor_id),
            (self.device_id, view.device_id),
            (self.prog_if, view.prog_if),
        ):
            if wanted >= 0 and wanted != actual:
                return False
        return not (self.class_code >= 0 and (self.class_code ^ view.class_code) & self.class_mask)


def _parse_slot(text: str) -> dict[str, int]:
    option = "-s"
    fields = _split_fields(option, text, ":", 3)
    result: dict[str, int] = {}

    def field(name: str, value: str | None, maximum: int, reason: str) -> None:
        parsed = _parse_hex_field(value, maximum)
        if parsed is None:
            raise LspciOptionError(option, text, reason, _SLOT_HINT)
        if parsed[0] >= 0:
            result[name] = parsed[0]

    index = 0
    if fields[2] is not None:
        field("domain", fields[0], 0x7FFF_FFFF, "Invalid domain number")
        index += 1
    if fields[index + 1] is not None:
        field("bus", fields[index], 0xFF, "Invalid bus number")
        index += 1
    device_function = fields[index]
    if device_function and device_function != "*":
        parts = device_function.split(".")
        if len(parts) > 2:
            raise LspciOptionError(option, text, "Invalid slot/function number", _SLOT_HINT)
        field("device", parts[0], 0x1F, "Invalid slot number")
        field("function", parts[1] if len(parts) > 1 else None, 7, "Invalid function number")
    return result


def _parse_ids(text: str) -> dict[str, int]:
    option = "-d"
    fields = _split_fields(option, text, ":", 4)
    if fields[1] is None:
        raise LspciOptionError(option, text, "At least two fields must be given", _ID_HINT)
    result: dict[str, int] = {}
    for name, value, maximum, reason in (
        ("vendor_id", fields[0], 0xFFFF, "Invalid vendor ID"),
        ("device_id", fields[1], 0xFFFF, "Invalid device ID"),
        ("prog_if", fields[3], 0xFF, "Invalid programming interface code"),
    ):
        parsed = _parse_hex_field(value, maximum)
        if parsed is None:
            raise LspciOptionError(option, text, reason, _ID_HINT)
        if parsed[0] >= 0:
            result[name] = parsed[0]
    parsed = _parse_hex_field(fields[2], 0xFFFF, allow_wildcard_digits=True)
    if parsed is None:
        raise LspciOptionError(option, text, "Invalid class code", _ID_HINT)
    if parsed[0] >= 0:
        result["class_code"], result["class_mask"] = parsed
    return result


def filter_devices(
    devices: Iterable[_D], slot: str | None = None, vendor_device: str | None = None
) -> list[_D]:
    """The devices lspci would show for ``-s slot`` and ``-d vendor_device``.

    ``None`` means the option was not given. Order is kept; raises
    :class:`LspciOptionError` for a bad selector.
    """
    selection = DeviceFilter.parse(slot, vendor_device)
    return [device for device in devices if selection.matches(device)]


# ------------------------------------------------------------------ formatting


def _c_buffer(text: str) -> str:
    """What snprintf into lspci's 128-byte name buffer leaves of ``text``."""
    encoded = text.encode()
    if len(encoded) < _NAME_BUFFER:
        return text
    # A cut inside a multi-byte character would print a broken byte; we drop it.
    return (encoded[: _NAME_BUFFER - 4] + b"...").decode(errors="ignore")


def _class_text(class_code: int, numeric: int, ids: PciIds | None) -> str:
    number = f"{class_code:04x}"
    if numeric == 1:
        return number
    mixed = numeric >= 2
    base, sub = class_code >> 8, class_code & 0xFF
    name = ids.subclass_name(base, sub) if ids is not None else None
    if name is None and ids is not None:
        name = ids.class_name(base)
        # Only the base class is known: lspci always adds the full number.
        mixed = mixed or name is not None
    if name is None:
        name = "Class"
        return _c_buffer(f"{name} [{number}]" if mixed else f"{name} {number}")
    return _c_buffer(f"{name} [{number}]" if mixed else name)


def _device_text(vendor_id: int, device_id: int, numeric: int, ids: PciIds | None) -> str:
    number = f"{vendor_id:04x}:{device_id:04x}"
    if numeric == 1:
        return number
    vendor = ids.vendor_name(vendor_id) if ids is not None else None
    device = ids.device_name(vendor_id, device_id) if ids is not None else None
    if numeric >= 2:
        if vendor is not None and device is not None:
            text = f"{vendor} {device} [{number}]"
        elif vendor is None:
            text = f"Device [{number}]"
        else:
            text = f"{vendor} Device [{number}]"
    elif vendor is not None and device is not None:
        text = f"{vendor} {device}"
    elif vendor is None:
        text = f"Device {number}"
    else:
        text = f"{vendor} Device {device_id:04x}"
    return _c_buffer(text)


def _hex_dump(config: bytes, dump_bytes: int) -> str:
    """The ``-x``/``-xxx``/``-xxxx`` lines for one device (lspci ``show_hex_dump``)."""
    # lspci always holds the standard header, plus the CardBus half when the
    # device is a CardBus bridge; longer dumps need the whole range readable.
    count = _STANDARD_HEADER
    if config[0x0E] & 0x7F == _HEADER_TYPE_CARDBUS and len(config) >= 2 * _STANDARD_HEADER:
        count = 2 * _STANDARD_HEADER
    if dump_bytes >= 256 and len(config) >= 256:
        count = 256
        if dump_bytes >= 4096 and len(config) >= 4096:
            count = 4096
    return format_hex_lines(config[:count])


def needs_domains(devices: Iterable[LspciDevice]) -> bool:
    """Whether lspci would print domains: some device has a non-zero domain."""
    return any(_view(device).address.domain for device in devices)


def _check_options(numeric: int, dump_bytes: int) -> None:
    if isinstance(numeric, bool) or not isinstance(numeric, int) or numeric < 0:
        raise LspciOptionError(
            "-n", numeric, "invalid numeric level", "use 0 (names), 1 (-n) or 2 (-nn)"
        )
    if dump_bytes not in DUMP_SIZES:
        raise LspciOptionError(
            "-x", dump_bytes, "invalid dump size", f"use one of {', '.join(map(str, DUMP_SIZES))}"
        )


def format_listing(
    devices: Iterable[LspciDevice],
    *,
    numeric: int = 0,
    ids: PciIds | None,
    dump_bytes: int = 0,
    show_domains: bool | None = None,
) -> str:
    """The text ``lspci`` prints for ``devices``, byte for byte.

    ``numeric``: 0 for names, 1 for ``-n``, 2 (or more) for ``-nn``. ``ids``:
    the name database, or ``None`` for no names (lspci without a ``pci.ids``).
    ``dump_bytes``: 0, 64 (``-x``), 256 (``-xxx``) or 4096 (``-xxxx``).
    ``show_domains``: ``None`` decides from ``devices`` as lspci does; pass
    :func:`needs_domains` of the *unfiltered* bus when ``devices`` was filtered
    (or use :func:`render_lspci`, which does both). Devices are sorted by
    address. Returns ``""`` for no devices; otherwise every line ends in ``\\n``.
    """
    _check_options(numeric, dump_bytes)
    views = sorted((_view(device) for device in devices), key=lambda view: view.address)
    if show_domains is None:
        show_domains = any(view.address.domain for view in views)
    parts: list[str] = []
    for view in views:
        address = view.address
        slot = f"{address.bus:02x}:{address.device:02x}.{address.function}"
        if show_domains:
            slot = f"{address.domain:04x}:{slot}"
        line = (
            f"{slot} {_class_text(view.class_code, numeric, ids)}: "
            f"{_device_text(view.vendor_id, view.device_id, numeric, ids)}"
        )
        if view.revision:
            line += f" (rev {view.revision:02x})"
        parts.append(f"{line}\n")
        if dump_bytes:
            parts.append(_hex_dump(view.config, dump_bytes))
            parts.append("\n")
    return "".join(parts)


def render_lspci(
    devices: Sequence[LspciDevice],
    *,
    slot: str | None = None,
    vendor_device: str | None = None,
    numeric: int = 0,
    ids: PciIds | None,
    dump_bytes: int = 0,
) -> str:
    """``lspci [-n|-nn] [-s SLOT] [-d ID] [-x|-xxx|-xxxx]`` over a whole bus.

    Filters with :func:`filter_devices` and formats with :func:`format_listing`,
    deciding domains from the whole bus first, as lspci does.
    """
    _check_options(numeric, dump_bytes)
    selected = filter_devices(devices, slot, vendor_device)
    return format_listing(
        selected,
        numeric=numeric,
        ids=ids,
        dump_bytes=dump_bytes,
        show_domains=needs_domains(devices),
    )
