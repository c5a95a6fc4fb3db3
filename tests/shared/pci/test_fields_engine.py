"""The field-table engine: read composition, byte enables, write checks and plans."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigAccessError, ErrorCode
from shared.pci import (
    UNLISTED,
    Access,
    AccessDeniedError,
    BitGroup,
    DeviceWrite,
    Field,
    FieldTable,
    FieldTableError,
    apply_read,
    apply_write,
)

# A small table over 16 bytes:
#   0x0 "ctl"  (2 bytes): bits 0-3 RW, bits 4-7 EMULATED, byte 1 RO (ignored on write)
#   0x2 "sts"  (2 bytes): bits 8-15 RW1C, the rest RO (ignored)
#   0x4 "id"   (2 bytes): RO, denied
#   0x6 "virt" (1 byte):  EMULATED
#   0x7 "lock" (1 byte):  bits 0-3 RW allowed, bits 4-7 RW denied (change-checked)
#   0x8 "bar"  (4 bytes): EMULATED address bits 12+, EMULATED_RO low bits
#   0xc "gone" (2 bytes): HIDDEN
#   0xe-0xf: unlisted
FIELDS = [
    Field(
        "ctl",
        0,
        2,
        (
            BitGroup("ctl.rw", 0x000F, Access.RW, True),
            BitGroup("ctl.virt", 0x00F0, Access.EMULATED, True),
            BitGroup("ctl.ro", 0xFF00, Access.RO, True),
        ),
    ),
    Field(
        "sts",
        2,
        2,
        (
            BitGroup("sts.errors", 0xFF00, Access.RW1C, True),
            BitGroup("sts.ro", 0xFF, Access.RO, True),
        ),
    ),
    Field.simple("id", 4, 2, Access.RO, False),
    Field.simple("virt", 6, 1, Access.EMULATED, True),
    Field(
        "lock",
        7,
        1,
        (
            BitGroup("lock.low", 0x0F, Access.RW, True),
            BitGroup("lock.high", 0xF0, Access.RW, False),
        ),
    ),
    Field(
        "bar",
        8,
        4,
        (
            BitGroup("bar.address", 0xFFFF_F000, Access.EMULATED, True),
            BitGroup("bar.flags", 0x0000_0FFF, Access.EMULATED_RO, True),
        ),
    ),
    Field.simple("gone", 0xC, 2, Access.HIDDEN, False),
]
TABLE = FieldTable(16, FIELDS)
DEVICE = bytes.fromhex("a5 5a 00 f0 86 80 11 3c 00 00 00 00 77 77 99 99")
VIRTUAL = bytes.fromhex("f0 00 00 00 00 00 42 00 08 00 00 00 00 00 00 00")


def dev(offset: int, size: int) -> int:
    return int.from_bytes(DEVICE[offset : offset + size], "little")


def read(offset: int, size: int, table: FieldTable = TABLE, virtual: bytes = VIRTUAL) -> int:
    return apply_read(table, offset, size, dev(offset, size), virtual)


def write(offset: int, size: int, value: int, table: FieldTable = TABLE):  # type: ignore[no-untyped-def]
    return apply_write(table, offset, size, value, dev(offset, size), VIRTUAL)


def test_read_composes_device_virtual_and_hidden_bits() -> None:
    assert read(0, 2) == 0x5AF5  # RW low nibble 5, virtual high nibble f, RO byte 5a
    assert read(2, 2) == 0xF000
    assert read(6, 1) == 0x42
    assert read(8, 4) == 0x0000_0008
    assert read(0xC, 2) == 0  # hidden
    assert read(0xE, 2) == 0x9999  # unlisted: device
    assert read(0xC, 4) == 0x9999_0000


def test_one_byte_write_to_the_high_byte_touches_only_that_byte() -> None:
    plan = write(3, 1, 0x10)
    assert plan.device_writes == (DeviceWrite(3, 1, 0x10),)
    assert plan.virtual_mask == 0


def test_rw1c_bits_not_being_cleared_are_written_as_zero() -> None:
    plan = write(2, 2, 0x1000)
    # The device's set bits 0xe000 must not be written back as ones (that would clear them).
    assert plan.device_writes == (DeviceWrite(3, 1, 0x10),)
    assert write(2, 2, 0x0000).device_writes == ()  # writing zeros to RW1C changes nothing


def test_rw_write_keeps_non_bound_bits_at_the_device_value() -> None:
    plan = write(0, 2, 0x0003)
    assert plan.device_writes == (DeviceWrite(0, 1, 0xA3),)  # device high nibble kept
    assert plan.virtual_mask == 0x00F0 and plan.virtual_value == 0


def test_four_byte_write_spanning_two_fields_splits_by_field() -> None:
    plan = write(0, 4, 0x0100_00F3)
    assert plan.device_writes == (DeviceWrite(0, 1, 0xA3), DeviceWrite(3, 1, 0x01))
    assert plan.virtual_mask == 0x0000_00F0
    assert plan.virtual_value == 0x0000_00F0


def test_virtual_write_and_apply_virtual() -> None:
    plan = write(8, 4, 0xFFFF_FFFF)
    assert plan.device_writes == ()
    state = bytearray(VIRTUAL)
    plan.apply_virtual(state)
    assert apply_read(TABLE, 8, 4, 0, state) == 0xFFFF_F008  # sizing: flags kept


def test_a_register_with_no_writable_group_refuses_any_value() -> None:
    for value in (0x8086, 0x0000):
        with pytest.raises(AccessDeniedError) as info:
            write(4, 2, value)
        assert info.value.rule == "id"
        assert info.value.code is ErrorCode.ACCESS_DENIED


def test_denied_group_accepts_its_current_value_but_refuses_a_change() -> None:
    plan = write(7, 1, 0x35)  # high nibble 3 as read, low nibble changes
    assert plan.device_writes == (DeviceWrite(7, 1, 0x35),)
    with pytest.raises(AccessDeniedError) as info:
        write(7, 1, 0x45)
    assert info.value.rule == "lock.high"


def test_hidden_and_unlisted_writes_are_refused() -> None:
    with pytest.raises(AccessDeniedError, match="'gone'"):
        write(0xC, 2, 0)
    with pytest.raises(AccessDeniedError) as info:
        write(0xE, 1, 0x99)
    assert info.value.rule == UNLISTED


def test_a_refused_part_refuses_the_whole_access() -> None:
    with pytest.raises(AccessDeniedError):
        write(4, 4, 0x3C11_0000)  # 'virt' is writable but 'id' is not


def test_permissive_unlisted_bytes_pass_through() -> None:
    table = FieldTable(16, FIELDS, unlisted_access=Access.RW, unlisted_allowed=True)
    plan = write(0xE, 2, 0x1234, table)
    assert plan.device_writes == (DeviceWrite(0xE, 2, 0x1234),)


def test_bad_accesses_are_config_access_errors() -> None:
    with pytest.raises(ConfigAccessError):
        read(15, 2)
    with pytest.raises(ConfigAccessError) as info:
        write(0, 1, 0x100)
    assert info.value.code is ErrorCode.INVALID_SIZE


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Field("f", 0, 2, (BitGroup("a", 0xFF, Access.RO, False),)), "not every bit"),
        (
            lambda: Field(
                "f",
                0,
                1,
                (BitGroup("a", 0xFF, Access.RO, False), BitGroup("b", 1, Access.RO, False)),
            ),
            "overlaps another group",
        ),
        (lambda: Field("f", 0, 1, (BitGroup("a", 0x1FF, Access.RO, False),)), "wider than"),
        (lambda: BitGroup("h", 1, Access.HIDDEN, True), "HIDDEN group cannot be allowed"),
        (
            lambda: FieldTable(
                8,
                [
                    Field.simple("a", 0, 4, Access.RO, False),
                    Field.simple("b", 2, 2, Access.RO, False),
                ],
            ),
            "overlaps field 'a'",
        ),
        (lambda: FieldTable(4, [Field.simple("a", 2, 4, Access.RO, False)]), "outside"),
        (
            lambda: FieldTable(
                8,
                [
                    Field.simple("a", 0, 1, Access.RO, False),
                    Field.simple("a", 1, 1, Access.RO, False),
                ],
            ),
            "used twice",
        ),
    ],
)
def test_inconsistent_tables_are_rejected(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FieldTableError, match=message):
        build()


def test_lookup_helpers() -> None:
    assert TABLE.field_at(1) is FIELDS[0]
    assert TABLE.field_at(0xE) is None
    assert TABLE.fields_in(0xC, 4) == [FIELDS[6], None]
    assert TABLE.get("lock.high") == FIELDS[4].groups[1]
    assert "bar.flags" in TABLE and "nope" not in TABLE
    assert TABLE.names()[:4] == ["ctl", "ctl.rw", "ctl.virt", "ctl.ro"]


@given(
    offset=st.integers(0, 15),
    size=st.sampled_from([1, 2, 4]),
    value=st.integers(0, 0xFFFF_FFFF),
)
def test_device_writes_only_carry_guest_rw_and_rw1c_bits(
    offset: int, size: int, value: int
) -> None:
    offset -= offset % size
    if offset + size > 16:
        return
    value &= (1 << (8 * size)) - 1
    try:
        plan = write(offset, size, value)
    except AccessDeniedError:
        return
    for w in plan.device_writes:
        rel = w.offset - offset
        old = dev(w.offset, w.size)
        changed = old ^ w.value
        for byte in range(w.size):
            field = TABLE.field_at(w.offset + byte)
            assert field is not None
            shift = 8 * (w.offset + byte - field.offset)
            rw = (field.mask_of(Access.RW) >> shift) & 0xFF
            rw1c = (field.mask_of(Access.RW1C) >> shift) & 0xFF
            got = (changed >> (8 * byte)) & 0xFF
            written_ones = (w.value >> (8 * byte)) & 0xFF
            # Bits that are neither RW nor RW1C go out with the device's own value.
            assert got & ~(rw | rw1c) == 0
            # RW1C bits the guest did not write as 1 go out as 0.
            guest = (value >> (8 * (rel + byte))) & 0xFF
            assert written_ones & rw1c & ~guest == 0


def test_the_engine_imports_no_trio() -> None:
    code = "import shared.pci._fields, sys; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
