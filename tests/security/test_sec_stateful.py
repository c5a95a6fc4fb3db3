"""Hypothesis state machines: the policy engine under any guest access sequence, and the
shm ring against a peer that rewrites its shared indices between operations.

(The honest ring machine is ``tests/shared/ring/test_ring_stateful.py``; the protocol
state machine is ``tests/shared/protocol/test_proto_stateful.py``.)
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pciback.devices import EduDevice, SnapshotDevice
from pciback.policy import PolicedDevice, PolicyConfig, Preset
from shared.errors import PcisplitError
from shared.ring import (
    RingConsumer,
    RingCorruptError,
    RingFullError,
    RingProducer,
    RingSpec,
    initialise_ring,
)

DUMPS = Path(__file__).resolve().parents[1] / "data" / "pcidata"
#: command.io | command.memory | command.bus_master: all a DEFAULT guest may change (XSA-120).
GUEST_COMMAND_BITS = 0x0007
#: Type 0 BARs and the expansion ROM: never written on the device by a guest.
BAR_RANGE = range(0x10, 0x28)
ROM_RANGE = range(0x30, 0x34)

PROVIDERS = {
    "edu": EduDevice,
    "nic": lambda: SnapshotDevice.from_dump(DUMPS / "eth_intel_82576_sriov.txt"),
    "gpu": lambda: SnapshotDevice.from_dump(DUMPS / "gpu_amd_fiji_rebar.txt"),
}


def _device_bytes(provider, rng: range) -> bytes:
    return bytes(provider.config_read(o, 1) for o in rng)


class PolicyMachine(RuleBasedStateMachine):
    """Any sequence of guest reads, writes and resets keeps what the policy protects."""

    @initialize(name=st.sampled_from(sorted(PROVIDERS)), preset=st.sampled_from(list(Preset)))
    def setup(self, name: str, preset: Preset) -> None:
        self.provider = PROVIDERS[name]()
        self.preset = preset
        self.dev = PolicedDevice(self.provider, PolicyConfig(preset=preset), guest="g", device="d")
        self.identity = self.provider.config_read(0, 4)
        self.command = self.provider.config_read(4, 2)
        self.bars = _device_bytes(self.provider, BAR_RANGE)
        self.rom = _device_bytes(self.provider, ROM_RANGE)
        self.initial_view = self.dev.guest_config_image()
        self.refused = 0

    @rule(
        offset=st.one_of(st.integers(0, 0x3F), st.integers(0x40, 0xFF), st.integers(0, 0xFFF)),
        size=st.sampled_from([1, 2, 4]),
        value=st.one_of(st.just(0xFFFFFFFF), st.just(0), st.integers(0, 0xFFFFFFFF)),
    )
    def write(self, offset: int, size: int, value: int) -> None:
        offset -= offset % size
        try:
            self.dev.config_write(offset, size, value & ((1 << (8 * size)) - 1))
        except PcisplitError:
            self.refused += 1

    @rule(offset=st.integers(0, 0x1003), size=st.sampled_from([1, 2, 3, 4, 8]))
    def read(self, offset: int, size: int) -> None:
        try:
            value = self.dev.config_read(offset, size)
        except PcisplitError:
            return
        assert 0 <= value < 1 << (8 * size)

    @rule()
    def reset(self) -> None:
        self.provider.reset()
        self.dev.reset()
        # After a reset the guest sees what it saw first, except what the device
        # itself keeps (a snapshot's registers are the device's own memory).
        assert self.dev.config_read(0, 4) == self.initial_view[0] | self.initial_view[1] << 8 | (
            self.initial_view[2] << 16 | self.initial_view[3] << 24
        )

    @invariant()
    def identity_never_changes(self) -> None:
        if hasattr(self, "provider"):
            assert self.provider.config_read(0, 4) == self.identity

    @invariant()
    def protected_bits_stay(self) -> None:
        if not hasattr(self, "provider"):
            return
        if self.preset is Preset.DEFAULT:
            now = self.provider.config_read(4, 2)
            assert (now ^ self.command) & ~GUEST_COMMAND_BITS == 0, (hex(self.command), hex(now))
        if self.preset is not Preset.PERMISSIVE:
            assert _device_bytes(self.provider, BAR_RANGE) == self.bars, "a BAR reached the device"
            assert _device_bytes(self.provider, ROM_RANGE) == self.rom, "the ROM BAR moved"


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(
    max_examples=20, stateful_step_count=30, deadline=None, derandomize=True
)


SIZE, MAX_RECORD = 4096, 1000
CTRL_PROD, CTRL_CONS = 0, 64


class HostileRingMachine(RuleBasedStateMachine):
    """Our consumer and producer ends while the peer's half of the control block is hostile.

    Whatever the peer writes, our consumer returns only records the honest producer
    wrote, in order, or raises RingCorruptError and stays broken; likewise our producer
    refuses a hostile consumer index instead of overwriting unread data.
    """

    @initialize()
    def setup(self) -> None:
        self.spec = RingSpec.standalone(SIZE, MAX_RECORD)
        self.buf = bytearray(self.spec.end)
        initialise_ring(self.buf, self.spec)
        self.prod = RingProducer(self.buf, self.spec)
        self.cons = RingConsumer(self.buf, self.spec)
        self.sent: deque[bytes] = deque()
        self.broken = False
        #: The peer moved an index: the records are then whatever it says they are.
        self.tampered = False

    @precondition(lambda self: not self.broken)
    @rule(frame=st.binary(max_size=300))
    def send(self, frame: bytes) -> None:
        try:
            self.prod.send_nowait(frame)
        except RingFullError:
            return
        except RingCorruptError:
            self.broken = True
            return
        self.sent.append(frame)

    @precondition(lambda self: not self.broken)
    @rule()
    def receive(self) -> None:
        try:
            got = self.cons.receive_nowait()
        except RingCorruptError:
            self.broken = True
            return
        if got is None:
            return
        assert len(got[0]) <= MAX_RECORD
        if not self.tampered:
            assert self.sent, f"consumer returned {got[0][:16]!r} that nobody sent"
            assert got[0] == self.sent.popleft()

    @rule(
        field=st.sampled_from([CTRL_PROD, CTRL_CONS, 4, 68]),
        value=st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([4, 8, 4096, 2**31])),
        relative=st.booleans(),
    )
    def peer_scribbles(self, field: int, value: int, relative: bool) -> None:
        current = int.from_bytes(self.buf[field : field + 4], "little")
        new = (current + value) & 0xFFFFFFFF if relative else value
        self.buf[field : field + 4] = new.to_bytes(4, "little")
        if field in (CTRL_PROD, CTRL_CONS) and new != current:
            # From here the FIFO model no longer holds; what still must: records within
            # max_record, typed errors only, and a broken ring stays broken.
            self.tampered = True

    @invariant()
    def broken_stays_broken(self) -> None:
        if getattr(self, "broken", False):
            try:
                self.cons.receive_nowait()
            except RingCorruptError:
                pass
            else:
                assert self.cons.broken or self.prod.broken, "a corrupt ring healed itself"

    def teardown(self) -> None:
        if hasattr(self, "prod"):
            self.prod.release()
            self.cons.release()


TestHostileRing = HostileRingMachine.TestCase
TestHostileRing.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True
)
