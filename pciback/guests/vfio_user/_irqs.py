"""Interrupts of a vfio-user client: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS on the IRQ router.

The device's interrupt state is its one :class:`~pciback.devices.InterruptState`,
changed only through the backend's :class:`~pciback.plane.irq.IrqRouter`, as
for a native guest: enabling INTx, MSI or MSI-X here is the router's
``enable`` (with its rules: one mode at a time, MSI vectors a power of two
up to what the device can use, MSI-X only with memory decode on), an INTx
UNMASK is its EOI, an MSI/MSI-X MASK/UNMASK its ``mask``. The router delivers
through this connection's :class:`~pciback.plane.irq.InterruptOutbox` (the
guest's rate limit, coalescing); :meth:`ClientInterrupts.deliver` writes the
client's trigger eventfd for the vector. Eventfds are checked to be eventfds
and written through :mod:`shared.evtchn`'s guard, so a client that makes one
blocking, full or closed never blocks the backend: a full counter coalesces,
a stalled write ends the connection.

ERR and REQ take an eventfd each (kept, never signalled: the backend reports
no AER errors and requests no release).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

import trio

from pciback._ratelog import ScopedLog
from pciback.guests.vfio_user._errors import ClientStalledError, CommandRefusedError
from pciback.plane.irq import InterruptError, InterruptOutbox, IrqRouter
from pciback.plane.registry import ServedDevice
from shared.evtchn import EventfdPort, EventfdStalledError
from shared.pci import CapId, MsixControl, Reg, msi_vectors_capable, walk_capabilities
from shared.protocol import IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX, InterruptEvent
from shared.protocol import vfio_user as vu

__all__ = ["ClientInterrupts"]

_MODE = {
    vu.PCI_INTX_IRQ: IRQ_MODE_INTX, vu.PCI_MSI_IRQ: IRQ_MODE_MSI, vu.PCI_MSIX_IRQ: IRQ_MODE_MSIX
}
_INDEX = {mode: index for index, mode in _MODE.items()}
_NAMES = ("INTx", "MSI", "MSI-X", "ERR", "REQ")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _eventfds(fds: Sequence[int]) -> list[EventfdPort]:
    """Wrap the client's descriptors as eventfd ports; refuses (closing all) anything else."""
    for fd in fds:
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            _close_all(fds)
            raise CommandRefusedError(
                errno.EBADF, f"a descriptor cannot be inspected: {exc.strerror}"
            ) from exc
        if kind != "anon_inode:[eventfd]":
            _close_all(fds)
            raise CommandRefusedError(
                errno.EINVAL, f"DEVICE_SET_IRQS with DATA_EVENTFD needs eventfds, not {kind!r}"
            )
    return [EventfdPort(fd) for fd in fds]


class ClientInterrupts:
    """The trigger eventfds of one vfio-user connection, and its interrupt operations."""

    def __init__(
        self,
        dev: ServedDevice,
        guest: str,
        router: IrqRouter,
        outbox: InterruptOutbox,
        events: ScopedLog,
    ) -> None:
        self.dev = dev
        self.guest = guest
        self.router = router
        self.outbox = outbox
        self.events = events
        #: Trigger eventfds by index, then vector.
        self.triggers: dict[int, dict[int, EventfdPort]] = {i: {} for i in range(vu.PCI_NUM_IRQS)}
        self._intx_masked = False
        self._intx_held = False
        #: Deliveries to a vector without an eventfd (dropped), and coalesced ones.
        self.dropped = 0

    @property
    def held_fds(self) -> int:
        return sum(len(ports) for ports in self.triggers.values())

    # -- DEVICE_GET_IRQ_INFO --------------------------------------------------------------

    def count(self, index: int) -> int:
        """How many interrupts ``index`` has on this device, as its guest sees it."""
        access = self.dev.access
        if index == vu.PCI_INTX_IRQ:
            return 1 if access.config_read(Reg.INTERRUPT_PIN, 1) else 0
        if index in (vu.PCI_MSI_IRQ, vu.PCI_MSIX_IRQ):
            cap_id = CapId.MSI if index == vu.PCI_MSI_IRQ else CapId.MSIX
            found = walk_capabilities(access.config_image()).find(cap_id)
            if found is None:
                return 0
            control = access.config_read(found.offset + 2, 2)
            if index == vu.PCI_MSI_IRQ:
                return msi_vectors_capable(control)
            return (control & MsixControl.TABLE_SIZE_MASK) + 1
        if index in (vu.PCI_ERR_IRQ, vu.PCI_REQ_IRQ):
            return 1
        raise CommandRefusedError(errno.EINVAL, f"interrupt index {index} does not exist (0-4)")

    def info(self, index: int) -> vu.IrqInfo:
        count = self.count(index)
        flags = vu.IRQ_INFO_EVENTFD
        if index == vu.PCI_INTX_IRQ:
            flags |= vu.IRQ_INFO_MASKABLE | vu.IRQ_INFO_AUTOMASKED
        elif index == vu.PCI_MSIX_IRQ:
            flags |= vu.IRQ_INFO_MASKABLE
        elif index == vu.PCI_MSI_IRQ:
            flags |= vu.IRQ_INFO_NORESIZE
        return vu.IrqInfo(index, flags, count)

    # -- DEVICE_SET_IRQS -------------------------------------------------------------------

    def set_irqs(self, req: vu.SetIrqs, fds: list[int]) -> None:
        """Carry out one DEVICE_SET_IRQS (under the device lock); owns ``fds``."""
        try:
            if req.data_type != vu.IRQ_DATA_EVENTFD and fds:
                raise CommandRefusedError(
                    errno.EINVAL, "DEVICE_SET_IRQS carries descriptors only with DATA_EVENTFD"
                )
            available = self.count(req.index)
            if req.start + req.count > available:
                raise CommandRefusedError(
                    errno.EINVAL, f"{_NAMES[req.index]} interrupts {req.start}.."
                    f"{req.start + req.count - 1} asked, but the device has {available}",
                )
            if req.data_type == vu.IRQ_DATA_EVENTFD and fds and len(fds) != req.count:
                raise CommandRefusedError(
                    errno.EINVAL, f"DEVICE_SET_IRQS for {req.count} interrupt(s) came with "
                    f"{len(fds)} descriptor(s); send one eventfd each, or none to de-assign",
                )
        except BaseException:
            _close_all(fds)
            raise
        if req.action == vu.IRQ_ACTION_TRIGGER:
            if req.disables_all:
                self._disable(req.index)
            elif req.data_type == vu.IRQ_DATA_EVENTFD:
                self._assign(req.index, req.start, req.count, _eventfds(fds) if fds else None)
            else:
                fire = req.data if req.data_type == vu.IRQ_DATA_BOOL else b"\1" * req.count
                for i, flag in enumerate(fire):
                    if flag:
                        self._signal(req.index, req.start + i)
            return
        masked = req.action == vu.IRQ_ACTION_MASK
        if req.data_type == vu.IRQ_DATA_EVENTFD:
            raise CommandRefusedError(
                errno.ENOTSUP, "masking with eventfds (irqfd-style) is not supported; use "
                "DATA_NONE or DATA_BOOL",
            )
        which = range(req.count) if req.data_type == vu.IRQ_DATA_NONE else [
            i for i, flag in enumerate(req.data) if flag
        ]
        for i in which:
            self._mask(req.index, req.start + i, masked)

    def _mode_of(self, index: int) -> int:
        mode = _MODE.get(index)
        if mode is None:
            raise CommandRefusedError(errno.EINVAL, f"{_NAMES[index]} cannot be masked")
        return mode

    def _disable(self, index: int) -> None:
        for port in self.triggers[index].values():
            port.close()
        self.triggers[index].clear()
        mode = _MODE.get(index)
        if mode is not None and self.router.device(self.dev).mode == mode:
            self.router.disable(self.dev, self.guest, mode)
        if index == vu.PCI_INTX_IRQ:
            self._intx_masked = self._intx_held = False

    def _assign(
        self, index: int, start: int, count: int, ports: list[EventfdPort] | None
    ) -> None:
        table = self.triggers[index]
        for vector in range(start, start + count):
            old = table.pop(vector, None)
            if old is not None:
                old.close()
        if ports is None:  # de-assign
            if not table:
                self._disable(index)
            return
        mode = _MODE.get(index)
        if mode is not None:
            self._enable(index, mode, start + count, ports)
        for i, port in enumerate(ports):
            table[start + i] = port

    def _enable(self, index: int, mode: int, needed: int, ports: list[EventfdPort]) -> None:
        state = self.router.device(self.dev)
        vectors = self.count(index) if mode == IRQ_MODE_MSIX else needed
        if mode == IRQ_MODE_MSI:
            vectors = 1 << (needed - 1).bit_length()
        if state.mode == mode and (mode != IRQ_MODE_MSI or state.vectors >= vectors):
            return
        try:
            if state.mode == mode:
                self.router.disable(self.dev, self.guest, mode)
            elif state.mode is not None:
                raise InterruptError(
                    f"{_NAMES[_INDEX[state.mode]]} is enabled; disable it (SET_IRQS count 0) "
                    f"before enabling {_NAMES[index]}"
                )
            self.router.enable(self.dev, self.outbox, mode, vectors)
        except InterruptError as exc:
            for port in ports:
                port.close()
            raise CommandRefusedError(errno.EINVAL, exc.message) from None

    def _mask(self, index: int, vector: int, masked: bool) -> None:
        if index == vu.PCI_INTX_IRQ:
            self._intx_masked = masked
            if not masked:
                # UNMASK is the end of interrupt: the line fires again if still asserted.
                self.router.eoi(self.dev, self.guest, 0)
                if self._intx_held:
                    self._intx_held = False
                    self._signal(index, 0)
            return
        self._mode_of(index)
        try:
            self.router.mask(self.dev, vector, masked)
        except InterruptError as exc:
            raise CommandRefusedError(errno.EINVAL, exc.message) from None

    # -- delivery -------------------------------------------------------------------------

    async def deliver(self, event: InterruptEvent) -> None:
        """The outbox's delivery: write the client's eventfd for the vector."""
        mode = self.router.device(self.dev).mode
        index = _INDEX.get(mode) if mode is not None else None
        if index is None:
            self.dropped += 1
            return
        if index == vu.PCI_INTX_IRQ and self._intx_masked:
            self._intx_held = True
            return
        self._signal(index, event.vector)

    def _signal(self, index: int, vector: int) -> None:
        port = self.triggers[index].get(vector)
        if port is None:
            self.dropped += 1
            return
        try:
            port.notify()
        except EventfdStalledError as exc:
            self.triggers[index].pop(vector).close()
            raise ClientStalledError(
                f"the client made {_NAMES[index]} vector {vector}'s eventfd block: {exc}"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.triggers[index].pop(vector).close()
            self.events.log(
                "unusable eventfds", logging.INFO,
                "guest %s: %s vector %d's eventfd is unusable (%s); it is dropped",
                self.guest, _NAMES[index], vector, exc,
            )

    def close(self) -> None:
        """Close every eventfd the client gave (the connection ended)."""
        for index in list(self.triggers):
            for port in self.triggers[index].values():
                port.close()
            self.triggers[index].clear()
