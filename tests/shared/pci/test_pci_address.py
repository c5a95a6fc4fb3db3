"""PciAddress: parsing, formatting, packing and validation."""

from __future__ import annotations

import pytest

from shared.errors import AddressError
from shared.pci import PciAddress


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:14.0", PciAddress(0, 0x00, 0x14, 0)),
        ("0000:00:1f.7", PciAddress(0, 0x00, 0x1F, 7)),
        ("0031:01:00.0", PciAddress(0x31, 0x01, 0x00, 0)),
        ("ff:1f.7", PciAddress(0, 0xFF, 0x1F, 7)),
        ("0005:02:00.0", PciAddress(5, 2, 0, 0)),
        ("  1c:03.4  ", PciAddress(0, 0x1C, 3, 4)),
        ("ABCD:EF:1A.3", PciAddress(0xABCD, 0xEF, 0x1A, 3)),
        ("10000:00:00.0", PciAddress(0x10000, 0, 0, 0)),
    ],
)
def test_parse_accepts_short_and_full_forms(text: str, expected: PciAddress) -> None:
    assert PciAddress.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "00:14",
        "00:14.8",
        "00:20.0",  # device is 5 bits
        "100:00.0",  # bus is 8 bits
        "g0:00.0",
        "0000:00:00:00.0",
        "00.14.0",
        "123456789:00:00.0",
        "00:14.0 extra",
    ],
)
def test_parse_rejects_malformed_text(text: str) -> None:
    with pytest.raises(AddressError) as info:
        PciAddress.parse(text)
    assert "DDDD:BB:DD.F" in str(info.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        PciAddress.parse(0x14)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        (0, 256, 0, 0),
        (0, 0, 32, 0),
        (0, 0, 0, 8),
        (-1, 0, 0, 0),
        (1 << 32, 0, 0, 0),
        (0, True, 0, 0),
    ],
)
def test_constructor_validates_ranges(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(AddressError, match="out of range"):
        PciAddress(*fields)


def test_address_errors_are_value_errors_for_callers_that_expect_them() -> None:
    with pytest.raises(ValueError):
        PciAddress.parse("nonsense")


def test_formatting() -> None:
    addr = PciAddress(0x31, 0x01, 0x1C, 4)
    assert str(addr) == "0031:01:1c.4"
    assert addr.slot == "01:1c.4"
    assert addr.lspci_name() == "0031:01:1c.4"
    assert PciAddress(0, 0, 0x14, 0).lspci_name() == "00:14.0"
    assert PciAddress.parse(str(addr)) == addr


def test_devfn() -> None:
    assert PciAddress(0, 0, 0x1F, 7).devfn == 0xFF
    assert PciAddress(0, 0, 0x03, 4).devfn == 0x1C
    assert PciAddress(0, 0, 0, 0).devfn == 0


def test_pack_and_unpack_round_trip() -> None:
    addr = PciAddress(0x0005, 0x02, 0x1D, 7)
    packed = addr.pack()
    assert packed == 0x0005_02EF
    assert PciAddress.unpack(packed) == addr
    assert PciAddress.unpack(0xFFFF_FFFF) == PciAddress(0xFFFF, 0xFF, 0x1F, 7)


def test_pack_rejects_domains_wider_than_the_wire_form() -> None:
    with pytest.raises(AddressError, match="16-bit"):
        PciAddress(0x10000, 0, 0, 0).pack()


@pytest.mark.parametrize("value", [-1, 1 << 32, True, "5"])
def test_unpack_rejects_non_u32(value: object) -> None:
    with pytest.raises(AddressError, match="u32"):
        PciAddress.unpack(value)  # type: ignore[arg-type]


def test_addresses_order_by_domain_bus_device_function() -> None:
    addrs = [PciAddress.parse(t) for t in ("0001:00:00.0", "00:1f.0", "00:01.1", "00:01.0")]
    assert [str(a) for a in sorted(addrs)] == [
        "0000:00:01.0",
        "0000:00:01.1",
        "0000:00:1f.0",
        "0001:00:00.0",
    ]
