"""A vfio-user server's interrupts: eventfds handed to the server, forwarded to the router.

The server signals an interrupt by writing an eventfd the client gave it
(DEVICE_SET_IRQS, DATA_EVENTFD, TRIGGER). :class:`ServerInterrupts` keeps
those eventfds per interrupt type and one task per eventfd that raises the
interrupt in the IRQ router (the device's :class:`InterruptSink`), so guests
get it through their event channels:

- INTx is armed when the device is attached, and again whenever MSI or MSI-X
  is turned off;
- when the guest's interrupt operations turn MSI or MSI-X on (the router
  enables the mode in the device's :class:`InterruptState`), INTx is disarmed
  and the server gets one eventfd per enabled vector; turning the mode off
  disarms it (SET_IRQS with count 0) and re-arms INTx. The server's eventfds
  are shared between the types (libvfio-user keeps one array), so only one
  type is ever armed, as the PCI rules have it.

:class:`ForwardingInterruptState` is the device's interrupt state with one
addition: it reports changes of mode and vector count, which is when the
server must be told.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import partial

import trio

from shared.protocol import IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX
from shared.protocol import vfio_user as vu

from ._base import DeviceContext
from ._irqstate import InterruptState
from ._vfio_user_client import VfioUserClient, VfioUserServerError

__all__ = ["ForwardingInterruptState", "ServerInterrupts"]

log = logging.getLogger("pcisplit.backend")

#: The vfio-user interrupt type of each pcisplit interrupt mode.
_INDEX_OF_MODE = {IRQ_MODE_INTX: vu.PCI_INTX_IRQ, IRQ_MODE_MSI: vu.PCI_MSI_IRQ,
                  IRQ_MODE_MSIX: vu.PCI_MSIX_IRQ}
_Change = Callable[[tuple[int | None, int], tuple[int | None, int]], None]


class ForwardingInterruptState(InterruptState):
    """An :class:`InterruptState` that calls ``on_change(old, new)`` with ``(mode, vectors)``
    whenever an operation changed either."""

    __slots__ = ("_on_change", "_seen")

    def __init__(self, on_change: _Change) -> None:
        self._on_change: _Change | None = None
        self._seen: tuple[int | None, int] = (None, 0)
        super().__init__()
        self._on_change = on_change

    def _changed(self) -> None:
        now = (self.mode, self.vectors)
        old, self._seen = self._seen, now
        if now != old and self._on_change is not None:
            self._on_change(old, now)

    def reset(self) -> None:
        super().reset()
        self._changed()

    def enable(
        self, mode: int, vectors: int, *, table_size: int = 0, mme: int | None = None
    ) -> bool:
        deliver = super().enable(mode, vectors, table_size=table_size, mme=mme)
        self._changed()
        return deliver

    def disable(self) -> None:
        super().disable()
        self._changed()

    def set_msi_mme(self, mme: int) -> None:
        super().set_msi_mme(mme)
        self._changed()

    def restore(self, saved: Mapping[str, object]) -> None:
        super().restore(saved)
        self._changed()


class ServerInterrupts:
    """The eventfds one vfio-user server signals, by interrupt type, and their watchers."""

    def __init__(self, client: VfioUserClient, irqs: Mapping[int, vu.IrqInfo], name: str) -> None:
        self.client = client
        self.irqs = dict(irqs)
        self.name = name
        self.ctx: DeviceContext | None = None
        #: Interrupt type (vfio-user index) -> the eventfds the server holds, by vector.
        self.armed: dict[int, list[int]] = {}
        self._watchers: dict[int, object] = {}  # fd -> the token of the task watching it
        #: Interrupts the server raised and the router was given.
        self.forwarded = 0

    def offered(self, index: int) -> int:
        """How many interrupts of type ``index`` the server signals through eventfds."""
        info = self.irqs.get(index)
        if info is None or not info.flags & vu.IRQ_INFO_EVENTFD:
            return 0
        return info.count

    def attach(self, ctx: DeviceContext) -> None:
        """Arm INTx (when the server has it) and watch."""
        self.ctx = ctx
        if self.offered(vu.PCI_INTX_IRQ):
            self._arm(vu.PCI_INTX_IRQ, 1)

    def rewatch(self) -> None:
        """Watch every armed eventfd again (the backend cancelled the device's tasks)."""
        self._watchers.clear()
        for index, fds in self.armed.items():
            for vector, fd in enumerate(fds):
                self._spawn(index, vector, fd)

    def mode_changed(self, old: tuple[int | None, int], new: tuple[int | None, int]) -> None:
        """The guest's interrupt mode changed: re-arm the server to match."""
        if self.ctx is None:
            return  # not served yet: nothing armed to change
        mode, vectors = new
        index = _INDEX_OF_MODE.get(mode) if mode is not None else None
        try:
            if index in (vu.PCI_MSI_IRQ, vu.PCI_MSIX_IRQ):
                count = min(vectors, self.offered(index))
                for other in [i for i in self.armed if i != index]:
                    self._disarm(other)
                if count and len(self.armed.get(index, ())) != count:
                    self._disarm(index)
                    self._arm(index, count)
            elif any(i != vu.PCI_INTX_IRQ for i in self.armed):
                for other in [i for i in self.armed if i != vu.PCI_INTX_IRQ]:
                    self._disarm(other)
                if self.offered(vu.PCI_INTX_IRQ):
                    self._arm(vu.PCI_INTX_IRQ, 1)
        except VfioUserServerError as exc:
            # The mode is the router's to decide; a server that cannot follow is logged.
            log.warning("vfio-user device %s: re-arming interrupts failed: %s", self.name, exc)

    def _arm(self, index: int, count: int) -> None:
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        step = max(1, self.client.conn.peer_caps.effective_max_msg_fds)
        try:
            for start in range(0, count, step):
                chunk = fds[start:start + step]
                self.client.set_irqs(
                    vu.SetIrqs(index, vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER, start,
                               len(chunk)),
                    fds=chunk,
                )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.armed[index] = fds
        for vector, fd in enumerate(fds):
            self._spawn(index, vector, fd)

    def _disarm(self, index: int) -> None:
        fds = self.armed.pop(index, [])
        try:
            if self.client.lost is None:
                self.client.set_irqs(
                    vu.SetIrqs(index, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_TRIGGER, 0, 0)
                )
        finally:
            _close_watched(fds)

    def _spawn(self, index: int, vector: int, fd: int) -> None:
        if self.ctx is None:
            return
        token = object()
        self._watchers[fd] = token
        try:
            self.ctx.spawn(partial(self._watch, index, vector, fd, token),
                           f"vfio-user irq {index}.{vector}")
        except RuntimeError:
            # The backend is stopping (its nursery takes no new tasks).
            log.debug("vfio-user device %s: not watched (the backend is stopping)", self.name)

    async def _watch(self, index: int, vector: int, fd: int, token: object) -> None:
        ctx = self.ctx
        assert ctx is not None
        maskable = bool(self.irqs[index].flags & (vu.IRQ_INFO_AUTOMASKED | vu.IRQ_INFO_MASKABLE))
        try:
            # The task may start after its eventfd was disarmed (and its number reused).
            while self.armed.get(index, [])[vector:vector + 1] == [fd]:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    return  # disarmed
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                async with ctx.locked():
                    if self.client.lost is not None:
                        return
                    self._deliver(ctx, index, vector)
                    if index == vu.PCI_INTX_IRQ and maskable:
                        self.client.set_irqs(vu.SetIrqs(
                            index, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_UNMASK, vector, 1
                        ))
        except VfioUserServerError as exc:
            log.warning("vfio-user device %s: interrupt forwarding stopped: %s", self.name, exc)
        finally:
            if self._watchers.get(fd) is token:
                del self._watchers[fd]

    def _deliver(self, ctx: DeviceContext, index: int, vector: int) -> None:
        sink = ctx.interrupts
        self.forwarded += 1
        if index == vu.PCI_INTX_IRQ:
            # An eventfd says "asserted" once; the router keeps the guest's event in
            # service until its EOI.
            sink.assert_intx()
            sink.deassert_intx()
        elif index == vu.PCI_MSI_IRQ:
            sink.signal_msi(vector)
        elif index == vu.PCI_MSIX_IRQ:
            sink.signal_msix(vector)

    def close(self) -> None:
        """Close every eventfd (their watchers end)."""
        for index in list(self.armed):
            _close_watched(self.armed.pop(index))


def _close_watched(fds: list[int]) -> None:
    for fd in fds:
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio.run: nobody can be waiting
        os.close(fd)
