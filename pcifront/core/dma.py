"""The guest's DMA buffers by bus address, answering the backend's DMA calls from memory.

Sans-I/O: a DMA call (``DmaReadCall``/``DmaWriteCall``) becomes its one
``DmaCallResult`` by a bounds-checked memory copy; the client sends it. The
buffers themselves (:class:`~pcifront.DmaBuffer`, mapped by a request) belong
to the client.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

from shared.errors import ErrorCode, PcisplitError
from shared.protocol import DmaCallResult, DmaReadCall, DmaWriteCall

__all__ = ["DmaSpace", "MappedBuffer"]

log = logging.getLogger("pcisplit.frontend.dma")


class MappedBuffer(Protocol):
    """One mapped buffer as the DMA space sees it (:class:`~pcifront.DmaBuffer`)."""

    bus_address: int
    writable: bool

    @property
    def end(self) -> int: ...

    @property
    def mapped(self) -> bool: ...

    @property
    def view(self) -> memoryview: ...

    def _lose(self, reason: str) -> None:
        """The connection ended: release the memory; later use raises ResourceLostError."""


class DmaSpace:
    """This bus's DMA buffers by bus address; answers the backend's DMA calls."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._buffers: list[MappedBuffer] = []
        self.calls_answered = 0
        self.calls_faulted = 0

    def __len__(self) -> int:
        return len(self._buffers)

    def add(self, buf: MappedBuffer) -> None:
        i = bisect.bisect_left(self._starts, buf.bus_address)
        for other in self._buffers[max(0, i - 1) : i + 1]:
            if other.bus_address < buf.end and buf.bus_address < other.end:
                raise PcisplitError(
                    f"the backend mapped {buf!r} over {other!r}; its IOVA allocator is broken",
                    code=ErrorCode.OPERATION_FAILED,
                )
        self._starts.insert(i, buf.bus_address)
        self._buffers.insert(i, buf)

    def remove(self, buf: MappedBuffer) -> None:
        i = bisect.bisect_left(self._starts, buf.bus_address)
        if i < len(self._buffers) and self._buffers[i] is buf:
            del self._starts[i]
            del self._buffers[i]

    def release_all(self, reason: str) -> int:
        """The connection ended (``reason``): nothing is served any more.

        Each buffer's later use raises :class:`~pcifront.ResourceLostError`
        naming ``reason``; ``unmap()`` is a no-op. Returns how many were mapped.
        """
        buffers = list(self._buffers)
        for buf in buffers:
            buf._lose(reason)
        self._starts.clear()
        self._buffers.clear()
        return len(buffers)

    def find(self, address: int, length: int) -> MappedBuffer | None:
        """The buffer holding all of ``address .. address+length``, or None."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        buf = self._buffers[i]
        if address + length > buf.end or not buf.mapped:
            return None
        return buf

    def answer(self, call: DmaReadCall | DmaWriteCall) -> DmaCallResult:
        """The one result for a backend DMA call, computed from memory (never blocks)."""
        if isinstance(call, DmaReadCall):
            buf = self.find(call.bus_address, call.length)
            if buf is not None:
                start = call.bus_address - buf.bus_address
                self.calls_answered += 1
                return DmaCallResult(
                    call.call_id, ErrorCode.OK, bytes(buf.view[start : start + call.length])
                )
            what = f"read of {call.length} bytes"
        else:
            length = len(call.data)
            buf = self.find(call.bus_address, length)
            if buf is not None and buf.writable:
                start = call.bus_address - buf.bus_address
                buf.view[start : start + length] = call.data
                self.calls_answered += 1
                return DmaCallResult(call.call_id, ErrorCode.OK, b"")
            if buf is not None:
                self.calls_faulted += 1
                log.warning(
                    "refused a device DMA write of %d bytes at %#x: the buffer is read-only",
                    length, call.bus_address,
                )
                return DmaCallResult(call.call_id, ErrorCode.DMA_FAULT, b"")
            what = f"write of {length} bytes"
        self.calls_faulted += 1
        log.warning(
            "refused a device DMA %s at %#x: outside every buffer this guest mapped",
            what, call.bus_address,
        )
        return DmaCallResult(call.call_id, ErrorCode.DMA_FAULT, b"")
