"""PCI addresses: ``DDDD:BB:DD.F`` (and the short form ``BB:DD.F``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import AddressError

__all__ = ["PciAddress"]

_FULL = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<device>[0-9a-fA-F]{1,2})\.(?P<function>[0-7])$"
)


@dataclass(frozen=True, slots=True, order=True)
class PciAddress:
    """A PCI function address. Validated on construction.

    ``domain`` is 0..0xffff (lspci prints 4 hex digits; Linux allows more, and
    so do we up to 32 bits), ``bus`` 0..255, ``device`` 0..31, ``function`` 0..7.
    """

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (
            ("domain", self.domain, 0xFFFF_FFFF),
            ("bus", self.bus, 0xFF),
            ("device", self.device, 0x1F),
            ("function", self.function, 0x7),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise AddressError(
                    f"PCI address {name} {value!r} is out of range 0..{top:#x}; "
                    "use the form DDDD:BB:DD.F with hex fields"
                )

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``DDDD:BB:DD.F`` or ``BB:DD.F`` (domain 0). Hex, case-insensitive."""
        if not isinstance(text, str):
            raise AddressError(f"PCI address must be a string, not {type(text).__name__}")
        match = _FULL.match(text.strip())
        if match is None:
            raise AddressError(
                f"invalid PCI address {text!r}: expected DDDD:BB:DD.F or BB:DD.F "
                "(hex domain, bus, device 00-1f, function 0-7)"
            )
        domain = int(match["domain"], 16) if match["domain"] else 0
        return cls(domain, int(match["bus"], 16), int(match["device"], 16), int(match["function"]))

    @property
    def devfn(self) -> int:
        """The 8-bit device/function number used by config mechanisms."""
        return (self.device << 3) | self.function

    @property
    def slot(self) -> str:
        """The short form ``BB:DD.F``."""
        return f"{self.bus:02x}:{self.device:02x}.{self.function}"

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"

    def pack(self) -> int:
        """Pack into the u32 used on the wire: ``domain<<16 | bus<<8 | devfn``.

        The wire form limits the domain to 16 bits, as lspci's own output does.
        """
        if self.domain > 0xFFFF:
            raise AddressError(f"domain {self.domain:#x} does not fit the 16-bit wire form")
        return (self.domain << 16) | (self.bus << 8) | self.devfn

    @classmethod
    def unpack(cls, value: int) -> PciAddress:
        """Inverse of :meth:`pack`."""
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF_FFFF:
            raise AddressError(f"packed PCI address {value!r} is not a u32")
        return cls(value >> 16, (value >> 8) & 0xFF, (value >> 3) & 0x1F, value & 0x7)

    def lspci_name(self) -> str:
        """The slot as lspci prints it: the domain only when it is not 0."""
        return str(self) if self.domain else self.slot
