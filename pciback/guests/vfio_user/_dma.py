"""DMA of a vfio-user client: DMA_MAP/DMA_UNMAP into the guest's DMA windows, DMA_READ/WRITE.

The client's memory becomes windows of the guest's :class:`~pciback.plane.dma.GuestDma`,
the same machinery the native protocol uses, at the client's own IOVAs: a
device model's ``dma_read``/``dma_write`` reaches them and nothing else (a
range outside every window, or crossing a window's end, is a fault). A map
that comes with a descriptor is the client's shared memory (checked as for
native shared windows: a regular file sealed against shrinking, mapped from
the given page-aligned offset); one without is reached through DMA_READ and
DMA_WRITE messages to the client, chunked and timed out like native DMA calls.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from pciback._ratelog import ScopedLog
from pciback.devices import DmaFaultError
from pciback.guests.vfio_user._errors import CommandRefusedError
from pciback.plane.dma import DmaMapError, DmaTimeoutError, GuestDma
from shared.errors import PcisplitError
from shared.protocol import DmaFaultEvent
from shared.protocol import vfio_user as vu

__all__ = ["ClientDma"]


class _Call:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: vu.Received | None = None


class ClientDma:
    """The DMA windows of one vfio-user connection (the owner the plane sees)."""

    def __init__(
        self,
        space: GuestDma,
        conn: vu.VfioUserConnection,
        send: Callable[[bytes], Awaitable[None]],
        events: ScopedLog,
        guest: str,
    ) -> None:
        self.space = space
        self.conn = conn
        self._send = send
        self.events = events
        self.guest = guest
        self._calls: dict[int, _Call] = {}
        #: Faults of device DMA (the model got DmaFaultError; vfio-user has no fault event).
        self.faults = 0
        self.late_replies = 0
        space.add_session(self)

    @property
    def held_fds(self) -> int:
        return self.space.held_fds(self)

    # -- DMA_MAP / DMA_UNMAP --------------------------------------------------------------

    def map(self, req: vu.DmaMap, fds: Sequence[int]) -> None:
        """Map the client's region ``req`` (owns ``fds``: at most one)."""
        if len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise CommandRefusedError(errno.EINVAL, f"DMA_MAP came with {len(fds)} descriptors")
        writable = bool(req.flags & vu.DMA_WRITEABLE)
        try:
            self.space.map(
                req.size, writable, self, fds[0] if fds else None,
                bus_address=req.address, offset=req.offset,
            )
        except DmaMapError as exc:  # the fd is closed by map()
            raise CommandRefusedError(errno.EINVAL, exc.message) from None

    async def unmap(self, req: vu.DmaUnmap) -> None:
        if req.all:
            mine = [w for w in self.space.windows if w.owner is self]
            for window in mine:
                await self.space.unmap(window.bus_address, self)
            return
        window = next(
            (w for w in self.space.windows if w.owner is self and w.bus_address == req.address),
            None,
        )
        if window is None or window.size != req.size:
            raise CommandRefusedError(
                errno.EINVAL, f"no DMA_MAP of {req.size:#x} bytes at {req.address:#x} to unmap "
                "(unmap exactly what was mapped, or all)",
            )
        await self.space.unmap(req.address, self)

    async def close(self) -> None:
        """The connection ended: fail pending calls, unmap every window (after in-flight DMA)."""
        for call in self._calls.values():
            call.done.set()
        self._calls.clear()
        await self.space.teardown(self)

    # -- DMA_READ / DMA_WRITE (the plane's DmaCaller) -------------------------------------

    def chunk_size(self) -> int:
        return self.conn.peer_caps.effective_max_data_xfer_size

    def report_fault(self, event: DmaFaultEvent) -> None:
        self.faults += 1
        self.events.log(
            "DMA faults", logging.INFO, "guest %s: vfio-user device DMA fault: %s",
            self.guest, event.message,
        )

    def resolve(self, received: vu.Received) -> None:
        """A reply to one of our DMA_READ/DMA_WRITE commands arrived."""
        call = self._calls.pop(received.msg_id, None)
        for fd in received.fds:
            os.close(fd)
        if call is None:
            self.late_replies += 1  # its call timed out; dropped
            return
        call.reply = received
        call.done.set()

    async def _call(self, body: vu.Body, timeout: float) -> vu.Body:
        try:
            msg_id, data = self.conn.send_command(body)
        except PcisplitError as exc:
            raise DmaFaultError(f"DMA through the client is not possible now: {exc}") from None
        call = self._calls[msg_id] = _Call()
        try:
            await self._send(data)
            with trio.move_on_after(timeout):
                await call.done.wait()
        finally:
            self._calls.pop(msg_id, None)
        reply = call.reply
        if reply is None:
            if not call.done.is_set():
                raise DmaTimeoutError(f"the vfio-user client did not answer DMA within {timeout} s")
            raise DmaFaultError("the vfio-user connection ended during DMA")
        if reply.is_error or reply.body is None:
            raise DmaFaultError(
                f"the vfio-user client refused DMA (errno {reply.header.error_no})"
            )
        return reply.body

    async def dma_read_call(self, bus_address: int, length: int, timeout: float) -> bytes:
        body = await self._call(vu.DmaAccess(bus_address, length), timeout)
        if not isinstance(body, vu.DmaData) or body.address != bus_address or (
            body.count != length
        ):
            raise DmaFaultError("the vfio-user client answered a DMA_READ with other bytes")
        return body.data

    async def dma_write_call(self, bus_address: int, data: bytes, timeout: float) -> None:
        body = await self._call(vu.DmaData(bus_address, data), timeout)
        if not isinstance(body, vu.DmaWriteReply) or body.count != len(data):
            raise DmaFaultError("the vfio-user client answered a DMA_WRITE with another count")
