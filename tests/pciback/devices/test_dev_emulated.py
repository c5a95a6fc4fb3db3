"""The emulated-device framework: config space that behaves like hardware."""

from __future__ import annotations

import pytest

from pciback.devices import (
    BarKind,
    BarRegion,
    DeviceSetupError,
    EmulatedDevice,
    MemoryRegion,
)
from shared.errors import CapabilityError, ConfigAccessError, ErrorCode, PcisplitError
from shared.pci import CapId, Command, Reg, Status, walk_capabilities
from tests.support.sinks import RecordingSink


class SinkContext:
    """Just enough of a DeviceContext for interrupt tests (no tasks needed)."""

    def __init__(self) -> None:
        self.interrupts = RecordingSink()


def make_device(**kw: int) -> EmulatedDevice:
    args: dict[str, int] = {
        "vendor_id": 0x1234,
        "device_id": 0xABCD,
        "class_code": 0x020000,
        "revision": 0x07,
        "subsystem_vendor_id": 0x1AF4,
        "subsystem_id": 0x1100,
        "interrupt_pin": 1,
    }
    args.update(kw)
    return EmulatedDevice(**args)


def size_bar(dev: EmulatedDevice, offset: int) -> int:
    dev.config_write(offset, 4, 0xFFFF_FFFF)
    return dev.config_read(offset, 4)


# -- identity and read-only header --------------------------------------------------------


def test_identity_registers() -> None:
    dev = make_device()
    assert dev.config_read(Reg.VENDOR_ID, 2) == 0x1234
    assert dev.config_read(Reg.DEVICE_ID, 2) == 0xABCD
    assert dev.config_read(Reg.REVISION_ID, 4) == 0x0200_0007
    assert dev.config_read(Reg.SUBSYSTEM_VENDOR_ID, 4) == 0x1100_1AF4
    assert dev.config_read(Reg.INTERRUPT_PIN, 1) == 1
    assert dev.config_read(Reg.HEADER_TYPE, 1) == 0
    assert dev.config_size == 256


@pytest.mark.parametrize(
    "offset",
    [
        Reg.VENDOR_ID,
        Reg.DEVICE_ID,
        Reg.REVISION_ID,
        Reg.PROG_IF,
        Reg.SUBCLASS,
        Reg.CLASS,
        Reg.HEADER_TYPE,
        Reg.LATENCY_TIMER,
        Reg.BIST,
        Reg.SUBSYSTEM_VENDOR_ID,
        Reg.SUBSYSTEM_ID,
        Reg.CAPABILITY_LIST,
        Reg.INTERRUPT_PIN,
        Reg.MIN_GNT,
        Reg.MAX_LAT,
    ],
)
def test_read_only_header_bytes_stay(offset: int) -> None:
    dev = make_device()
    dev.add_msi_capability()
    before = dev.config_image()
    dev.config_write(offset, 1, (before[offset] ^ 0xFF))
    assert dev.config_image() == before


def test_command_writable_bits_only() -> None:
    dev = make_device()
    dev.config_write(Reg.COMMAND, 2, 0xFFFF)
    expected = (
        Command.IO
        | Command.MEMORY
        | Command.MASTER
        | Command.PARITY
        | Command.SERR
        | Command.INTX_DISABLE
    )
    assert dev.config_read(Reg.COMMAND, 2) == expected
    dev.config_write(Reg.COMMAND, 2, 0)
    assert dev.config_read(Reg.COMMAND, 2) == 0


def test_status_error_bits_are_rw1c() -> None:
    dev = make_device()
    dev._regs.init_int(Reg.STATUS, 2, 0xF900 | Status.CAP_LIST)  # as if errors were latched
    dev.config_write(Reg.STATUS, 2, 0x0000)  # writing zeros clears nothing
    assert dev.config_read(Reg.STATUS, 2) == 0xF900 | Status.CAP_LIST
    dev.config_write(Reg.STATUS, 2, Status.SIG_TARGET_ABORT | Status.CAP_LIST)
    assert dev.config_read(Reg.STATUS, 2) == (0xF900 & ~Status.SIG_TARGET_ABORT) | Status.CAP_LIST
    dev.config_write(Reg.STATUS, 2, 0xFFFF)  # CAP_LIST is read-only, not RW1C
    assert dev.config_read(Reg.STATUS, 2) == Status.CAP_LIST


def test_cache_line_and_interrupt_line_are_rw() -> None:
    dev = make_device()
    dev.config_write(Reg.CACHE_LINE_SIZE, 1, 0x10)
    dev.config_write(Reg.INTERRUPT_LINE, 1, 0x0B)
    assert dev.config_read(Reg.CACHE_LINE_SIZE, 1) == 0x10
    assert dev.config_read(Reg.INTERRUPT_LINE, 1) == 0x0B


def test_unimplemented_space_reads_zero_and_ignores_writes() -> None:
    dev = make_device()
    dev.config_write(0xA0, 4, 0xDEADBEEF)
    assert dev.config_read(0xA0, 4) == 0
    assert dev.config_read(0xFC, 4) == 0


@pytest.mark.parametrize(
    ("offset", "size", "code"),
    [
        (0x02, 4, ErrorCode.INVALID_OFFSET),  # misaligned
        (0x01, 2, ErrorCode.INVALID_OFFSET),
        (0x100, 4, ErrorCode.INVALID_OFFSET),  # beyond 256 bytes
        (-4, 4, ErrorCode.INVALID_OFFSET),
        (0x00, 3, ErrorCode.INVALID_SIZE),
        (0x00, 8, ErrorCode.INVALID_SIZE),
    ],
)
def test_bad_config_accesses_raise(offset: int, size: int, code: ErrorCode) -> None:
    dev = make_device()
    with pytest.raises(ConfigAccessError) as info:
        dev.config_read(offset, size)
    assert info.value.code is code
    with pytest.raises(ConfigAccessError):
        dev.config_write(offset, size, 0)


def test_config_write_value_must_fit() -> None:
    with pytest.raises(ConfigAccessError) as info:
        make_device().config_write(Reg.COMMAND, 2, 0x1_0000)
    assert info.value.code is ErrorCode.INVALID_SIZE


# -- BAR sizing ---------------------------------------------------------------------------


def test_mem32_bar_sizing_and_programming() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    assert dev.config_read(Reg.BAR0, 4) == 0
    assert size_bar(dev, Reg.BAR0) == 0xFFFF_F000
    dev.config_write(Reg.BAR0, 4, 0xFEBF_1234)
    assert dev.config_read(Reg.BAR0, 4) == 0xFEBF_1000


def test_prefetchable_mem32_keeps_flag() -> None:
    dev = make_device()
    dev.add_bar(2, 0x10_0000, prefetchable=True)
    assert dev.config_read(Reg.BAR2, 4) == 0x8
    assert size_bar(dev, Reg.BAR2) == 0xFFF0_0008


def test_mem64_pair_sizing() -> None:
    dev = make_device()
    dev.add_bar(2, 1 << 33, BarKind.MEM64, prefetchable=True)  # 8 GiB
    assert dev.config_read(Reg.BAR2, 4) == 0xC
    assert size_bar(dev, Reg.BAR2) == 0x0000_000C  # no address bits below 4 GiB
    assert size_bar(dev, Reg.BAR3) == 0xFFFF_FFFE
    small = make_device()
    small.add_bar(0, 0x4000, BarKind.MEM64)
    assert size_bar(small, Reg.BAR0) == 0xFFFF_C004
    assert size_bar(small, Reg.BAR1) == 0xFFFF_FFFF
    assert [b.index for b in small.bars()] == [0]


def test_io_bar_sizing() -> None:
    dev = make_device()
    dev.add_bar(1, 0x20, BarKind.IO)
    assert dev.config_read(Reg.BAR1, 4) == 0x1
    assert size_bar(dev, Reg.BAR1) == 0xFFFF_FFE1
    dev.config_write(Reg.BAR1, 4, 0xC040)
    assert dev.config_read(Reg.BAR1, 4) == 0xC041


def test_unimplemented_bars_read_zero() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    for offset in (Reg.BAR1, Reg.BAR2, Reg.BAR3, Reg.BAR4, Reg.BAR5):
        assert size_bar(dev, offset) == 0


def test_rom_sizing_and_enable_bit() -> None:
    dev = make_device()
    assert size_bar(dev, Reg.ROM_ADDRESS) == 0  # no ROM: reads 0
    dev = make_device()
    dev.add_rom(0x10000)
    assert dev.rom_size() == 0x10000
    assert size_bar(dev, Reg.ROM_ADDRESS) == 0xFFFF_0001
    dev.config_write(Reg.ROM_ADDRESS, 4, 0xFEA0_0000)
    assert dev.config_read(Reg.ROM_ADDRESS, 4) == 0xFEA0_0000
    dev.config_write(Reg.ROM_ADDRESS, 4, 0xFEA0_0001)
    assert dev.config_read(Reg.ROM_ADDRESS, 4) == 0xFEA0_0001


@pytest.mark.parametrize(
    ("index", "size", "kind"),
    [
        (6, 0x1000, BarKind.MEM32),
        (5, 0x1000, BarKind.MEM64),
        (0, 0x1001, BarKind.MEM32),
        (0, 8, BarKind.MEM32),
        (0, 0x1000, BarKind.IO),  # I/O BARs stop at 256 bytes
    ],
)
def test_invalid_bar_declarations(index: int, size: int, kind: BarKind) -> None:
    with pytest.raises(DeviceSetupError):
        make_device().add_bar(index, size, kind)


def test_overlapping_bars_rejected() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000, BarKind.MEM64)
    with pytest.raises(DeviceSetupError, match="overlaps"):
        dev.add_bar(1, 0x1000)


# -- BAR access ---------------------------------------------------------------------------


def test_bar_handlers_receive_offset_size_value() -> None:
    seen: list[tuple[int, int, int]] = []
    dev = make_device()
    dev.add_bar(0, 0x100, read=lambda off, size: off * 2 + size, write=lambda *a: seen.append(a))
    assert dev.bar_read(0, 0x10, 4) == 0x24
    dev.bar_write(0, 0x18, 8, 0x1122334455667788)
    assert seen == [(0x18, 8, 0x1122334455667788)]


def test_bar_region_object() -> None:
    class Counter(BarRegion):
        def __init__(self) -> None:
            self.value = 0

        def read(self, offset: int, size: int) -> int:
            return self.value

        def write(self, offset: int, size: int, value: int) -> None:
            self.value += value

        def reset(self) -> None:
            self.value = 0

    counter = Counter()
    dev = make_device()
    dev.add_bar(0, 0x10, region=counter)
    dev.bar_write(0, 0, 4, 5)
    dev.bar_write(0, 0, 4, 6)
    assert dev.bar_read(0, 4, 4) == 11
    dev.reset()
    assert dev.bar_read(0, 0, 4) == 0


def test_bar_without_handlers_is_memory() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    dev.bar_write(0, 0x10, 8, 0x0102030405060708)
    assert dev.bar_read(0, 0x10, 1) == 0x08
    assert dev.bar_read(0, 0x14, 4) == 0x01020304
    dev.reset()
    assert dev.bar_read(0, 0x10, 8) == 0


@pytest.mark.parametrize(
    ("bar", "offset", "size", "code"),
    [
        (1, 0, 4, ErrorCode.NOT_FOUND),
        (0, 0x1000, 4, ErrorCode.INVALID_OFFSET),
        (0, 0xFFC, 8, ErrorCode.INVALID_OFFSET),
        (0, 2, 4, ErrorCode.INVALID_OFFSET),
        (0, 0, 3, ErrorCode.INVALID_SIZE),
        (2, 0, 8, ErrorCode.INVALID_SIZE),  # no 8-byte I/O accesses
    ],
)
def test_bad_bar_accesses(bar: int, offset: int, size: int, code: ErrorCode) -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    dev.add_bar(2, 0x20, BarKind.IO)
    with pytest.raises(ConfigAccessError) as info:
        dev.bar_read(bar, offset, size)
    assert info.value.code is code
    assert f"BAR{bar}" in str(info.value)


def test_bar_write_value_must_fit() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    with pytest.raises(ConfigAccessError) as info:
        dev.bar_write(0, 0, 1, 0x100)
    assert info.value.code is ErrorCode.INVALID_SIZE


def test_memory_region_is_sparse() -> None:
    region = MemoryRegion(1 << 30)
    assert region.read(0x3FFF_FFF8, 8) == 0
    region.write_bytes(0x1FFE, b"\x01\x02\x03\x04")  # crosses a page boundary
    assert region.read_bytes(0x1FFC, 8) == b"\x00\x00\x01\x02\x03\x04\x00\x00"
    assert region.allocated_bytes == 2 * MemoryRegion.PAGE_SIZE
    region.write_bytes(0x10_0000, bytes(16))  # zeros on an untouched page allocate nothing
    assert region.allocated_bytes == 2 * MemoryRegion.PAGE_SIZE
    with pytest.raises(ConfigAccessError):
        region.read_bytes((1 << 30) - 4, 8)


# -- capabilities -------------------------------------------------------------------------


def test_capabilities_are_linked_and_headers_read_only() -> None:
    dev = make_device(config_size=4096)
    pm = dev.add_capability(CapId.PM, b"\x03\x00\x00\x00\x00\x00", writable_mask=b"\0\0\x03\0\0\0")
    msi = dev.add_msi_capability(vectors=4)
    aer = dev.add_extended_capability(0x01, 2, bytes(0x44), writable_mask=b"\xff" * 0x44)
    dsn = dev.add_extended_capability(0x03, 1, bytes(8))
    walk = walk_capabilities(dev.config_image())
    assert walk.ok
    assert [(c.id, c.offset) for c in walk.standard] == [(CapId.PM, pm), (CapId.MSI, msi)]
    assert [(c.id, c.offset) for c in walk.extended] == [(0x01, aer), (0x03, dsn)]
    assert dev.config_read(Reg.STATUS, 2) & Status.CAP_LIST
    before = dev.config_image()
    for offset in (pm, pm + 1, msi, msi + 1):
        dev.config_write(offset, 1, 0x00)
    dev.config_write(aer, 4, 0)
    dev.config_write(Reg.CAPABILITY_LIST, 1, 0)
    assert dev.config_image() == before
    dev.config_write(pm + 4, 2, 0xFFFF)  # PM control: only the power-state bits are writable
    assert dev.config_read(pm + 4, 2) == 0x0003
    dev.config_write(aer + 8, 4, 0x1234_5678)
    assert dev.config_read(aer + 8, 4) == 0x1234_5678


def test_capability_w1c_mask() -> None:
    dev = make_device()
    off = dev.add_capability(0x09, b"\x00\x00", w1c_mask=b"\xff\x00")
    dev._regs.init_int(off + 2, 2, 0x00A5)
    dev.config_write(off + 2, 2, 0x0081)
    assert dev.config_read(off + 2, 2) == 0x0024


def test_capability_errors() -> None:
    dev = make_device()
    with pytest.raises(DeviceSetupError):
        dev.add_capability(0x09, b"\x00\x00", writable_mask=b"\x00")
    with pytest.raises(CapabilityError):
        dev.add_capability(0x09, bytes(0xC0))  # does not fit below 0x100
    with pytest.raises(CapabilityError):
        dev.add_extended_capability(0x01, 1, bytes(4))  # needs 4096-byte config space


def test_msi_capability_layout_and_masks() -> None:
    dev = make_device()
    off = dev.add_msi_capability(vectors=4, address_64=True)
    assert dev.config_read(off, 1) == CapId.MSI
    assert dev.config_read(off + 2, 2) == 0x0084  # 4 vectors requested, 64-bit
    dev.config_write(off + 2, 2, 0xFFFF)
    assert dev.config_read(off + 2, 2) == 0x00F5  # enable + MME writable only
    dev.config_write(off + 4, 4, 0xFEE0_0003)
    assert dev.config_read(off + 4, 4) == 0xFEE0_0000
    dev.config_write(off + 8, 4, 0x1)
    dev.config_write(off + 12, 2, 0x4020)
    dev.config_write(off + 2, 2, 0x0021)  # enable, 4 vectors granted
    assert dev.msi_enabled
    assert dev.msi_message(3) == (0x1_FEE0_0000, 0x4023)


# -- interrupts ---------------------------------------------------------------------------


def test_intx_level_status_bit_and_disable() -> None:
    dev = make_device()
    ctx = SinkContext()
    dev.attach(ctx)  # type: ignore[arg-type]
    dev.raise_intx()
    assert dev.intx_asserted
    assert dev.config_read(Reg.STATUS, 2) & Status.INTERRUPT
    dev.raise_intx()  # still asserted: no second edge
    dev.config_write(Reg.COMMAND, 2, Command.INTX_DISABLE)
    dev.config_write(Reg.COMMAND, 2, 0)
    dev.lower_intx()
    assert not dev.config_read(Reg.STATUS, 2) & Status.INTERRUPT
    assert ctx.interrupts.events == [
        ("assert", 0),
        ("deassert", 0),
        ("assert", 0),
        ("deassert", 0),
    ]


def test_intx_without_context_records_level_only() -> None:
    dev = make_device()
    dev.raise_intx()
    assert dev.intx_asserted
    dev.reset()
    assert not dev.intx_asserted
    assert not dev.config_read(Reg.STATUS, 2) & Status.INTERRUPT


def test_intx_needs_a_pin() -> None:
    with pytest.raises(DeviceSetupError):
        make_device(interrupt_pin=0).raise_intx()


def test_msi_signal_mask_and_pending() -> None:
    dev = make_device()
    ctx = SinkContext()
    dev.attach(ctx)  # type: ignore[arg-type]
    off = dev.add_msi_capability(vectors=2, address_64=False, per_vector_mask=True)
    with pytest.raises(PcisplitError) as info:
        dev.signal_msi(0)
    assert info.value.code is ErrorCode.INVALID_STATE
    dev.config_write(off + 2, 2, 0x0011)  # enable, 2 vectors
    dev.signal_msi(1)
    dev.config_write(off + 0x0C, 4, 0b01)  # mask vector 0
    dev.signal_msi(0)
    assert dev.config_read(off + 0x10, 4) == 0b01  # pending
    assert ctx.interrupts.events == [("msi", 1)]
    dev.config_write(off + 0x0C, 4, 0)  # unmask: the pending vector is delivered
    assert ctx.interrupts.events == [("msi", 1), ("msi", 0)]
    assert dev.config_read(off + 0x10, 4) == 0
    with pytest.raises(PcisplitError):
        dev.signal_msi(2)


def test_msi_enable_suppresses_intx() -> None:
    dev = make_device()
    ctx = SinkContext()
    dev.attach(ctx)  # type: ignore[arg-type]
    off = dev.add_msi_capability()
    dev.raise_intx()
    dev.config_write(off + 2, 2, 1)
    assert ctx.interrupts.events == [("assert", 0), ("deassert", 0)]


# -- reset --------------------------------------------------------------------------------


def test_reset_restores_power_on_config() -> None:
    dev = make_device()
    dev.add_bar(0, 0x1000)
    dev.add_msi_capability()
    power_on = dev.config_image()
    dev.config_write(Reg.COMMAND, 2, 0x7)
    dev.config_write(Reg.BAR0, 4, 0xFEBF_0000)
    dev.config_write(Reg.INTERRUPT_LINE, 1, 11)
    dev.config_write(0x42, 2, 1)
    assert dev.config_image() != power_on
    generation = dev.generation
    dev.reset()
    assert dev.config_image() == power_on
    assert dev.generation == generation + 1


def test_reset_state_hook_and_config_written_hook() -> None:
    class Model(EmulatedDevice):
        def __init__(self) -> None:
            super().__init__(vendor_id=1, device_id=2, class_code=0xFF0000)
            self.writes: list[tuple[int, int]] = []
            self.resets = 0

        def config_written(self, offset: int, size: int) -> None:
            self.writes.append((offset, size))

        def reset_state(self) -> None:
            self.resets += 1

    model = Model()
    model.config_write(Reg.COMMAND, 2, 2)
    model.reset()
    assert model.writes == [(Reg.COMMAND, 2)]
    assert model.resets == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vendor_id": 0x10000},
        {"class_code": 0x1000000},
        {"interrupt_pin": 5},
        {"config_size": 64},
        {"header_type": 3},
    ],
)
def test_invalid_identity_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(DeviceSetupError):
        make_device(**kwargs)
