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
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from pcifront._errors import NotImplementedOpError
from shared.errors import ErrorCode, PcisplitError
from shared.evtchn import EventfdPort
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    MAX_MSIX_VECTORS,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptMaskRequest,
    ValueReply,
)

if TYPE_CHECKING:
    from pcifront._client import Bus, Device

__all__ = [
    "Interrupt",
    "Interrupts",
    "InterruptStatistics",
    "InterruptModeError",
    "MODES",
]

log = logging.getLogger("pcisplit.frontend.irq")

#: Mode names accepted by :meth:`Device.interrupts`.
MODES = {"intx": IRQ_MODE_INTX, "msi": IRQ_MODE_MSI, "msix": IRQ_MODE_MSIX}
_EVENTFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class InterruptModeError(PcisplitError, ValueError):
    """A bad ``mode``/``vectors`` argument, or an operation the mode does not have."""

    code = ErrorCode.INVALID_STATE


@dataclass(frozen=True, slots=True)
class Interrupt:
    """``vector`` fired ``count`` times (coalesced) since it was last received."""

    vector: int
    count: int


@dataclass(frozen=True, slots=True)
class InterruptStatistics:
    """Counters of one :class:`Interrupts` block.

    ``fired``: total of all counts that arrived (every time a vector fired).
    ``delivered``: :class:`Interrupt` values handed out by :meth:`Interrupts.receive`.
    ``coalesced``: arrivals merged into an interrupt already pending for that vector.
    ``eois``: EOIs sent to the backend.
    """

    fired: int
    delivered: int
    coalesced: int
    eois: int
    pending_vectors: int


class Interrupts:
    """The interrupts of one device while its ``interrupts()`` block is active.

    Get one from :meth:`pcifront.Device.interrupts`; do not build it yourself.
    """

    def __init__(self, device: Device, mode: str, vectors: int) -> None:
        self._device = device
        self.mode = mode
        self._mode_code = MODES[mode]
        #: Vectors the backend granted (may be fewer than asked for MSI).
        self.vectors = vectors
        #: ``"eventfd"`` or ``"inband"``: how interrupts travel.
        self.delivery = "inband"
        self._counts = [0] * vectors
        self._ready: deque[int] = deque()  # vectors with a non-zero count, in arrival order
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._fired = 0
        self._delivered = 0
        self._coalesced = 0
        self._eois = 0

    @property
    def device(self) -> Device:
        return self._device

    # ------------------------------------------------------------------ arrivals
    def _post(self, vector: int, count: int) -> None:
        """Record that ``vector`` fired ``count`` times. Never blocks; counts add up."""
        if not 0 <= vector < self.vectors:
            log.warning(
                "%s: interrupt on vector %d, outside the %d enabled; counted as stray",
                self._device.address, vector, self.vectors,
            )
            self._device._bus._count_stray(self._device, count)
            return
        self._fired += count
        if self._counts[vector]:
            self._coalesced += count
        else:
            self._coalesced += count - 1
            self._ready.append(vector)
            self._lot.unpark()
        self._counts[vector] += count

    # ------------------------------------------------------------------ guest API
    def receive_nowait(self) -> Interrupt:
        """The next pending interrupt, or :class:`trio.WouldBlock` if none is pending."""
        if self._closed:
            raise trio.ClosedResourceError("this interrupts() block has ended")
        if not self._ready:
            raise trio.WouldBlock
        vector = self._ready.popleft()
        count, self._counts[vector] = self._counts[vector], 0
        self._delivered += 1
        return Interrupt(vector, count)

    async def receive(self) -> Interrupt:
        """Wait for the next interrupt: its vector and how many times it fired."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                irq = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
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
        if self._mode_code != IRQ_MODE_INTX:
            await trio.lowlevel.checkpoint()
            return
        dev = self._device
        await dev._bus._call(lambda rid: InterruptEoiRequest(rid, dev._packed, vector))
        self._eois += 1

    async def serve(
        self,
        handler: Callable[[Interrupt], Awaitable[object] | object],
        *,
        eoi: bool = True,
    ) -> None:
        """Run ``handler`` (plain or async) for every interrupt, then EOI it; forever.

        Cancel the surrounding scope (or leave the ``interrupts()`` block) to stop.
        An exception from the handler propagates and ends the loop.
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
        if self._mode_code == IRQ_MODE_INTX:
            raise InterruptModeError(
                "INTx has no vector masks; use eoi() to unmask the line, or MSI/MSI-X"
            )
        if vector == FUNCTION_MASK_VECTOR and self._mode_code != IRQ_MODE_MSIX:
            raise InterruptModeError("only MSI-X has a function mask")
        if vector != FUNCTION_MASK_VECTOR and not 0 <= vector < self.vectors:
            raise InterruptModeError(
                f"vector {vector} is outside the {self.vectors} enabled vector(s)"
            )
        dev = self._device
        await dev._bus._call(lambda rid: InterruptMaskRequest(rid, dev._packed, vector, masked))

    def pending(self, vector: int) -> int:
        """How many times ``vector`` fired since it was last received (0: nothing pending)."""
        return self._counts[vector]

    def statistics(self) -> InterruptStatistics:
        return InterruptStatistics(
            fired=self._fired,
            delivered=self._delivered,
            coalesced=self._coalesced,
            eois=self._eois,
            pending_vectors=len(self._ready),
        )

    def _close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def __repr__(self) -> str:
        return (
            f"<Interrupts {self._device.address} {self.mode} x{self.vectors} "
            f"via {self.delivery}>"
        )


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
async def open_interrupts(device: Device, mode: str, vectors: int) -> AsyncIterator[Interrupts]:
    """Enable ``mode`` on ``device`` for the block; disable it on the way out, always."""
    if mode not in MODES:
        raise InterruptModeError(f"unknown interrupt mode {mode!r}; use 'intx', 'msi' or 'msix'")
    if isinstance(vectors, bool) or not isinstance(vectors, int):
        raise InterruptModeError(f"vectors must be an int, not {vectors!r}")
    if not 1 <= vectors <= MAX_MSIX_VECTORS:
        raise InterruptModeError(f"vectors must be 1..{MAX_MSIX_VECTORS}, not {vectors}")
    if mode == "intx" and vectors != 1:
        raise InterruptModeError("INTx has exactly one vector; pass vectors=1")
    if mode == "msi" and (vectors > 32 or vectors & (vectors - 1)):
        raise InterruptModeError(f"MSI grants a power of two up to 32 vectors, not {vectors}")
    bus: Bus = device._bus
    if "interrupts" not in bus.features:
        raise NotImplementedOpError(
            ErrorCode.NOT_IMPLEMENTED,
            "the backend did not offer the 'interrupts' feature; upgrade pciback",
        )
    bus._check_no_interrupts(device)
    code = MODES[mode]
    packed = device._packed
    use_eventfds = bus.transport.can_pass_fds
    ports: list[EventfdPort] = []
    try:
        if use_eventfds:
            ports = [EventfdPort(os.eventfd(0, _EVENTFD_FLAGS)) for _ in range(vectors)]
            fds = [port.fileno() for port in ports]
            reply = await bus._call(
                lambda rid: InterruptEnableRequest(rid, packed, code, vectors, eventfds=True),
                fds=fds,
            )
        else:
            reply = await bus._call(
                lambda rid: InterruptEnableRequest(rid, packed, code, vectors)
            )
    except BaseException:
        for port in ports:
            port.close()
        raise
    assert isinstance(reply, ValueReply)
    granted = reply.value
    irqs = Interrupts(device, mode, max(1, min(granted, vectors)))
    irqs.delivery = "eventfd" if use_eventfds else "inband"
    bus._attach_interrupts(device, irqs)
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
        bus._detach_interrupts(device, irqs)
        irqs._close()
        for port in ports:
            port.close()
        # Disable even when the block was cancelled or failed; shielded, with a bound.
        # A hot-unplugged device has nothing left to disable (the backend released it).
        with trio.CancelScope(shield=True), trio.move_on_after(bus._disable_timeout):
            try:
                if not device.removed:
                    await bus._call(lambda rid: InterruptDisableRequest(rid, packed, code))
            except PcisplitError as exc:
                log.warning("%s: disabling %s interrupts failed: %s", device.address, mode, exc)
