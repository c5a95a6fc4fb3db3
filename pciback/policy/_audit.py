"""The audit log of denied guest writes, rate-limited per (guest, device).

Every refused config write produces one entry on the ``pcisplit.audit``
logger. A hostile guest can refuse-loop as fast as it can send requests, so
entries go through the backend's one rule for guest-triggered log lines,
:class:`pciback._ratelog.RateLimitedLog`, keyed per (guest, device) (XSA-157:
every warning a guest can trigger is rate-limited). Entries over the limit are
counted, not logged; a suppressed run ends with one ``N more denied writes
suppressed in the last T s`` summary (before the next entry logged, after the
summary interval, or at the next :meth:`AuditLog.tick`), so nothing disappears
without a trace.

The clock is injected (``clock()`` returns seconds, monotonic) so tests drive
time by hand; nothing here sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pciback._ratelog import SUMMARY_INTERVAL, RateLimitedLog
from shared.errors import ConfigFileError

__all__ = ["AuditLog", "AuditEntry", "AuditStatistics", "AUDIT_LOGGER"]

#: Name of the logger audit entries go to.
AUDIT_LOGGER = "pcisplit.audit"

#: The kind audit entries are counted under (``RateLimitedLog.statistics()``).
AUDIT_KIND = "denied writes"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One denied write, as logged (also attached to the log record as ``record.audit``)."""

    guest: str
    device: str
    offset: int
    size: int
    value: int
    rule: str

    def format(self) -> str:
        return (
            f"ACCESS_DENIED guest={self.guest} device={self.device} offset={self.offset:#05x} "
            f"size={self.size} value={self.value:#0{2 + 2 * self.size}x} rule={self.rule}"
        )


@dataclass(frozen=True, slots=True)
class AuditStatistics:
    """Counters since the log was made: entries logged, entries suppressed by the limit."""

    logged: int
    suppressed: int


class AuditLog:
    """Rate-limited audit entries for denied writes.

    ``rate`` entries per second are allowed per (guest, device) on average, with
    bursts of up to ``burst`` entries; a suppressed run is summarised within
    ``summary_interval`` seconds. ``clock`` returns monotonic seconds.
    """

    def __init__(
        self,
        *,
        rate: float = 5.0,
        burst: int = 20,
        summary_interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigFileError(
                f"audit rate {rate} must be > 0 and burst {burst} >= 1; "
                "set a positive rate (entries per second) and a burst of at least 1"
            )
        #: The limiter (the backend's one rule for guest-triggered lines).
        self.limiter = RateLimitedLog(
            logger if logger is not None else logging.getLogger(AUDIT_LOGGER),
            rate=rate,
            burst=burst,
            summary_interval=summary_interval,
            clock=clock,
        )

    @staticmethod
    def _scope(guest: str, device: str) -> str:
        return f"ACCESS_DENIED guest={guest} device={device}"

    def denied(
        self, *, guest: str, device: str, offset: int, size: int, value: int, rule: str
    ) -> bool:
        """Record one denied write. Returns True when it was logged, False when suppressed."""
        entry = AuditEntry(guest, device, offset, size, value, rule)
        return self.limiter.log(
            self._scope(guest, device),
            AUDIT_KIND,
            logging.WARNING,
            "%s",
            entry.format(),
            extra={"audit": entry},
        )

    def forget(self, guest: str, device: str) -> None:
        """Drop the limiter state of one (guest, device), e.g. when the device is released.

        A pending summary is logged first, so no count is lost.
        """
        self.limiter.close(self._scope(guest, device))

    def tick(self) -> None:
        """Log the summaries that are due (the backend calls this every second)."""
        self.limiter.tick()

    def statistics(self) -> AuditStatistics:
        stats = self.limiter.statistics()
        return AuditStatistics(stats.logged[AUDIT_KIND], stats.suppressed[AUDIT_KIND])
