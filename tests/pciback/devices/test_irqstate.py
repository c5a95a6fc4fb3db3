"""InterruptState: the one owner of a device's INTx, MSI and MSI-X state.

The operations are checked against a small reference model of the PCI rules
(written with sets, not bit masks) under random operation sequences; the
plain form round-trips and refuses bad input; the register views map config
writes onto the state only while no IRQ router manages it.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pciback.devices import (
    STATE_FIELDS,
    DeviceSetupError,
    EmulatedDevice,
    InterruptState,
    InterruptStateError,
    MsiRegisters,
    MsixRegisters,
    Signal,
    SnapshotDevice,
)
from pciback.policy import PolicedDevice
from shared.errors import ErrorCode, PcisplitError
from shared.pci import CapId, MsiControl, MsixControl, walk_capabilities
from shared.protocol import IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX

# -- the reference model --------------------------------------------------------------------


class Reference:
    """The PCI rules, stated plainly: what each operation must do."""

    def __init__(self) -> None:
        self.mode: int | None = None
        self.vectors = 0
        self.table = 0
        self.masked: set[int] = set()
        self.pending: set[int] = set()
        self.function_masked = False
        self.level = False
        self.in_service = False

    def disable(self) -> None:
        self.mode, self.vectors, self.table = None, 0, 0
        self.masked, self.pending = set(), set()
        self.function_masked = self.in_service = False

    def enable(self, mode: int, vectors: int, table: int) -> list[int]:
        self.mode, self.vectors = mode, vectors
        self.table = table if mode == IRQ_MODE_MSIX else 0
        self.pending = set()
        self.in_service = False
        if mode == IRQ_MODE_INTX and self.level:
            self.in_service = True
            return [0]
        return []

    def signal(self, mode: int, vector: int) -> Signal:
        if mode != self.mode:
            return Signal.OFF
        if mode == IRQ_MODE_MSIX and not vector < self.table:
            return Signal.OUTSIDE_TABLE
        if not vector < self.vectors:
            return Signal.OFF
        if self.function_masked or vector in self.masked:
            self.pending.add(vector)  # once, however often it fires
            return Signal.PENDING
        return Signal.DELIVER

    def unmasked(self) -> list[int]:
        """Pending vectors that are now unmasked are delivered, lowest first."""
        if self.function_masked:
            return []
        ready = sorted(self.pending - self.masked)
        self.pending -= set(ready)
        return ready

    def level_to(self, level: bool) -> list[int]:
        self.level = level
        if level and self.mode == IRQ_MODE_INTX and not self.in_service:
            self.in_service = True
            return [0]
        return []

    def eoi(self) -> list[int]:
        self.in_service = self.level
        return [0] if self.level else []


def bits(vectors: set[int]) -> int:
    return sum(1 << v for v in vectors)


def vector_list(mask: int) -> list[int]:
    return [v for v in range(mask.bit_length()) if mask >> v & 1]


MODES = st.sampled_from([IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX])
VECTOR = st.integers(0, 70)


class StateMachine(RuleBasedStateMachine):
    """Random operation sequences: the state and its deliveries follow the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.state = InterruptState()
        self.ref = Reference()

    @rule(mode=MODES, log_vectors=st.integers(0, 6), table=st.integers(1, 64))
    def enable(self, mode: int, log_vectors: int, table: int) -> None:
        vectors = 1 if mode == IRQ_MODE_INTX else 1 << log_vectors
        if mode == IRQ_MODE_MSI:
            vectors = min(vectors, 32)
        if mode == IRQ_MODE_MSIX:
            vectors = min(vectors, table)
        if self.ref.mode is not None:
            with pytest.raises(InterruptStateError) as info:
                self.state.enable(mode, vectors, table_size=table)
            assert info.value.code is ErrorCode.INVALID_STATE
            return
        fire = self.state.enable(mode, vectors, table_size=table)
        assert ([0] if fire else []) == self.ref.enable(mode, vectors, table)

    @rule()
    def disable(self) -> None:
        self.state.disable()
        self.ref.disable()

    @rule(mode=st.sampled_from([IRQ_MODE_MSI, IRQ_MODE_MSIX]), vector=VECTOR)
    def signal(self, mode: int, vector: int) -> None:
        assert self.state.signal(mode, vector) is self.ref.signal(mode, vector)

    @rule(vector=VECTOR, masked=st.booleans())
    def mask(self, vector: int, masked: bool) -> None:
        ready = self.state.set_mask(vector, masked)
        (self.ref.masked.add if masked else self.ref.masked.discard)(vector)
        assert vector_list(ready) == self.ref.unmasked()

    @rule(masks=st.sets(st.integers(0, 31)))
    def mask_register(self, masks: set[int]) -> None:
        ready = self.state.set_masks(bits(masks))
        self.ref.masked = set(masks)
        assert vector_list(ready) == self.ref.unmasked()

    @rule(masked=st.booleans())
    def function_mask(self, masked: bool) -> None:
        ready = self.state.set_function_mask(masked)
        self.ref.function_masked = masked
        assert vector_list(ready) == self.ref.unmasked()

    @rule(level=st.booleans())
    def line(self, level: bool) -> None:
        fire = self.state.set_intx_level(level)
        assert ([0] if fire else []) == self.ref.level_to(level)

    @rule()
    def eoi(self) -> None:
        if not self.ref.in_service:
            with pytest.raises(InterruptStateError):
                self.state.eoi_intx()
            return
        assert ([0] if self.state.eoi_intx() else []) == self.ref.eoi()

    @rule()
    def save_and_restore(self) -> None:
        saved = json.loads(json.dumps(self.state.save()))
        other = InterruptState()
        other.restore(saved)
        assert other.save() == self.state.save()

    @invariant()
    def matches_reference(self) -> None:
        s, r = self.state, self.ref
        assert (s.mode, s.vectors, s.table_size) == (r.mode, r.vectors, r.table)
        assert s.masked == bits(r.masked)
        assert s.pending == bits(r.pending)
        assert s.function_masked == r.function_masked
        assert (s.intx_level, s.intx_in_service) == (r.level, r.in_service)

    @invariant()
    def pending_only_for_enabled_vectors(self) -> None:
        assert self.state.pending >> max(self.state.vectors, 0) == 0


TestStateMachine = StateMachine.TestCase
TestStateMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- the operations, one by one ---------------------------------------------------------------


def test_masked_vector_pends_once_and_unmask_delivers_it() -> None:
    state = InterruptState()
    state.enable(IRQ_MODE_MSIX, 8, table_size=16)
    assert state.set_mask(5, True) == 0
    assert state.signal(IRQ_MODE_MSIX, 5) is Signal.PENDING
    assert state.signal(IRQ_MODE_MSIX, 5) is Signal.PENDING
    assert state.pending == 1 << 5
    assert state.signal(IRQ_MODE_MSIX, 6) is Signal.DELIVER
    assert state.set_mask(5, False) == 1 << 5
    assert state.pending == 0


def test_function_mask_holds_every_vector_until_cleared() -> None:
    state = InterruptState()
    state.enable(IRQ_MODE_MSIX, 4, table_size=4)
    state.set_function_mask(True)
    for vector in (1, 2):
        assert state.signal(IRQ_MODE_MSIX, vector) is Signal.PENDING
    state.set_mask(2, True)
    assert state.set_function_mask(False) == 1 << 1  # vector 2 is still masked on its own
    assert state.pending == 1 << 2


def test_msix_entries_outside_the_table_and_beyond_the_enabled_vectors() -> None:
    state = InterruptState()
    state.enable(IRQ_MODE_MSIX, 4, table_size=64)
    assert state.signal(IRQ_MODE_MSIX, 64) is Signal.OUTSIDE_TABLE
    assert state.signal(IRQ_MODE_MSIX, 10) is Signal.OFF
    assert state.signal(IRQ_MODE_MSI, 0) is Signal.OFF


def test_disable_clears_everything_but_the_line_and_message() -> None:
    state = InterruptState()
    state.set_message(0xFEE0_0000, 0x4021)
    state.set_intx_level(True)
    state.enable(IRQ_MODE_MSI, 4)
    state.set_masks(0b1010)
    state.signal(IRQ_MODE_MSI, 1)
    state.disable()
    assert state.save() == {
        **InterruptState().save(),
        "msi_address": 0xFEE0_0000,
        "msi_data": 0x4021,
        "intx_level": True,
    }


def test_intx_late_eoi() -> None:
    state = InterruptState()
    state.set_intx_level(True)
    assert state.enable(IRQ_MODE_INTX, 1)  # a line already up fires at once
    assert not state.set_intx_level(True)  # in service: nothing more
    assert state.signal(IRQ_MODE_INTX, 0) is Signal.OFF  # INTx is a level, not an edge
    assert state.eoi_intx()  # still up: fires again
    state.set_intx_level(False)
    assert not state.eoi_intx()
    with pytest.raises(InterruptStateError):
        state.eoi_intx()  # nothing in service


@pytest.mark.parametrize(
    ("mode", "vectors", "table"),
    [
        (IRQ_MODE_INTX, 2, 0),
        (IRQ_MODE_MSI, 3, 0),
        (IRQ_MODE_MSI, 64, 0),
        (IRQ_MODE_MSIX, 9, 8),
        (IRQ_MODE_MSIX, 1, 4096),
        (7, 1, 0),
    ],
)
def test_impossible_enables_are_refused_and_change_nothing(
    mode: int, vectors: int, table: int
) -> None:
    state = InterruptState()
    with pytest.raises(InterruptStateError):
        state.enable(mode, vectors, table_size=table)
    assert state.save() == InterruptState().save()


def test_enable_while_another_mode_is_on_is_refused() -> None:
    state = InterruptState()
    state.enable(IRQ_MODE_MSI, 1)
    with pytest.raises(InterruptStateError) as info:
        state.enable(IRQ_MODE_MSIX, 1, table_size=1)
    assert "MSI is on" in info.value.message
    assert state.mode == IRQ_MODE_MSI


def test_reset_keeps_who_manages_the_state() -> None:
    state = InterruptState()
    state.managed = True
    state.enable(IRQ_MODE_MSI, 2)
    state.reset()
    assert state.managed
    assert state.save() == InterruptState().save()


# -- the plain form -----------------------------------------------------------------------------


def test_save_is_plain_and_restore_round_trips() -> None:
    state = InterruptState()
    state.set_message(0x1_FEE0_1000, 0x4099)
    state.enable(IRQ_MODE_MSIX, 2048, table_size=2048)
    state.set_mask(2047, True)
    state.signal(IRQ_MODE_MSIX, 2047)
    saved = state.save()
    assert tuple(saved) == STATE_FIELDS
    text = json.dumps(saved)
    other = InterruptState()
    other.restore(json.loads(text))
    assert other.save() == saved
    assert other.signal(IRQ_MODE_MSIX, 2047) is Signal.PENDING
    assert other.set_mask(2047, False) == 1 << 2047


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mode": 5}, "mode"),
        ({"mode": "1"}, "mode"),
        ({"vectors": -1}, "vectors"),
        ({"masked": 1 << 2048}, "masked"),
        ({"msi_data": 0x10000}, "msi_data"),
        ({"function_masked": 1}, "function_masked"),
        ({"pending": 1}, "no mode on"),
        ({"mode": IRQ_MODE_MSI, "vectors": 2, "msi_mme": 1, "pending": 0b100}, "beyond"),
        ({"mode": IRQ_MODE_MSI, "vectors": 3, "msi_mme": 1}, "cannot have"),
        ({"mode": IRQ_MODE_MSI, "vectors": 4, "msi_mme": 1}, "Multiple Message Enable"),
        ({"intx_in_service": True}, "in service"),
        ({"surprise": 0}, "unknown"),
    ],
)
def test_restore_refuses_bad_saved_states(change: dict[str, object], words: str) -> None:
    state = InterruptState()
    state.enable(IRQ_MODE_INTX, 1)
    before = state.save()
    saved: dict[str, object] = {**InterruptState().save(), **change}
    with pytest.raises(InterruptStateError) as info:
        state.restore(saved)
    assert words in info.value.message
    assert state.save() == before  # nothing changed


def test_restore_refuses_missing_fields() -> None:
    saved: dict[str, object] = dict(InterruptState().save())
    del saved["pending"]
    with pytest.raises(InterruptStateError) as info:
        InterruptState().restore(saved)
    assert "missing ['pending']" in info.value.message


# -- the register views ---------------------------------------------------------------------------


class Registers:
    """A 64-byte scratch config space with an MSI (64-bit, maskable) at 0x40 and MSI-X at 0x60."""

    MSI, MSIX = 0x40, 0x60

    def __init__(self) -> None:
        self.data = bytearray(0x80)
        control = int(MsiControl.ADDR_64 | MsiControl.PER_VECTOR_MASK) | (2 << 1)
        self.data[self.MSI + 2 : self.MSI + 4] = control.to_bytes(2, "little")
        self.data[self.MSIX + 2 : self.MSIX + 4] = (15).to_bytes(2, "little")
        self.msi = MsiRegisters(self.MSI, control)
        self.msix = MsixRegisters(self.MSIX, 15)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, state: InterruptState, offset: int, size: int, value: int) -> int:
        self.data[offset : offset + size] = value.to_bytes(size, "little")
        return self.msi.store(state, self.read, offset, size) | self.msix.store(
            state, self.read, offset, size
        )

    def shown(self, state: InterruptState, offset: int, size: int) -> int:
        for off, width, mask, value in self.msi.overlays(state, pending=True) + self.msix.overlays(
            state
        ):
            old = self.read(off, width)
            self.data[off : off + width] = ((old & ~mask) | (value & mask)).to_bytes(
                width, "little"
            )
        return self.read(offset, size)


def test_config_writes_program_the_state_when_no_router_manages_it() -> None:
    regs, state = Registers(), InterruptState()
    regs.write(state, regs.MSI + 4, 4, 0xFEE0_1000)
    regs.write(state, regs.MSI + 8, 4, 0x1)
    regs.write(state, regs.MSI + 0xC, 2, 0x4099)
    regs.write(state, regs.MSI + 0x10, 4, 0b01)  # mask vector 0 before enabling
    regs.write(state, regs.MSI + 2, 2, 0x0021)  # enable, 4 vectors
    assert (state.mode, state.vectors, state.msi_mme) == (IRQ_MODE_MSI, 4, 2)
    assert (state.msi_address, state.msi_data, state.masked) == (0x1_FEE0_1000, 0x4099, 1)
    assert state.signal(IRQ_MODE_MSI, 0) is Signal.PENDING
    assert regs.shown(state, regs.MSI + 0x14, 4) == 0b01  # the pending register shows it
    assert regs.write(state, regs.MSI + 0x10, 4, 0) == 0b01  # unmask: deliver vector 0
    regs.write(state, regs.MSIX + 2, 2, MsixControl.ENABLE | MsixControl.FUNCTION_MASK)
    assert (state.mode, state.table_size, state.function_masked) == (IRQ_MODE_MSIX, 16, True)
    assert regs.shown(state, regs.MSI + 2, 2) & MsiControl.ENABLE == 0  # modes exclude


def test_config_writes_to_enables_and_masks_are_ignored_while_a_router_manages_it() -> None:
    regs, state = Registers(), InterruptState()
    state.managed = True
    for offset in range(regs.MSI + 2, regs.MSI + 0x14, 2):
        regs.write(state, offset, 2, 0xFFFF)
    regs.write(state, regs.MSIX + 2, 2, 0xFFFF)
    assert state.mode is None and state.masked == 0 and not state.function_masked
    assert regs.shown(state, regs.MSI + 2, 2) & 0x71 == 0
    # The message is software's to program either way.
    assert state.msi_data == 0xFFFF and state.msi_address == (1 << 64) - 1
    state.enable(IRQ_MODE_MSIX, 4, table_size=16)
    assert regs.shown(state, regs.MSIX + 2, 2) & 0xC000 == 0x8000


# -- one object, seen by the model and the policy -----------------------------------------------


def test_model_and_policy_show_one_state() -> None:
    model = EmulatedDevice(vendor_id=0x1234, device_id=0x11, class_code=0xFF0000)
    body = (7).to_bytes(2, "little") + bytes(8)
    msix = model.add_capability(CapId.MSIX, body, writable_mask=b"\x00\xc0" + bytes(8))
    msi = model.add_msi_capability(4, per_vector_mask=True)
    policed = PolicedDevice(model, guest="g", device="d")
    state = model.interrupt_state
    policed.config_write(msi + 2, 2, 0x0021)  # the guest enables MSI, 4 vectors
    assert model.msi_enabled and state.vectors == 4
    assert model.config_read(msi + 2, 2) & 0x71 == 0x21  # the model's register shows it
    policed.config_write(msi + 0x10, 4, 0b10)
    assert model.config_read(msi + 0x10, 4) == 0b10 and state.masked == 0b10
    model.config_write(msi + 2, 2, 0)  # the model's own register turns it off
    assert policed.msi_state() is not None and not policed.msi_state().enabled  # type: ignore[union-attr]
    assert policed.config_read(msi + 2, 2) & MsiControl.ENABLE == 0
    state.managed = True
    state.enable(IRQ_MODE_MSIX, 8, table_size=8)
    assert policed.config_read(msix + 2, 2) == 0x8007
    assert model.config_read(msix + 2, 2) == 0x8007
    model.reset()
    assert state.mode is None and state.managed


def test_a_clipped_msi_capability_never_overwrites_its_neighbour() -> None:
    """A malformed list: a 24-byte maskable MSI at 0x50 whose mask and pending bytes are
    where the next capability (PM, at 0x60) starts. The policy gives those bytes to PM,
    and showing the interrupt state must leave them alone."""
    image = bytearray(256)
    image[0:4] = (0x1234 | 0x5678 << 16).to_bytes(4, "little")
    image[0x06] = 0x10  # Status: capability list
    image[0x34] = 0x50
    image[0x50:0x54] = bytes([CapId.MSI, 0x60]) + (0x0180).to_bytes(2, "little")
    image[0x60:0x64] = bytes([CapId.PM, 0x00, 0x03, 0x00])
    policed = PolicedDevice(SnapshotDevice(bytes(image)), guest="g", device="d")
    policed.provider.interrupt_state.set_masks(0)
    assert policed.config_read(0x60, 2) == CapId.PM  # header intact, next pointer 0
    policed.config_write(0x52, 2, 0x0001)  # the guest enables MSI
    assert policed.config_read(0x60, 4) & 0xFFFF == CapId.PM
    assert policed.msi_state() is not None and policed.msi_state().enabled  # type: ignore[union-attr]
    assert [c.id for c in walk_capabilities(policed.guest_config_image()).standard] == [
        CapId.MSI,
        CapId.PM,
    ]


# -- an MSI-X table and PBA in a model's BAR ----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def assert_intx(self) -> None:
        self.events.append(("assert", 0))

    def deassert_intx(self) -> None:
        self.events.append(("deassert", 0))

    def signal_msi(self, vector: int) -> None:
        self.events.append(("msi", vector))

    def signal_msix(self, vector: int) -> None:
        self.events.append(("msix", vector))


class RecorderContext:
    def __init__(self) -> None:
        self.interrupts = Recorder()


def msix_model() -> tuple[EmulatedDevice, int, Recorder]:
    dev = EmulatedDevice(vendor_id=0x1234, device_id=0x22, class_code=0xFF0000)
    dev.add_bar(0, 0x4000)
    cap = dev.add_msix_capability(70, bar=0, table_offset=0x1000)
    ctx = RecorderContext()
    dev.attach(ctx)  # type: ignore[arg-type]
    return dev, cap, ctx.interrupts


def test_msix_table_and_pba_show_the_state() -> None:
    dev, cap, sink = msix_model()
    assert dev.config_read(cap + 2, 2) == 69  # table size - 1, disabled
    assert dev.config_read(cap + 4, 4) == 0x1000  # table at 0x1000 in BAR0
    pba = dev.config_read(cap + 8, 4)
    assert pba == 0x1000 + 70 * 16  # right after the table, BAR0
    dev.config_write(cap + 2, 2, MsixControl.ENABLE)
    state = dev.interrupt_state
    assert (state.mode, state.table_size, state.vectors) == (IRQ_MODE_MSIX, 70, 70)
    entry = 0x1000 + 65 * 16
    dev.bar_write(0, entry, 8, 0x1_FEE0_2000)  # address, one 64-bit write
    dev.bar_write(0, entry + 8, 4, 0x4065)  # data
    dev.bar_write(0, entry + 12, 4, 1)  # vector control: masked
    assert state.msix_messages == {65: (0x1_FEE0_2000, 0x4065)}
    assert state.masked == 1 << 65
    dev.signal_msix(65)
    dev.signal_msix(2)
    assert sink.events == [("msix", 2)]
    assert dev.bar_read(0, pba + 8, 8) == 1 << 1  # PBA bit 65 (second qword)
    dev.bar_write(0, pba + 8, 8, 0)  # the PBA is read-only
    assert state.pending == 1 << 65
    assert dev.bar_read(0, entry, 4) == 0xFEE0_2000 and dev.bar_read(0, entry + 4, 4) == 1
    dev.bar_write(0, entry + 12, 4, 0)  # unmask: the pending entry is sent
    assert sink.events == [("msix", 2), ("msix", 65)]
    assert dev.bar_read(0, pba + 8, 8) == 0
    dev.bar_write(0, 0x10, 4, 0xAB)  # the rest of the BAR is the model's memory
    assert dev.bar_read(0, 0x10, 4) == 0xAB
    with pytest.raises(PcisplitError) as info:
        dev.signal_msix(70)  # outside the table
    assert info.value.code is ErrorCode.INVALID_STATE
    dev.config_write(cap + 2, 2, 0)
    with pytest.raises(PcisplitError):
        dev.signal_msix(0)  # MSI-X is off
    dev.reset()
    assert state.msix_messages == {} and dev.bar_read(0, 0x10, 4) == 0


def test_msix_table_mask_bits_are_the_routers_while_it_manages_the_device() -> None:
    dev, cap, sink = msix_model()
    state = dev.interrupt_state
    state.managed = True
    state.enable(IRQ_MODE_MSIX, 8, table_size=70)
    assert dev.config_read(cap + 2, 2) & MsixControl.ENABLE
    dev.bar_write(0, 0x1000 + 12, 4, 1)  # a guest's mask write: ignored
    assert state.masked == 0
    state.set_mask(3, True)  # the router's mask operation: shown in the table
    assert dev.bar_read(0, 0x1000 + 3 * 16 + 12, 4) == 1
    dev.bar_write(0, 0x1000 + 3 * 16, 4, 0xFEE0_0000)  # messages stay software's
    assert state.msix_messages[3] == (0xFEE0_0000, 0)
    dev.signal_msix(3)  # with a router the sink applies the state
    assert sink.events == [("msix", 3)]


@pytest.mark.parametrize(
    ("entries", "table", "pba"),
    [
        (0, 0, None),
        (2049, 0, None),
        (300, 0, None),
        (4, 0x3FF8, None),
        (4, 4, None),
        (4, 0, 0x20),
        (4, 0, 0x3FFC),
    ],
)
def test_msix_table_must_fit_its_bar(entries: int, table: int, pba: int | None) -> None:
    dev = EmulatedDevice(vendor_id=0x1234, device_id=0x22, class_code=0xFF0000)
    dev.add_bar(0, 0x1000 if entries == 300 else 0x4000)
    with pytest.raises(DeviceSetupError):
        dev.add_msix_capability(entries, bar=0, table_offset=table, pba_offset=pba)


def test_msix_messages_round_trip_and_are_checked() -> None:
    state = InterruptState()
    state.set_msix_message(2047, (1 << 64) - 1, 0xFFFF_FFFF)
    state.set_msix_message(0, 0xFEE0_0000, 1)
    saved = json.loads(json.dumps(state.save()))
    assert saved["msix_messages"] == [[0, 0xFEE0_0000, 1], [2047, (1 << 64) - 1, 0xFFFF_FFFF]]
    other = InterruptState()
    other.restore(saved)
    assert other.msix_messages == state.msix_messages
    for bad in ([[0, 0, 1 << 32]], [[2048, 1, 1]], [[1, 1, 1], [1, 2, 2]], [[1, 2]], {"1": 2}):
        with pytest.raises(InterruptStateError):
            other.restore({**saved, "msix_messages": bad})
    with pytest.raises(InterruptStateError):
        state.set_msix_message(2048, 0, 0)
