"""The firmware-like window allocator: natural alignment, windows by kind, reservations."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.pci import (
    DEFAULT_WINDOWS,
    AssignmentError,
    BarKind,
    GuestWindows,
    ResourceRequest,
    Window,
    WindowAllocator,
    virtual_irq,
)

WINDOWS = GuestWindows(
    mmio32=Window(0xE000_0000, 0x1000_0000),
    mmio64=Window(1 << 36, 1 << 36),
    io=Window(0xC000, 0x1000),
)


def test_each_kind_goes_to_its_window_naturally_aligned() -> None:
    alloc = WindowAllocator(WINDOWS)
    placed = alloc.allocate(
        "d",
        [
            ResourceRequest(0, 0x1000),
            ResourceRequest(1, 0x100, BarKind.IO),
            ResourceRequest(2, 1 << 30, BarKind.MEM64, prefetchable=True),
            ResourceRequest(4, 0x4000, BarKind.MEM64),
            ResourceRequest(6, 0x10000),
        ],
    )
    by_index = {r.index: r.address for r in placed}
    assert [r.index for r in placed] == [0, 1, 2, 4, 6]
    assert by_index[1] == 0xC000
    assert by_index[2] == 1 << 36  # 64-bit prefetchable above 4 GiB
    # Below 4 GiB, largest first: ROM (64 KiB), then the 16 KiB 64-bit BAR, then 4 KiB.
    assert by_index[6] == 0xE000_0000
    assert by_index[4] == 0xE001_0000
    assert by_index[0] == 0xE001_4000
    for r in placed:
        assert r.address is not None and r.address % r.size == 0


def test_fixed_addresses_are_reserved_not_moved() -> None:
    alloc = WindowAllocator(WINDOWS)
    alloc.allocate("a", [ResourceRequest(0, 0x1000, fixed=0xE000_0000)])
    (placed,) = alloc.allocate("b", [ResourceRequest(0, 0x1000)])
    assert placed.address == 0xE000_1000
    # A fixed address outside every window is kept as well.
    (kept,) = alloc.allocate("c", [ResourceRequest(0, 0x100000, fixed=0xF7000000 - 0x100000)])
    assert kept.address == 0xF6F0_0000


def test_release_frees_the_ranges_for_the_next_device() -> None:
    alloc = WindowAllocator(WINDOWS)
    first = alloc.allocate("a", [ResourceRequest(0, 0x1000)])
    alloc.release("a")
    assert alloc.occupied() == []
    assert alloc.allocate("b", [ResourceRequest(0, 0x1000)]) == first


def test_full_window_leaves_the_bar_unassigned_and_64bit_falls_back() -> None:
    small = GuestWindows(
        mmio32=Window(0xF000_0000, 0x2000), mmio64=Window(1 << 32, 0x1000), io=Window(0xC000, 4)
    )
    alloc = WindowAllocator(small)
    placed = alloc.allocate(
        "d",
        [
            ResourceRequest(0, 0x2000),
            ResourceRequest(1, 0x1000),
            ResourceRequest(2, 0x1000, BarKind.MEM64),
            ResourceRequest(4, 8, BarKind.IO),
        ],
    )
    by_index = {r.index: r.address for r in placed}
    assert by_index[0] == 0xF000_0000
    assert by_index[1] is None  # the 32-bit window is full and 32-bit BARs cannot go high
    assert by_index[2] == 1 << 32  # a 64-bit BAR falls back above 4 GiB
    assert by_index[4] is None


def test_invalid_inputs_are_typed_errors() -> None:
    with pytest.raises(AssignmentError, match="power of 2"):
        ResourceRequest(0, 0x1800)
    with pytest.raises(AssignmentError, match="out of range"):
        ResourceRequest(7, 0x1000)
    with pytest.raises(AssignmentError, match="below 4 GiB"):
        GuestWindows(Window(0xFFFF_0000, 0x20000), WINDOWS.mmio64, WINDOWS.io)
    with pytest.raises(AssignmentError, match="repeat"):
        WindowAllocator().allocate("d", [ResourceRequest(0, 16), ResourceRequest(0, 16)])


def test_virtual_irq_swizzles_pins_over_slots() -> None:
    assert virtual_irq(0, 0) is None
    assert [virtual_irq(0, pin) for pin in (1, 2, 3, 4)] == [10, 11, 5, 9]
    assert virtual_irq(1, 1) == virtual_irq(0, 2)
    with pytest.raises(AssignmentError):
        virtual_irq(0, 5)


@given(st.lists(st.tuples(st.integers(4, 24), st.sampled_from(list(BarKind))), max_size=12))
def test_no_two_resources_overlap_and_all_are_aligned(specs: list[tuple[int, BarKind]]) -> None:
    alloc = WindowAllocator(DEFAULT_WINDOWS)
    for n, (shift, kind) in enumerate(specs):
        size = 1 << min(shift, 8) if kind is BarKind.IO else 1 << shift
        alloc.allocate(f"d{n}", [ResourceRequest(0, size, kind)])
    for space in ("io", "memory"):
        ranges = sorted((b, e) for s, b, e, _ in alloc.occupied() if s == space)
        for (_, end), (base, _) in itertools.pairwise(ranges):
            assert end <= base
        for base, end in ranges:
            assert base % (end - base) == 0
