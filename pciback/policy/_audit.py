"""The audit log of denied guest writes, rate-limited per (guest, device).

Every refused config write produces one entry on the ``pcisplit.audit``
logger. A hostile guest can refuse-loop as fast as it can send requests, so
entries pass a token bucket per (guest, device) (XSA-157: every warning a
guest can trigger is rate-limited). Entries over the limit are counted, not
logged; the first entry logged after a suppression is preceded by one
``N entries suppressed`` summary, so nothing disappears without a trace.

The clock is injected (``clock()`` returns seconds, monotonic) so tests drive
time by hand; nothing here sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ConfigFileError

__all__ = ["AuditLog", "AuditEntry", "AuditStatistics", "AUDIT_LOGGER"]

#: Name of the logger audit entries go to.
AUDIT_LOGGER = "pcisplit.audit"


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


class _Bucket:
    __slots__ = ("stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0


class AuditLog:
    """Rate-limited audit entries for denied writes.

    ``rate`` entries per second are allowed per (guest, device) on average, with
    bursts of up to ``burst`` entries. ``clock`` returns monotonic seconds.
    """

    def __init__(
        self,
        *,
        rate: float = 5.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigFileError(
                f"audit rate {rate} must be > 0 and burst {burst} >= 1; "
                "set a positive rate (entries per second) and a burst of at least 1"
            )
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._logger = logger if logger is not None else logging.getLogger(AUDIT_LOGGER)
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._logged = 0
        self._suppressed = 0

    def denied(
        self, *, guest: str, device: str, offset: int, size: int, value: int, rule: str
    ) -> bool:
        """Record one denied write. Returns True when it was logged, False when suppressed."""
        entry = AuditEntry(guest, device, offset, size, value, rule)
        now = self._clock()
        key = (guest, device)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        else:
            # A clock that goes backwards (it should not) must not mint tokens.
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.stamp = max(bucket.stamp, now)
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            self._suppressed += 1
            return False
        bucket.tokens -= 1.0
        self._flush(guest, device, bucket)
        self._logger.warning("%s", entry.format(), extra={"audit": entry})
        self._logged += 1
        return True

    def _flush(self, guest: str, device: str, bucket: _Bucket) -> None:
        if not bucket.suppressed:
            return
        self._logger.warning(
            "ACCESS_DENIED guest=%s device=%s: %d entries suppressed by the rate limit",
            guest,
            device,
            bucket.suppressed,
            extra={
                "audit_suppressed": bucket.suppressed,
                "audit_guest": guest,
                "audit_device": device,
            },
        )
        bucket.suppressed = 0

    def forget(self, guest: str, device: str) -> None:
        """Drop the limiter state of one (guest, device), e.g. when the device is released.

        A pending "entries suppressed" summary is logged first, so no count is lost.
        """
        bucket = self._buckets.pop((guest, device), None)
        if bucket is not None:
            self._flush(guest, device, bucket)

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(self._logged, self._suppressed)
