"""An MSI-X table and PBA inside a model's BAR, shown from the device's interrupt state.

:meth:`pciback.devices.EmulatedDevice.add_msix_capability` lays the table
(16 bytes per entry: message address low and high, message data, vector
control) and the pending-bit array over part of a BAR; every other offset of
the BAR still goes to the model's own region. The table's messages and mask
bits and the PBA are the device's :class:`~pciback.devices.InterruptState`:

- message address and data are software's to program (stored in the state);
- the vector-control mask bit shows the state's per-vector mask; writing it
  masks or unmasks the vector while no IRQ router manages the device
  (an unmask of a pending vector delivers it), and is ignored while one does
  (the router's mask operation is the only way then);
- the PBA shows the state's pending bits and ignores writes.
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import DeviceSetupError
from ._irqstate import InterruptState
from ._regions import BarRegion

__all__ = ["MSIX_ENTRY_SIZE", "MsixTableRegion", "msix_capability_body"]

#: Bytes per MSI-X table entry.
MSIX_ENTRY_SIZE = 16


class MsixTableRegion(BarRegion):
    """The model's ``inner`` region, with the MSI-X table and PBA laid over it.

    ``state`` returns the device's interrupt state; ``unmasked(vectors)`` sends
    the vectors (bit per vector) that a table write unmasked while pending.
    """

    def __init__(
        self,
        inner: BarRegion,
        *,
        entries: int,
        table_offset: int,
        pba_offset: int,
        state: Callable[[], InterruptState],
        unmasked: Callable[[int], None],
    ) -> None:
        self.inner = inner
        self.entries = entries
        self.table_offset = table_offset
        self.table_end = table_offset + entries * MSIX_ENTRY_SIZE
        self.pba_offset = pba_offset
        self.pba_end = pba_offset + 8 * ((entries + 63) // 64)
        self._state = state
        self._unmasked = unmasked

    def read(self, offset: int, size: int) -> int:
        if self.table_offset <= offset < self.table_end:
            entry, start = divmod(offset - self.table_offset, MSIX_ENTRY_SIZE)
            return _slice(self._entry(entry), start, size)
        if self.pba_offset <= offset < self.pba_end:
            pba = self._state().pending & ((1 << self.entries) - 1)
            raw = pba.to_bytes(self.pba_end - self.pba_offset, "little")
            return _slice(raw, offset - self.pba_offset, size)
        return self.inner.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.table_offset <= offset < self.table_end:
            entry, start = divmod(offset - self.table_offset, MSIX_ENTRY_SIZE)
            raw = bytearray(self._entry(entry))
            raw[start : start + size] = value.to_bytes(size, "little")[: MSIX_ENTRY_SIZE - start]
            state = self._state()
            state.set_msix_message(
                entry, int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:12], "little")
            )
            if start + size > 12 and not state.managed:
                ready = state.set_mask(entry, bool(raw[12] & 1))
                if ready:
                    self._unmasked(ready)
            return
        if self.pba_offset <= offset < self.pba_end:
            return  # the PBA is the device's: read-only
        self.inner.write(offset, size, value)

    def reset(self) -> None:
        self.inner.reset()

    def _entry(self, entry: int) -> bytes:
        state = self._state()
        address, data = state.msix_messages.get(entry, (0, 0))
        control = (state.masked >> entry) & 1
        return (
            address.to_bytes(8, "little")
            + data.to_bytes(4, "little")
            + control.to_bytes(4, "little")
        )


def _slice(raw: bytes, start: int, size: int) -> int:
    return int.from_bytes(raw[start : start + size], "little")


def msix_capability_body(
    entries: int, bar: int, bar_size: int, table_offset: int, pba_offset: int | None
) -> tuple[bytes, bytes, int]:
    """The capability body and write mask for a table of ``entries`` in BAR ``bar``.

    Returns ``(body, writable_mask, pba_offset)``; the PBA goes right after
    the table (8-byte aligned) unless ``pba_offset`` says where. Raises
    :class:`~pciback.devices.DeviceSetupError` when it does not fit.
    """
    if not 1 <= entries <= 2048:
        raise DeviceSetupError(f"an MSI-X table has 1 to 2048 entries, not {entries}")
    table_end = table_offset + entries * MSIX_ENTRY_SIZE
    if pba_offset is None:
        pba_offset = (table_end + 7) & ~7
    pba_end = pba_offset + 8 * ((entries + 63) // 64)
    for name, start, end in (("table", table_offset, table_end), ("PBA", pba_offset, pba_end)):
        if start % 8 or start < 0 or end > bar_size:
            raise DeviceSetupError(
                f"the MSI-X {name} at {start:#x}..{end:#x} must be 8-byte aligned and fit "
                f"BAR{bar} ({bar_size:#x} bytes)"
            )
    if table_offset < pba_end and pba_offset < table_end:
        raise DeviceSetupError("the MSI-X table and PBA overlap")
    body = (
        (entries - 1).to_bytes(2, "little")
        + (table_offset | bar).to_bytes(4, "little")
        + (pba_offset | bar).to_bytes(4, "little")
    )
    return body, (0xC000).to_bytes(2, "little") + bytes(8), pba_offset
