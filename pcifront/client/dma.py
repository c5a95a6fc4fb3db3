"""Guest memory for device DMA: ``buf = await bus.dma_map(4096)``.

A :class:`DmaBuffer` is guest memory the backend's devices may read and
write at ``buf.bus_address`` (like a buffer mapped through an IOMMU).

* On transports that pass file descriptors (``unix:``, ``shm:``) the buffer
  is a memfd, sealed against shrinking and growing (a guest that shrank it
  would make the backend's accesses fault with SIGBUS, so the backend insists
  on the seal), mapped here and sent with the ``DmaMapRequest(shared=True)``
  frame. The backend maps the same pages: device DMA is a memory copy in the
  backend, with no message at all (zero copy).
* Elsewhere the buffer is private memory here and the backend reaches it with
  ``DmaReadCall``/``DmaWriteCall`` messages that the client's receive loop
  answers inline (a memory copy) through the client's one send path. Every
  call is bounds-checked against the buffers mapped on this bus: anything
  outside them, or a write into a read-only buffer, gets ``DMA_FAULT`` and
  touches nothing.

When the connection is lost the backend unmaps every buffer; here they are
released too, and any later use raises :class:`~pcifront.ResourceLostError`
(a reconnect does not re-map them: see that error).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os

import trio

from pcifront.core.dma import DmaSpace
from pcifront.core.errors import ResourceLostError
from pcifront.core.routes import BusLink
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    MAX_DMA_WINDOW,
    DmaMapRequest,
    DmaUnmapRequest,
    ValueReply,
)

__all__ = ["DmaBuffer", "DmaError", "map_buffer"]

log = logging.getLogger("pcisplit.frontend.dma")

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class DmaError(PcisplitError, ValueError):
    """A bad DMA buffer request or access (size, offset, buffer already unmapped)."""

    code = ErrorCode.INVALID_STATE


class DmaBuffer:
    """Guest memory mapped for device DMA at :attr:`bus_address`.

    Use :attr:`view` (a writable ``memoryview``), :meth:`read` and
    :meth:`write`; ``await buf.unmap()`` (or ``async with``) gives it back.
    Release any slices of :attr:`view` before unmapping.
    """

    def __init__(
        self, link: BusLink, space: DmaSpace, memory: mmap.mmap, bus_address: int, size: int,
        *, writable: bool, shared: bool,
    ) -> None:
        self._link = link
        self._space = space
        self._memory = memory
        self._view: memoryview | None = memoryview(memory)[:size]
        #: The address the device uses for this buffer (chosen by the backend).
        self.bus_address = bus_address
        self.size = size
        #: Whether devices may write into this buffer.
        self.writable = writable
        #: True: a memfd the backend maps too (zero copy); False: answered by messages.
        self.shared = shared
        self._unmapping = False
        #: Why the connection this buffer was mapped on was lost (None: it was not).
        self._lost: str | None = None

    @property
    def end(self) -> int:
        """One past the last bus address of the buffer."""
        return self.bus_address + self.size

    @property
    def mapped(self) -> bool:
        return self._view is not None

    @property
    def view(self) -> memoryview:
        """The buffer's bytes, writable by the guest."""
        if self._view is None:
            if self._lost is not None:
                raise ResourceLostError(
                    f"DMA buffer at {self.bus_address:#x}: the connection to the backend was "
                    f"lost ({self._lost}); the backend unmapped it and reset the device, so it "
                    "is not re-mapped behind your back (the device would not know its new bus "
                    "address): map a new buffer with bus.dma_map() once the bus is connected "
                    "again, and program the device with its bus_address"
                )
            raise DmaError(f"DMA buffer at {self.bus_address:#x} was unmapped")
        return self._view

    def _check(self, offset: int, length: int) -> memoryview:
        view = self.view
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DmaError(
                f"range {offset:#x}+{length:#x} is outside the {self.size}-byte DMA buffer"
            )
        return view

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the buffer."""
        return bytes(self._check(offset, length)[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` of the buffer."""
        view = self._check(offset, len(data))
        view[offset : offset + len(data)] = data

    async def unmap(self) -> None:
        """Give the buffer back. The backend answers once in-flight DMA finished. Idempotent."""
        if self._view is None or self._unmapping:
            await trio.lowlevel.checkpoint()
            return
        self._unmapping = True
        try:
            await self._link.call(lambda rid: DmaUnmapRequest(rid, self.bus_address))
        finally:
            # Even if the reply never comes the guest stops serving the buffer: a late
            # device access then faults instead of touching released memory.
            self._space.remove(self)
            self._release()

    def _lose(self, reason: str) -> None:
        """The connection it was mapped on is gone (``reason``): release it, remember why."""
        if self.mapped:
            self._lost = reason
        self._release()

    def _release(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            view.release()
        try:
            self._memory.close()
        except BufferError:
            log.warning(
                "DMA buffer at %#x: slices of its view are still alive; the memory is "
                "freed when they are", self.bus_address,
            )

    async def __aenter__(self) -> DmaBuffer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.unmap()

    def __repr__(self) -> str:
        kind = "shared" if self.shared else "messages"
        state = "" if self.mapped else " unmapped"
        return f"<DmaBuffer {self.bus_address:#x}+{self.size:#x} {kind}{state}>"


def _shared_memory(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("pcisplit-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


async def map_buffer(link: BusLink, space: DmaSpace, size: int, *, writable: bool) -> DmaBuffer:
    """Map ``size`` bytes for device DMA (see :meth:`pcifront.Bus.dma_map`)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_DMA_WINDOW:
        raise DmaError(f"DMA buffer size must be 1..{MAX_DMA_WINDOW} bytes, not {size!r}")
    shared = link.can_pass_fds
    if shared:
        fd, memory = _shared_memory(size)
        try:
            reply = await link.call(
                lambda rid: DmaMapRequest(rid, size, writable, shared=True), fds=[fd]
            )
        except BaseException:
            memory.close()
            raise
        finally:
            os.close(fd)  # the mapping keeps the pages; the backend has its own fd
    else:
        memory = mmap.mmap(-1, size)
        try:
            reply = await link.call(lambda rid: DmaMapRequest(rid, size, writable))
        except BaseException:
            memory.close()
            raise
    assert isinstance(reply, ValueReply)
    buf = DmaBuffer(link, space, memory, reply.value, size, writable=writable, shared=shared)
    space.add(buf)
    return buf
