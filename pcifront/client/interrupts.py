"""Guest interrupts: ``async with dev.interrupts(mode="msi", vectors=1) as irqs``.

How an interrupt reaches the guest depends on the transport:

* ``unix:`` and ``shm:`` pass file descriptors, so the frontend makes one
  eventfd per vector, sends them with the ``InterruptEnableRequest``, and the
  backend signals a vector by writing 1 to its eventfd. The kernel counter
  coalesces: one read returns how many times the vector fired.
* Other transports get in-band ``InterruptEvent`` messages. The client's
  receive loop hands each to the active :class:`Interrupts` of its device
  without ever blocking: pending counts live in a table with one slot per
  vector, so the buffer is bounded by the vector count and a storm only makes
  the counts grow (nothing is dropped, nothing queues without bound).

Either way :meth:`Interrupts.receive` returns :class:`Interrupt` values whose
``count`` adds up to every time the vector fired. Interrupts for a device
whose ``interrupts()`` block is not active are counted (``stray``) and logged.

When the connection is lost, every active block ends: tasks waiting in
``receive()`` (and ``async for``, ``serve()``, ``eoi()``, ``mask()``) get
:class:`~pcifront.ResourceLostError`, never a silent end. A reconnect does
not re-enable them: the backend reset the device (see that error).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from pcifront.core.routes import BusLink
from pcifront.core.vectors import (
    Interrupt,
    VectorCounts,
    check_free,
    check_interrupt_args,
    check_mask_args,
)
from shared.errors import PcisplitError
from shared.evtchn import EventfdPort
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptMaskRequest,
    ValueReply,
)

__all__ = ["Interrupts", "open_interrupts"]

log = logging.getLogger("pcisplit.frontend.irq")

_EVENTFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class Interrupts(VectorCounts):
    """The interrupts of one device while its ``interrupts()`` block is active.

    Get one from :meth:`pcifront.Device.interrupts`; do not build it yourself.
    """

    def __init__(
        self, link: BusLink, device: object, packed: int, address: str, mode: str, vectors: int
    ) -> None:
        super().__init__(address, mode, vectors, lambda count: link.count_stray(packed, count))
        self._link = link
        self._device = device
        self._packed = packed
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def device(self) -> object:
        """The :class:`~pcifront.Device` whose interrupts these are."""
        return self._device

    def _wake(self) -> None:
        self._lot.unpark()

    # ------------------------------------------------------------------ guest API
    def receive_nowait(self) -> Interrupt:
        """The next pending interrupt, or :class:`trio.WouldBlock` if none is pending."""
        if self._closed:
            self._check_live()
            raise trio.ClosedResourceError("this interrupts() block has ended")
        irq = self._take()
        if irq is None:
            raise trio.WouldBlock
        return irq

    async def receive(self) -> Interrupt:
        """Wait for the next interrupt: its vector and how many times it fired."""
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while True:
            try:
                irq = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                parked = True
                continue
            if not parked:
                # Parking was a full checkpoint already; a second pass through the
                # scheduler would be one more on every interrupt's critical path.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return irq

    def __aiter__(self) -> Interrupts:
        return self

    async def __anext__(self) -> Interrupt:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    async def eoi(self, irq: Interrupt | int) -> None:
        """End of interrupt. INTx: unmask the line (it fires again if still asserted).

        MSI and MSI-X are edge-triggered, so this is a no-op for them.
        """
        vector = irq.vector if isinstance(irq, Interrupt) else irq
        self._check_live()
        if self._mode_code != IRQ_MODE_INTX:
            await trio.lowlevel.checkpoint()
            return
        packed = self._packed
        await self._link.call(lambda rid: InterruptEoiRequest(rid, packed, vector))
        self._eois += 1

    async def serve(
        self,
        handler: Callable[[Interrupt], Awaitable[object] | object],
        *,
        eoi: bool = True,
    ) -> None:
        """Run ``handler`` (plain or async) for every interrupt, then EOI it; forever.

        Cancel the surrounding scope (or leave the ``interrupts()`` block) to stop.
        An exception from the handler propagates and ends the loop; so does
        :class:`~pcifront.ResourceLostError` when the connection is lost.
        """
        while True:
            try:
                irq = await self.receive()
            except trio.ClosedResourceError:
                return
            result = handler(irq)
            if inspect.isawaitable(result):
                await result
            if eoi:
                await self.eoi(irq)

    async def mask(self, vector: int) -> None:
        """Mask one vector (MSI-X; MSI with per-vector masking). It stays pending while masked."""
        await self._mask(vector, True)

    async def unmask(self, vector: int) -> None:
        """Unmask one vector; an interrupt that fired while masked is delivered now."""
        await self._mask(vector, False)

    async def mask_function(self) -> None:
        """Set the MSI-X function mask: every vector is masked."""
        await self._mask(FUNCTION_MASK_VECTOR, True)

    async def unmask_function(self) -> None:
        """Clear the MSI-X function mask."""
        await self._mask(FUNCTION_MASK_VECTOR, False)

    async def _mask(self, vector: int, masked: bool) -> None:
        self._check_live()
        check_mask_args(self._mode_code, vector, self.vectors)
        packed = self._packed
        await self._link.call(lambda rid: InterruptMaskRequest(rid, packed, vector, masked))

    def _close(self) -> None:
        super()._close()
        self._lot.unpark_all()


async def _pump_eventfd(irqs: Interrupts, vector: int, port: EventfdPort) -> None:
    """Turn one vector's eventfd signals into arrivals; the counter is the coalesced count."""
    seen = 0
    while True:
        try:
            await port.wait()
        except trio.ClosedResourceError:
            return
        received = port.statistics().received
        irqs._post(vector, received - seen)
        seen = received


@asynccontextmanager
async def open_interrupts(
    link: BusLink, device: object, packed: int, address: str, mode: str, vectors: int
) -> AsyncIterator[Interrupts]:
    """Enable ``mode`` on a device for the block; disable it on the way out, always."""
    code = check_interrupt_args(mode, vectors, link.features)
    check_free(link, packed, address)
    use_eventfds = link.can_pass_fds
    ports: list[EventfdPort] = []
    try:
        if use_eventfds:
            ports = [EventfdPort(os.eventfd(0, _EVENTFD_FLAGS)) for _ in range(vectors)]
            fds = [port.fileno() for port in ports]
            reply = await link.call(
                lambda rid: InterruptEnableRequest(rid, packed, code, vectors, eventfds=True),
                fds=fds,
            )
        else:
            reply = await link.call(
                lambda rid: InterruptEnableRequest(rid, packed, code, vectors)
            )
    except BaseException:
        for port in ports:
            port.close()
        raise
    assert isinstance(reply, ValueReply)
    granted = reply.value
    irqs = Interrupts(link, device, packed, address, mode, max(1, min(granted, vectors)))
    irqs.delivery = "eventfd" if use_eventfds else "inband"
    link.attach_interrupts(packed, irqs)
    try:
        try:
            async with trio.open_nursery() as nursery:
                for vector, port in enumerate(ports[: irqs.vectors]):
                    nursery.start_soon(_pump_eventfd, irqs, vector, port, name=f"irq-{vector}")
                try:
                    yield irqs
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The pumps never raise, so a group holds only the body's own exception:
            # hand it back as it was raised, not wrapped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        link.detach_interrupts(packed, irqs)
        irqs._close()
        for port in ports:
            port.close()
        # Disable even when the block was cancelled or failed; shielded, with a bound.
        # A hot-unplugged device has nothing left to disable (the backend released it),
        # nor has a block whose connection was lost: a disable sent on a newer connection
        # would switch off whatever a newer block enabled there.
        with trio.CancelScope(shield=True), trio.move_on_after(link.disable_timeout):
            try:
                if not getattr(device, "removed", False) and irqs._lost is None:
                    await link.call(lambda rid: InterruptDisableRequest(rid, packed, code))
            except PcisplitError as exc:
                log.warning("%s: disabling %s interrupts failed: %s", address, mode, exc)
