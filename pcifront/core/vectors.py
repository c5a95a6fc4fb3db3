"""An interrupts() block's bookkeeping, shared by both clients, with no I/O.

:class:`VectorCounts` keeps the pending count of each enabled vector: one
slot per vector, so the buffer is bounded by the vector count and a storm
only makes the counts grow (nothing is dropped, nothing queues without
bound). The trio block (:class:`~pcifront.Interrupts`) adds waking a
receiver; the blocking one (:class:`pcifront.blocking.Interrupts`) reads the
transport while it waits. The argument rules of ``interrupts()`` and of
masking live here once for both.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pcifront.core.errors import NotImplementedOpError, ResourceLostError
from pcifront.core.routes import InterruptRoutes
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    MAX_MSIX_VECTORS,
)

__all__ = [
    "MODES",
    "Interrupt",
    "InterruptModeError",
    "InterruptStatistics",
    "VectorCounts",
    "check_free",
    "check_interrupt_args",
    "check_mask_args",
]

log = logging.getLogger("pcisplit.frontend.irq")

#: Mode names accepted by :meth:`Device.interrupts`.
MODES = {"intx": IRQ_MODE_INTX, "msi": IRQ_MODE_MSI, "msix": IRQ_MODE_MSIX}


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


class VectorCounts:
    """Pending interrupt counts of one device's enabled vectors (trio and blocking API).

    One slot per vector, so the buffer is bounded by the vector count: a storm
    only makes the counts grow; nothing is dropped, nothing queues without bound.
    """

    def __init__(
        self, address: str, mode: str, vectors: int, on_stray: Callable[[int], None]
    ) -> None:
        self._address = address
        self.mode = mode
        self._mode_code = MODES[mode]
        #: Vectors the backend granted (may be fewer than asked for MSI).
        self.vectors = vectors
        #: ``"eventfd"`` or ``"inband"``: how interrupts travel.
        self.delivery = "inband"
        self._on_stray = on_stray
        self._counts = [0] * vectors
        self._ready: deque[int] = deque()  # vectors with a non-zero count, in arrival order
        self._fired = 0
        self._delivered = 0
        self._coalesced = 0
        self._eois = 0
        self._closed = False
        #: Why the connection this block lived on was lost (None: it was not).
        self._lost: str | None = None

    def _close(self) -> None:
        """The block ended (or its connection did): receiving raises from now on."""
        self._closed = True

    def _lose(self, reason: str) -> None:
        """The connection was lost: the backend released these interrupts (see below)."""
        if not self._closed:
            self._lost = reason
        self._close()

    def _check_live(self) -> None:
        """Raise :class:`ResourceLostError` if this block's connection was lost."""
        if self._lost is not None:
            raise ResourceLostError(
                f"{self._address}: the connection to the backend was lost ({self._lost}); the "
                f"backend released this device's {self.mode} interrupts and reset the device, so "
                "this interrupts() block is dead and is not re-enabled behind your back: leave "
                "it, re-initialise the device once the bus is connected again, and enter "
                "interrupts() again"
            )

    def _wake(self) -> None:
        """A vector became pending (the trio block wakes its receiver)."""

    def _post(self, vector: int, count: int) -> None:
        """Record that ``vector`` fired ``count`` times. Never blocks; counts add up."""
        if not 0 <= vector < self.vectors:
            log.warning(
                "%s: interrupt on vector %d, outside the %d enabled; counted as stray",
                self._address, vector, self.vectors,
            )
            self._on_stray(count)
            return
        self._fired += count
        if self._counts[vector]:
            self._coalesced += count
        else:
            self._coalesced += count - 1
            self._ready.append(vector)
            self._wake()
        self._counts[vector] += count

    def _take(self) -> Interrupt | None:
        if not self._ready:
            return None
        vector = self._ready.popleft()
        count, self._counts[vector] = self._counts[vector], 0
        self._delivered += 1
        return Interrupt(vector, count)

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

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._address} {self.mode} x{self.vectors} "
            f"via {self.delivery}>"
        )


def check_interrupt_args(mode: str, vectors: int, features: tuple[str, ...]) -> int:
    """The wire code of ``mode``, after checking ``mode``/``vectors`` (trio and blocking API)."""
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
    if "interrupts" not in features:
        raise NotImplementedOpError(
            ErrorCode.NOT_IMPLEMENTED,
            "the backend did not offer the 'interrupts' feature; upgrade pciback",
        )
    return MODES[mode]


def check_mask_args(mode_code: int, vector: int, vectors: int) -> None:
    """The rules of mask/unmask (trio and blocking API)."""
    if mode_code == IRQ_MODE_INTX:
        raise InterruptModeError(
            "INTx has no vector masks; use eoi() to unmask the line, or MSI/MSI-X"
        )
    if vector == FUNCTION_MASK_VECTOR and mode_code != IRQ_MODE_MSIX:
        raise InterruptModeError("only MSI-X has a function mask")
    if vector != FUNCTION_MASK_VECTOR and not 0 <= vector < vectors:
        raise InterruptModeError(f"vector {vector} is outside the {vectors} enabled vector(s)")


def check_free(link: InterruptRoutes, packed: int, address: str) -> None:
    """One interrupts() block per device at a time (trio and blocking API)."""
    if link.has_interrupts(packed):
        raise InterruptModeError(
            f"{address} already has an active interrupts() block; leave it first"
        )
