"""ConfigSpace: aligned access, and clear errors for everything else."""

from __future__ import annotations

import pytest

from shared.errors import ConfigAccessError, ErrorCode
from shared.pci import ConfigSpace, check_access


def test_reads_are_little_endian_at_every_width() -> None:
    space = ConfigSpace(bytes(range(256)))
    assert space.read(0x10, 1) == 0x10
    assert space.read(0x10, 2) == 0x1110
    assert space.read(0x10, 4) == 0x1312_1110
    assert space.read(0xFC, 4) == 0xFFFE_FDFC


def test_writes_change_exactly_the_addressed_bytes() -> None:
    space = ConfigSpace(4096)
    space.write(0x104, 4, 0xDEAD_BEEF)
    space.write(0x102, 2, 0x1234)
    space.write(0xFFF, 1, 0xAA)
    raw = bytes(space)
    assert raw[0x100:0x108] == bytes([0, 0, 0x34, 0x12, 0xEF, 0xBE, 0xAD, 0xDE])
    assert raw[0xFFF] == 0xAA
    assert raw.count(0) == 4096 - 7


@pytest.mark.parametrize("size", [64, 256, 4096])
def test_valid_sizes(size: int) -> None:
    assert ConfigSpace(size).size == size
    assert ConfigSpace(bytes(size)).size == size


@pytest.mark.parametrize("size", [0, 63, 128, 512, 4097])
def test_invalid_sizes_are_rejected(size: int) -> None:
    with pytest.raises(ConfigAccessError, match="size"):
        ConfigSpace(size)


@pytest.mark.parametrize(("offset", "size"), [(1, 2), (2, 4), (3, 4), (0x41, 2), (0xFA, 4)])
def test_misaligned_access_raises(offset: int, size: int) -> None:
    space = ConfigSpace(256)
    with pytest.raises(ConfigAccessError, match="misaligned") as info:
        space.read(offset, size)
    assert info.value.code is ErrorCode.INVALID_OFFSET
    with pytest.raises(ConfigAccessError, match="misaligned"):
        space.write(offset, size, 0)


@pytest.mark.parametrize(("offset", "size"), [(256, 1), (0x100, 4), (-1, 1), (-4, 4)])
def test_out_of_range_access_raises(offset: int, size: int) -> None:
    space = ConfigSpace(256)
    with pytest.raises(ConfigAccessError, match="outside"):
        space.read(offset, size)
    with pytest.raises(ConfigAccessError, match="outside"):
        space.write(offset, size, 0)


@pytest.mark.parametrize("size", [0, 3, 8])
def test_bad_access_size_raises_with_invalid_size_code(size: int) -> None:
    with pytest.raises(ConfigAccessError, match="not supported") as info:
        ConfigSpace(256).read(0, size)
    assert info.value.code is ErrorCode.INVALID_SIZE


@pytest.mark.parametrize(("size", "value"), [(1, 0x100), (2, 0x1_0000), (4, 1 << 32), (1, -1)])
def test_values_that_do_not_fit_are_rejected(size: int, value: int) -> None:
    space = ConfigSpace(256)
    with pytest.raises(ConfigAccessError, match="does not fit"):
        space.write(0, size, value)
    assert bytes(space) == bytes(256)


def test_byte_helpers_are_bound_checked() -> None:
    space = ConfigSpace(64)
    space.write_bytes(60, b"\x01\x02\x03\x04")
    assert space.read_bytes(60, 4) == b"\x01\x02\x03\x04"
    with pytest.raises(ConfigAccessError):
        space.write_bytes(62, b"\x00\x00\x00")
    with pytest.raises(ConfigAccessError):
        space.read_bytes(63, 2)


def test_copy_is_independent_and_equality_compares_bytes() -> None:
    space = ConfigSpace(256)
    dup = space.copy()
    assert dup == space
    dup.write(0, 2, 0x8086)
    assert dup != space
    assert space.read(0, 2) == 0
    assert "8086" in repr(dup)


def test_check_access_with_custom_sizes() -> None:
    check_access(8, 8, 16, sizes=(1, 2, 4, 8))
    with pytest.raises(ConfigAccessError):
        check_access(4, 8, 16, sizes=(1, 2, 4, 8))
