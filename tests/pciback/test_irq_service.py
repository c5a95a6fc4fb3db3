"""Interrupts through the whole backend: sessions, the dispatcher and the IRQ router.

A hand-driven frontend (``tests.support.rawguest.RawGuest``) speaks the protocol so
that every event the backend sends is visible, in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from pciback.testing import running_backend
from shared.errors import ErrorCode
from shared.pci import Reg
from shared.protocol import (
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    DmaMapRequest,
    ErrorReply,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptMaskRequest,
    ValueReply,
)
from tests.support import configs
from tests.support.configs import ONE_GUEST
from tests.support.rawguest import (
    EDU,
    FACTORIAL,
    IRQ_ACK,
    IRQ_RAISE,
    IRQ_STATUS,
    STATUS,
    RawGuest,
    raw_guest,
)

TWO_GUESTS = "[interrupts]\nmax_events_per_second = 10.0\nburst = 5\n" + configs.TWO_GUESTS


async def bar_write(g: RawGuest, offset: int, value: int) -> None:
    await g.ok(lambda rid: BarWriteRequest(rid, EDU, 0, offset, 4, value))


async def bar_read(g: RawGuest, offset: int) -> int:
    reply = await g.ok(lambda rid: BarReadRequest(rid, EDU, 0, offset, 4))
    assert isinstance(reply, ValueReply)
    return reply.value


async def enable(
    g: RawGuest, mode: int, vectors: int = 1, *, eventfds: bool = False
) -> ErrorReply | int:
    reply = await g.request(lambda rid: InterruptEnableRequest(rid, EDU, mode, vectors, eventfds))
    if isinstance(reply, ErrorReply):
        return reply
    assert isinstance(reply, ValueReply)
    return reply.value


@pytest.mark.parametrize("kind", ["memory", "unix"])
async def test_edu_intx_exact_event_sequence(kind: str, tmp_path: Path) -> None:
    async with (
        running_backend(ONE_GUEST, transports=(kind,), tmp=tmp_path) as rb,
        raw_guest(rb.address(kind), "guest0") as g,
    ):
        assert await enable(g, IRQ_MODE_INTX) == 1
        await bar_write(g, IRQ_RAISE, 0x1)
        await g.wait_interrupts(1)
        await bar_write(g, IRQ_RAISE, 0x2)  # still asserted and not EOI'd: no event
        await g.ok(lambda rid: InterruptEoiRequest(rid, EDU, 0))  # still asserted: fires again
        await g.wait_interrupts(2)
        assert await bar_read(g, IRQ_STATUS) == 0x3
        await bar_write(g, IRQ_ACK, 0x3)  # the ISR acks: the line drops
        await g.ok(lambda rid: InterruptEoiRequest(rid, EDU, 0))
        await bar_write(g, IRQ_RAISE, 0x4)  # new assertion after EOI: one event
        await g.wait_interrupts(3)
        await g.ok(lambda rid: ConfigReadRequest(rid, EDU, 0, 4))  # a full round trip later
        assert [(e.device, e.vector, e.count) for e in g.interrupts] == [(EDU, 0, 1)] * 3


async def test_edu_factorial_interrupt_with_msi() -> None:
    async with (
        running_backend(ONE_GUEST) as rb,
        raw_guest(rb.address("memory"), "guest0") as g,
    ):
        assert await enable(g, IRQ_MODE_MSI) == 1
        # The guest's view of the MSI capability shows the enable bit.
        control = await g.ok(lambda rid: ConfigReadRequest(rid, EDU, 0x40 + 2, 2))
        assert isinstance(control, ValueReply) and control.value & 0x1
        await bar_write(g, STATUS, 0x80)  # raise an interrupt when the factorial is done
        await bar_write(g, FACTORIAL, 10)
        (irq,) = await g.wait_interrupts(1)
        assert (irq.device, irq.vector) == (EDU, 0)
        assert await bar_read(g, IRQ_STATUS) == 0x01
        assert await bar_read(g, FACTORIAL) == 3628800
        assert await bar_read(g, STATUS) & 0x01 == 0
        await bar_write(g, IRQ_ACK, 0x01)
        await g.ok(lambda rid: InterruptEoiRequest(rid, EDU, 0))  # a no-op for MSI
        await g.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_MSI))
        control = await g.ok(lambda rid: ConfigReadRequest(rid, EDU, 0x40 + 2, 2))
        assert isinstance(control, ValueReply) and not control.value & 0x1


async def test_xsa157_sequences_over_the_wire() -> None:
    async with (
        running_backend(ONE_GUEST) as rb,
        raw_guest(rb.address("memory"), "guest0") as g,
    ):
        # Disabling what is off: harmless.
        for mode in (IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX):
            await g.ok(lambda rid, mode=mode: InterruptDisableRequest(rid, EDU, mode))
        assert await enable(g, IRQ_MODE_MSI) == 1
        twice = await enable(g, IRQ_MODE_MSI)
        assert isinstance(twice, ErrorReply) and twice.code is ErrorCode.INVALID_STATE
        assert "already enabled" in twice.message
        other = await enable(g, IRQ_MODE_INTX)
        assert isinstance(other, ErrorReply) and "MSI is enabled" in other.message
        msix = await enable(g, IRQ_MODE_MSIX)  # edu has no MSI-X at all
        assert isinstance(msix, ErrorReply) and msix.code is ErrorCode.INVALID_STATE
        mask = await g.request(lambda rid: InterruptMaskRequest(rid, EDU, 0, True))
        assert isinstance(mask, ErrorReply)  # edu's MSI has no per-vector masking
        await g.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_MSI))
        await g.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_MSI))
        assert await enable(g, IRQ_MODE_INTX) == 1  # now INTx may be enabled
        two = await enable(g, IRQ_MODE_MSI, 2)
        assert isinstance(two, ErrorReply)
        backend = rb.backend
        assert backend.irq.statistics().refused == 4


async def test_interrupts_on_a_device_of_another_guest_are_refused() -> None:
    async with (
        running_backend(TWO_GUESTS) as rb,
        raw_guest(rb.address("memory"), "alpha") as alpha,
        raw_guest(rb.address("memory"), "beta") as beta,
    ):
        assert await enable(beta, IRQ_MODE_MSI) == 1
        # alpha names an address that is not on its bus (beta's device is at 00:00.0 on
        # beta's bus only, so alpha's only way to reach it would be a second slot).
        for make in (
            lambda rid: InterruptEnableRequest(rid, 0x8, IRQ_MODE_MSI, 1),
            lambda rid: InterruptDisableRequest(rid, 0x8, IRQ_MODE_MSI),
            lambda rid: InterruptEoiRequest(rid, 0x8, 0),
            lambda rid: InterruptMaskRequest(rid, 0x8, 0, True),
        ):
            reply = await alpha.request(make)
            assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_FOUND
        # alpha disabling MSI on its own edu does not touch beta's.
        await alpha.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_MSI))
        await bar_write(beta, IRQ_RAISE, 1)
        await beta.wait_interrupts(1)
        assert alpha.interrupts == []


async def test_device_that_left_the_guest_never_interrupts_it() -> None:
    async with (
        running_backend(TWO_GUESTS) as rb,
        raw_guest(rb.address("memory"), "alpha") as alpha,
    ):
        assert await enable(alpha, IRQ_MODE_INTX) == 1
        registry = rb.backend.registry
        dev = registry.get("edu-a")
        registry.unassign("edu-a")
        # The model keeps raising (as a device mid-flight would); alpha hears nothing.
        dev.provider.bar_write(0, IRQ_RAISE, 4, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert alpha.interrupts == []
        reply = await alpha.request(lambda rid: InterruptEoiRequest(rid, EDU, 0))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.DEVICE_REMOVED
        assert rb.backend.irq.device(dev).bound_guest is None


async def test_storm_is_rate_limited_while_another_guest_keeps_its_service(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        running_backend(TWO_GUESTS) as rb,
        raw_guest(rb.address("memory"), "alpha") as alpha,
        raw_guest(rb.address("memory"), "beta") as beta,
    ):
        assert await enable(alpha, IRQ_MODE_MSI) == 1
        assert await enable(beta, IRQ_MODE_MSI) == 1
        start = trio.current_time()
        for _ in range(300):  # alpha's device storms: 300 MSIs as fast as the guest can ask
            await bar_write(alpha, IRQ_RAISE, 1)
        # beta is served normally meanwhile: a request and an interrupt, at once.
        assert await bar_read(beta, 0x00) == 0x010000ED
        await bar_write(beta, IRQ_RAISE, 1)
        with trio.fail_after(0.001):
            await beta.wait_interrupts(1)
        elapsed = trio.current_time() - start
        assert len(alpha.interrupts) <= 5 + 10 * elapsed + 1
        # Given time, everything arrives, coalesced: nothing is lost.
        await trio.sleep(10)
        assert sum(e.count for e in alpha.interrupts) == 300
        assert len(alpha.interrupts) <= 5 + 10 * (trio.current_time() - start) + 1


async def test_eventfds_and_shared_memory_refused_without_fd_passing() -> None:
    async with (
        running_backend(ONE_GUEST) as rb,
        raw_guest(rb.address("memory"), "guest0") as g,
    ):
        reply = await enable(g, IRQ_MODE_INTX, eventfds=True)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_IMPLEMENTED
        assert "eventfds=False" in reply.message
        mapped = await g.request(lambda rid: DmaMapRequest(rid, 4096, True, True))
        assert isinstance(mapped, ErrorReply) and mapped.code is ErrorCode.NOT_IMPLEMENTED
        assert "shared=False" in mapped.message


async def test_eventfd_interrupts_over_unix(tmp_path: Path) -> None:
    async with (
        running_backend(ONE_GUEST, transports=("unix",), tmp=tmp_path) as rb,
        raw_guest(rb.address("unix"), "guest0") as g,
    ):
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            reply = await g.request(
                lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True), [efd]
            )
            assert isinstance(reply, ValueReply) and reply.value == 1
            await bar_write(g, IRQ_RAISE, 1)
            await bar_write(g, IRQ_RAISE, 2)  # level still high and not EOI'd
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) == 1
            await g.ok(lambda rid: InterruptEoiRequest(rid, EDU, 0))  # still asserted
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(efd)
            assert os.eventfd_read(efd) == 1
            assert g.interrupts == []  # nothing in-band
            # A non-eventfd instead of an eventfd is refused (and not kept).
            await g.ok(lambda rid: InterruptDisableRequest(rid, EDU, IRQ_MODE_INTX))
            r, w = os.pipe()
            reply = await g.request(
                lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True), [r]
            )
            assert isinstance(reply, ErrorReply) and "eventfd" in reply.message
            os.close(r)
            os.close(w)
            wrong = await g.request(
                lambda rid: InterruptEnableRequest(rid, EDU, IRQ_MODE_INTX, 1, True), []
            )
            assert isinstance(wrong, ErrorReply) and "1 vector" in wrong.message
        finally:
            os.close(efd)


async def test_disconnect_drops_the_bindings() -> None:
    async with running_backend(ONE_GUEST) as rb:
        async with raw_guest(rb.address("memory"), "guest0") as g:
            assert await enable(g, IRQ_MODE_INTX) == 1
        dev = rb.backend.registry.get("edu0")
        await trio.testing.wait_all_tasks_blocked()  # the backend noticed the close
        assert rb.backend.sessions == []
        assert rb.backend.irq.device(dev).bound_guest is None
        assert rb.backend.irq.device(dev).mode is None
        # A new connection may enable again (nothing was left on).
        async with raw_guest(rb.address("memory"), "guest0") as g2:
            assert await enable(g2, IRQ_MODE_INTX) == 1
            assert (await g2.ok(lambda rid: ConfigReadRequest(rid, EDU, Reg.COMMAND, 2)))
