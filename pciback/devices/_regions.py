"""What sits behind a BAR: register handlers, or plain (sparse) memory.

A :class:`BarRegion` answers reads and writes at offsets *inside* one BAR.
The device checks offset, size and alignment against the BAR before calling
it, so a region only has to implement its registers' meaning. A region that
wants to refuse an access size (edu: only 4-byte accesses below 0x80) raises
:class:`~shared.errors.ConfigAccessError` with ``code=ErrorCode.INVALID_SIZE``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from shared.errors import ConfigAccessError

__all__ = ["BarRegion", "HandlerRegion", "MemoryRegion", "ReadHandler", "WriteHandler"]

#: ``read(offset, size) -> value``
ReadHandler = Callable[[int, int], int]
#: ``write(offset, size, value)``
WriteHandler = Callable[[int, int, int], None]


class BarRegion(abc.ABC):
    """The contents of one BAR. Offsets are relative to the BAR's start."""

    @abc.abstractmethod
    def read(self, offset: int, size: int) -> int:
        """Return the little-endian value of ``size`` bytes at ``offset``."""

    @abc.abstractmethod
    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` (``size`` bytes, little-endian) at ``offset``."""

    def reset(self) -> None:  # noqa: B027 - optional hook, most regions keep no state
        """Return to the power-on state. The device calls it from its own reset."""


class HandlerRegion(BarRegion):
    """A region made of two plain functions.

    A missing ``read`` handler makes the BAR read as zeros; a missing
    ``write`` handler makes it ignore writes, as read-only hardware does.
    """

    def __init__(self, read: ReadHandler | None = None, write: WriteHandler | None = None) -> None:
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size) if self._read is not None else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self._write is not None:
            self._write(offset, size, value)


class MemoryRegion(BarRegion):
    """Zero-filled memory of ``size`` bytes, allocated one page at a time on first write.

    A snapshot of a GPU may declare a 256 MiB BAR; only the pages a guest
    actually writes cost memory, and reads of untouched pages return zeros.
    """

    PAGE_SIZE = 4096

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"memory region size {size} must be positive")
        self._size = size
        self._pages: dict[int, bytearray] = {}

    @property
    def size(self) -> int:
        return self._size

    @property
    def allocated_bytes(self) -> int:
        """Bytes of backing memory in use (whole pages)."""
        return len(self._pages) * self.PAGE_SIZE

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Read any byte range (it may cross pages)."""
        self._bound(offset, length)
        out = bytearray()
        while length:
            page, within = divmod(offset, self.PAGE_SIZE)
            chunk = min(length, self.PAGE_SIZE - within)
            stored = self._pages.get(page)
            out += stored[within : within + chunk] if stored is not None else bytes(chunk)
            offset += chunk
            length -= chunk
        return bytes(out)

    def write_bytes(self, offset: int, data: bytes) -> None:
        """Write any byte range (it may cross pages)."""
        self._bound(offset, len(data))
        view = memoryview(data)
        while view:
            page, within = divmod(offset, self.PAGE_SIZE)
            chunk = min(len(view), self.PAGE_SIZE - within)
            stored = self._pages.get(page)
            if stored is None:
                if not any(view[:chunk]):
                    # Writing zeros to an untouched page changes nothing: keep it unallocated.
                    offset += chunk
                    view = view[chunk:]
                    continue
                stored = self._pages[page] = bytearray(self.PAGE_SIZE)
            stored[within : within + chunk] = view[:chunk]
            offset += chunk
            view = view[chunk:]

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.read_bytes(offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.write_bytes(offset, value.to_bytes(size, "little"))

    def reset(self) -> None:
        self._pages.clear()

    def _bound(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ConfigAccessError(
                f"range {offset:#x}+{length} is outside the {self._size:#x}-byte memory region"
            )
