"""The IRQ router: INTx level semantics, MSI/MSI-X masks and pending bits, XSA-157 rules,
ownership, and per-guest rate limits. Driven directly, with no connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from pciback.config import parse_config
from pciback.devices import EmulatedDevice
from pciback.plane.irq import (
    InterruptError,
    InterruptLimits,
    InterruptOutbox,
    IrqRouter,
    TokenBucket,
)
from pciback.plane.registry import MODELS, DeviceRegistry, ServedDevice
from shared.errors import ErrorCode
from shared.pci import CapId, Command, MsiControl, Reg
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    InterruptEvent,
)
from tests.support.configs import device_table, edu_config

EDU_RAISE, EDU_ACK, EDU_STATUS = 0x60, 0x64, 0x24


class MsixModel(EmulatedDevice):
    """A test device with an MSI-X table of ``table`` entries and a 4-vector maskable MSI."""

    def __init__(self, table: int = 64) -> None:
        super().__init__(
            vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000, interrupt_pin=1
        )
        self.add_bar(0, 0x10000)
        body = (table - 1).to_bytes(2, "little") + (0).to_bytes(4, "little")
        body += (0x8000).to_bytes(4, "little")  # PBA in BAR0 at 0x8000
        control_mask = (0xC000).to_bytes(2, "little")  # enable and function mask
        self.add_capability(CapId.MSIX, body, writable_mask=control_mask + bytes(8))
        self.add_msi_capability(4, per_vector_mask=True)


MODELS.setdefault("irq-test-msix", MsixModel)
MODELS.setdefault("irq-test-msix2048", lambda: MsixModel(2048))

CONFIG = (
    edu_config(["alpha", "beta"], {"edu-a": "alpha"})
    + device_table("msix-a", "alpha", model="irq-test-msix")
    + device_table("big-a", "alpha", model="irq-test-msix2048")
    + device_table("edu-b", "beta")
)


@dataclass
class Rig:
    registry: DeviceRegistry
    router: IrqRouter
    outboxes: dict[str, InterruptOutbox]
    events: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)

    def dev(self, name: str) -> ServedDevice:
        return self.registry.get(name)

    def packed(self, name: str) -> int:
        address = self.dev(name).address
        assert address is not None
        return address.pack()

    def enable(self, name: str, mode: int, vectors: int = 1) -> int:
        dev = self.dev(name)
        assert dev.guest is not None
        return self.router.enable(dev, self.outboxes[dev.guest], mode, vectors)

    def bar_write(self, name: str, offset: int, value: int) -> None:
        self.dev(name).access.bar_write(0, offset, 4, value)


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[Rig]:
    yield await make_rig(nursery, InterruptLimits())


async def make_rig(nursery: trio.Nursery, limits: InterruptLimits) -> Rig:
    registry = DeviceRegistry(parse_config(CONFIG))
    router = IrqRouter(limits)
    registry.release_hooks.append(router.reset_device)
    for dev in registry:
        dev.start(nursery, interrupts=router.device(dev))
    rig = Rig(registry, router, {})
    for guest in ("alpha", "beta"):
        outbox = router.outbox(guest)
        rig.outboxes[guest] = outbox
        log: list[tuple[int, int, int]] = []
        rig.events[guest] = log

        async def send(event: InterruptEvent, log: list[tuple[int, int, int]] = log) -> None:
            log.append((event.device, event.vector, event.count))

        nursery.start_soon(outbox.run, send)
    return rig


# -- INTx: level-triggered with late EOI ----------------------------------------------------


async def test_intx_level_semantics_exact_sequence(rig: Rig) -> None:
    edu = rig.packed("edu-a")
    events = rig.events["alpha"]
    assert rig.enable("edu-a", IRQ_MODE_INTX) == 1

    rig.bar_write("edu-a", EDU_RAISE, 0x1)  # line asserted: one event
    await trio.testing.wait_all_tasks_blocked()
    assert events == [(edu, 0, 1)]

    rig.bar_write("edu-a", EDU_RAISE, 0x2)  # still asserted, not EOI'd: nothing new
    await trio.testing.wait_all_tasks_blocked()
    assert events == [(edu, 0, 1)]

    rig.router.eoi(rig.dev("edu-a"), "alpha", 0)  # EOI while still asserted: fires again
    await trio.testing.wait_all_tasks_blocked()
    assert events == [(edu, 0, 1), (edu, 0, 1)]

    rig.bar_write("edu-a", EDU_ACK, 0x3)  # the ISR acks both bits: line released
    rig.router.eoi(rig.dev("edu-a"), "alpha", 0)  # EOI after release: nothing
    await trio.testing.wait_all_tasks_blocked()
    assert events == [(edu, 0, 1), (edu, 0, 1)]

    rig.router.eoi(rig.dev("edu-a"), "alpha", 0)  # spurious EOI: harmless, counted
    assert rig.router.device(rig.dev("edu-a")).stats.spurious_eoi == 1

    rig.bar_write("edu-a", EDU_RAISE, 0x4)  # a new assertion after EOI: one event
    await trio.testing.wait_all_tasks_blocked()
    assert events == [(edu, 0, 1)] * 3
    assert rig.events["beta"] == []


async def test_intx_already_asserted_fires_on_enable(rig: Rig) -> None:
    rig.bar_write("edu-a", EDU_RAISE, 0x1)  # asserted before anyone listens
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == []
    rig.enable("edu-a", IRQ_MODE_INTX)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == [(rig.packed("edu-a"), 0, 1)]


async def test_intx_eoi_of_other_vector_refused(rig: Rig) -> None:
    rig.enable("edu-a", IRQ_MODE_INTX)
    with pytest.raises(InterruptError):
        rig.router.eoi(rig.dev("edu-a"), "alpha", 1)


# -- MSI --------------------------------------------------------------------------------


async def test_edu_msi_enable_reaches_model_and_guest_view(rig: Rig) -> None:
    dev = rig.dev("edu-a")
    edu = dev.provider
    assert isinstance(edu, EmulatedDevice)
    assert not edu.msi_enabled
    rig.enable("edu-a", IRQ_MODE_MSI)
    assert edu.msi_enabled  # the model signals MSI from now on
    policed = dev.access.policed  # type: ignore[attr-defined]
    state = policed.msi_state()
    assert state.enabled and state.vectors_enabled == 1
    assert dev.access.config_read(state.offset + 2, 2) & MsiControl.ENABLE

    rig.bar_write("edu-a", EDU_RAISE, 0x1)
    rig.bar_write("edu-a", EDU_RAISE, 0x1)  # edge-triggered: each raise is a message
    await trio.testing.wait_all_tasks_blocked()
    total = sum(count for _, _, count in rig.events["alpha"])
    assert total == 2
    assert {(d, v) for d, v, _ in rig.events["alpha"]} == {(rig.packed("edu-a"), 0)}

    rig.router.disable(dev, "alpha", IRQ_MODE_MSI)
    assert not edu.msi_enabled
    assert not policed.msi_state().enabled


async def test_multi_message_msi(rig: Rig) -> None:
    dev = rig.dev("msix-a")
    assert rig.enable("msix-a", IRQ_MODE_MSI, 4) == 4
    model = dev.provider
    assert isinstance(model, MsixModel)
    for vector in (3, 0, 2):
        model.signal_msi(vector)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == [(rig.packed("msix-a"), v, 1) for v in (3, 0, 2)]
    # A per-vector-maskable MSI can be masked like MSI-X.
    rig.router.mask(dev, 1, True)
    model.signal_msi(1)
    await trio.testing.wait_all_tasks_blocked()
    assert len(rig.events["alpha"]) == 3
    rig.router.mask(dev, 1, False)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"][-1] == (rig.packed("msix-a"), 1, 1)


# -- MSI-X ------------------------------------------------------------------------------


def _memory_on(rig: Rig, name: str) -> None:
    rig.dev(name).access.config_write(Reg.COMMAND, 2, Command.MEMORY)


async def test_msix_mask_pending_unmask(rig: Rig) -> None:
    _memory_on(rig, "msix-a")
    dev = rig.dev("msix-a")
    model = dev.provider
    assert isinstance(model, MsixModel)
    packed = rig.packed("msix-a")
    state = rig.router.device(dev)
    assert rig.enable("msix-a", IRQ_MODE_MSIX, 8) == 8
    assert dev.access.policed.msix_state().enabled  # type: ignore[attr-defined]

    rig.router.mask(dev, 5, True)
    model.signal_msix(5)
    model.signal_msix(5)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == []
    assert state.pending_bits() == 1 << 5  # the PBA bit, set once however often it fired

    model.signal_msix(6)  # other vectors are unaffected
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == [(packed, 6, 1)]

    rig.router.mask(dev, 5, False)  # unmask: the pending vector is delivered, bit cleared
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == [(packed, 6, 1), (packed, 5, 1)]
    assert state.pending_bits() == 0

    rig.router.mask(dev, FUNCTION_MASK_VECTOR, True)  # function mask holds everything
    assert dev.access.policed.msix_state().function_masked  # type: ignore[attr-defined]
    model.signal_msix(1)
    model.signal_msix(2)
    await trio.testing.wait_all_tasks_blocked()
    assert len(rig.events["alpha"]) == 2
    assert state.pending_bits() == 0b110
    rig.router.mask(dev, 2, True)  # still masked per vector when the function unmasks
    rig.router.mask(dev, FUNCTION_MASK_VECTOR, False)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"][2:] == [(packed, 1, 1)]
    assert state.pending_bits() == 0b100


async def test_msix_table_size_checked_on_every_index(rig: Rig) -> None:
    _memory_on(rig, "msix-a")
    dev = rig.dev("msix-a")
    model = dev.provider
    assert isinstance(model, MsixModel)
    rig.enable("msix-a", IRQ_MODE_MSIX, 4)
    for bad in (64, 65, 2047):
        with pytest.raises(InterruptError) as info:
            rig.router.mask(dev, bad, True)
        assert info.value.code is ErrorCode.INVALID_OFFSET
        with pytest.raises(InterruptError):
            model.signal_msix(bad)
    with pytest.raises(InterruptError):
        rig.router.eoi(dev, "alpha", 4)  # beyond the enabled vectors
    # Inside the table but not enabled: masking is allowed, firing delivers nothing.
    rig.router.mask(dev, 10, True)
    model.signal_msix(10)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == []
    assert rig.router.device(dev).stats.dropped_disabled == 1


async def test_msix_2048_vectors(rig: Rig) -> None:
    _memory_on(rig, "big-a")
    dev = rig.dev("big-a")
    model = dev.provider
    assert isinstance(model, MsixModel)
    assert rig.enable("big-a", IRQ_MODE_MSIX, 2048) == 2048
    rig.router.mask(dev, 2047, True)
    model.signal_msix(2047)
    model.signal_msix(1500)
    assert rig.router.device(dev).pending_bits() == 1 << 2047
    rig.router.mask(dev, 2047, False)
    await trio.testing.wait_all_tasks_blocked()
    packed = rig.packed("big-a")
    assert rig.events["alpha"] == [(packed, 1500, 1), (packed, 2047, 1)]


# -- XSA-157 enable/disable rules -----------------------------------------------------------


async def test_enable_twice_is_a_clear_error(rig: Rig) -> None:
    rig.enable("edu-a", IRQ_MODE_MSI)
    with pytest.raises(InterruptError) as info:
        rig.enable("edu-a", IRQ_MODE_MSI)
    assert info.value.code is ErrorCode.INVALID_STATE
    assert "already enabled" in info.value.message
    assert rig.router.device(rig.dev("edu-a")).mode == IRQ_MODE_MSI  # unchanged


async def test_disable_of_a_mode_that_is_off_is_harmless(rig: Rig) -> None:
    dev = rig.dev("edu-a")
    assert rig.router.disable(dev, "alpha", IRQ_MODE_MSIX) is False
    assert rig.router.disable(dev, "alpha", IRQ_MODE_MSI) is False
    rig.enable("edu-a", IRQ_MODE_INTX)
    assert rig.router.disable(dev, "alpha", IRQ_MODE_MSI) is False  # INTx stays on
    assert rig.router.device(dev).mode == IRQ_MODE_INTX
    assert rig.router.disable(dev, "alpha", IRQ_MODE_INTX) is True
    assert rig.router.disable(dev, "alpha", IRQ_MODE_INTX) is False


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        (IRQ_MODE_INTX, IRQ_MODE_MSI, "INTx is enabled"),
        (IRQ_MODE_MSI, IRQ_MODE_MSIX, "MSI is enabled"),
        (IRQ_MODE_MSIX, IRQ_MODE_INTX, "MSI-X is enabled"),
        (IRQ_MODE_MSIX, IRQ_MODE_MSI, "MSI-X is enabled"),
    ],
)
async def test_modes_are_mutually_exclusive(rig: Rig, first: int, second: int, named: str) -> None:
    _memory_on(rig, "msix-a")
    rig.enable("msix-a", first)
    with pytest.raises(InterruptError) as info:
        rig.enable("msix-a", second)
    assert named in info.value.message
    assert info.value.code is ErrorCode.INVALID_STATE


async def test_msix_needs_memory_decode(rig: Rig) -> None:
    # Firmware turned memory decode on at assignment; the guest turns it off.
    rig.dev("msix-a").access.config_write(Reg.COMMAND, 2, 0)
    with pytest.raises(InterruptError) as info:
        rig.enable("msix-a", IRQ_MODE_MSIX, 1)
    assert "memory decode" in info.value.message
    _memory_on(rig, "msix-a")
    assert rig.enable("msix-a", IRQ_MODE_MSIX, 1) == 1


@pytest.mark.parametrize(("name", "vectors"), [("msix-a", 3), ("msix-a", 8), ("edu-a", 2)])
async def test_msi_vectors_power_of_two_within_capability(
    rig: Rig, name: str, vectors: int
) -> None:
    with pytest.raises(InterruptError) as info:
        rig.enable(name, IRQ_MODE_MSI, vectors)
    assert "power of two" in info.value.message


async def test_msix_more_vectors_than_table_refused(rig: Rig) -> None:
    _memory_on(rig, "msix-a")
    with pytest.raises(InterruptError) as info:
        rig.enable("msix-a", IRQ_MODE_MSIX, 65)
    assert "64 entries" in info.value.message


async def test_guest_triggered_warnings_are_rate_limited(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.enable("edu-a", IRQ_MODE_MSI)
    for _ in range(100):
        with pytest.raises(InterruptError):
            rig.enable("edu-a", IRQ_MODE_MSI)
    stats = rig.router.statistics()
    burst = rig.router.limits.warning_burst
    assert stats.refused == 100
    assert stats.warnings_logged == burst
    assert stats.warnings_suppressed == 100 - burst
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == burst


# -- ownership --------------------------------------------------------------------------------


async def test_device_that_left_the_guest_never_interrupts_it(rig: Rig) -> None:
    rig.enable("edu-a", IRQ_MODE_MSI)
    dev = rig.dev("edu-a")
    rig.registry.unassign("edu-a")
    rig.registry.assign("edu-a", "beta")
    model = dev.provider
    assert isinstance(model, EmulatedDevice)
    # Whatever the model still does, alpha hears nothing.
    rig.router.device(dev).signal_msi(0)
    rig.router.device(dev).assert_intx()
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == []
    assert rig.events["beta"] == []  # beta has not enabled anything
    assert rig.router.device(dev).bound_guest is None


async def test_stale_binding_is_dropped_on_delivery(rig: Rig) -> None:
    """Even without the release hook, the owner is checked on every delivery."""
    rig.enable("edu-a", IRQ_MODE_MSI)
    dev = rig.dev("edu-a")
    rig.registry.release_hooks.clear()
    rig.registry.unassign("edu-a")
    rig.router.device(dev).mode = IRQ_MODE_MSI  # as if the reset had left it on
    rig.router.device(dev).vectors = 1
    rig.router.device(dev).signal_msi(0)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["alpha"] == []
    assert rig.router.device(dev).stats.dropped_not_owner == 1


# -- coalescing and rate limits -------------------------------------------------------------


async def test_storm_is_coalesced_and_rate_limited_per_guest(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    rig = await make_rig(nursery, InterruptLimits(max_events_per_second=10.0, burst=5))
    _memory_on(rig, "big-a")
    rig.enable("big-a", IRQ_MODE_MSIX, 100)
    rig.enable("edu-b", IRQ_MODE_MSI)
    storm = rig.dev("big-a").provider
    assert isinstance(storm, MsixModel)
    start = trio.current_time()
    for _ in range(100):  # 10,000 raises on 100 vectors
        for vector in range(100):
            storm.signal_msix(vector)
    await trio.testing.wait_all_tasks_blocked()
    # Only the burst went out at once; every raise is accounted for in the counts.
    assert len(rig.events["alpha"]) == 5
    # beta is untouched by alpha's storm: its interrupt is delivered at once.
    rig.bar_write("edu-b", EDU_RAISE, 1)
    await trio.testing.wait_all_tasks_blocked()
    assert rig.events["beta"] == [(rig.packed("edu-b"), 0, 1)]
    # Ten more seconds: ten events per second.
    await trio.sleep(10)
    sent = rig.events["alpha"]
    assert 100 <= len(sent) <= 106
    assert trio.current_time() - start == pytest.approx(10)
    assert sum(count for _, _, count in sent) == 10_000  # nothing lost
    assert rig.outboxes["alpha"].backlog == 0


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1, lambda: 0.0)
