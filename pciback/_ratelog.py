"""The one rule for log lines a guest can cause: counted, rate-limited, summarised.

A hostile guest can repeat a bad request as fast as it can send it, and each
one would otherwise be a log line: the log would grow without bound (XSA-157:
every message a guest can trigger is rate-limited). Every guest-triggered line
of the backend therefore goes through :class:`RateLimitedLog`:

- lines are keyed by **scope** (who caused them: one connection, one guest and
  device for the audit log, one limit) and **kind** (what happened, from a
  fixed vocabulary, never a string the guest chose);
- each key has a token bucket: the first ``burst`` lines are logged, then one
  more every ``1 / rate`` seconds; the others are **suppressed and counted**;
- a suppressed run ends with one summary line, ``<scope>: N more <kind>
  suppressed in the last T s``: before the next line that is logged, after
  ``summary_interval`` seconds while the flood goes on, at the latest when
  :meth:`RateLimitedLog.tick` runs (the backend calls it every second), and
  when the scope ends (:meth:`RateLimitedLog.close`);
- every event is counted per kind (:meth:`RateLimitedLog.statistics`), logged
  or not, so ``pciback ctl status`` shows what was suppressed: nothing
  disappears without a trace.

State is kept per key only while it matters (a bucket that is full again and
owes no summary is forgotten by :meth:`~RateLimitedLog.tick`), and a scope's
keys go with :meth:`~RateLimitedLog.close`, so the limiter itself cannot grow
either. Connection-level events (connect, disconnect, a crash with its
traceback) are not routed here: each happens once per connection, and
connections are bounded by ``[limits]``.

The clock is injected (monotonic seconds, e.g. ``trio.current_time``) so tests
drive time by hand; nothing here sleeps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RateLimitedLog",
    "RateLogStatistics",
    "ScopedLog",
    "TokenBucket",
    "MODEL_LOG",
    "GUEST_LOG_RATE",
    "GUEST_LOG_BURST",
    "SUMMARY_INTERVAL",
]

#: Default lines per second per (scope, kind) once the burst is spent (one per 10 s) ...
GUEST_LOG_RATE = 0.1
#: ... and how many lines of one kind may come at once.
GUEST_LOG_BURST = 10
#: Seconds a suppressed run may go on before its count is logged.
SUMMARY_INTERVAL = 10.0

_EPSILON = 1e-9


class TokenBucket:
    """A token bucket on an injectable clock (seconds, e.g. ``trio.current_time``).

    Starts full. A clock that goes backwards (it should not) mints no tokens.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp: float | None = None

    def _refill(self) -> None:
        now = self._clock()
        if self._stamp is None:
            self._stamp = now
        elif now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self) -> bool:
        """Spend one token if there is one."""
        self._refill()
        # The tolerance absorbs float rounding: without it, 0.9999999999999999 tokens
        # would ask for a sleep so short that the clock cannot advance by it.
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until the next token is available (0 when one is there)."""
        self._refill()
        if self._tokens >= 1.0 - _EPSILON:
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def full(self) -> bool:
        """True when the bucket is back to ``burst`` tokens (its state is worth nothing)."""
        self._refill()
        return self._tokens >= self.burst - _EPSILON


@dataclass
class RateLogStatistics:
    """Per kind: events that were logged, and events that were suppressed (counted only)."""

    logged: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    #: Summary lines written ("N more ... suppressed").
    summaries: int = 0

    def events(self, kind: str) -> int:
        """Every event of ``kind`` reported, logged or not."""
        return self.logged[kind] + self.suppressed[kind]

    def merge(self, other: RateLogStatistics) -> None:
        """Add ``other``'s counts to these."""
        self.logged.update(other.logged)
        self.suppressed.update(other.suppressed)
        self.summaries += other.summaries


class _Key:
    __slots__ = ("bucket", "level", "since", "suppressed")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.suppressed = 0
        self.since = 0.0  # when the current suppressed run began
        self.level = logging.INFO  # the highest level suppressed in it


class RateLimitedLog:
    """Rate-limited, counted log lines per (scope, kind); see the module docstring.

    ``rate`` lines per second per key on average, bursts of up to ``burst``;
    a suppressed run is summarised after at most ``summary_interval`` seconds.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        rate: float = GUEST_LOG_RATE,
        burst: int = GUEST_LOG_BURST,
        summary_interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or summary_interval <= 0:
            raise ValueError(
                f"a rate-limited log needs rate > 0, burst >= 1 and summary_interval > 0 "
                f"(got {rate}, {burst}, {summary_interval})"
            )
        self.logger = logger
        self.rate = float(rate)
        self.burst = burst
        self.summary_interval = float(summary_interval)
        self._clock = clock
        self._keys: dict[tuple[str, str], _Key] = {}
        self.stats = RateLogStatistics()

    def statistics(self) -> RateLogStatistics:
        return self.stats

    def scoped(self, scope: str) -> ScopedLog:
        """This log bound to one ``scope`` (e.g. a connection)."""
        return ScopedLog(self, scope)

    def log(
        self,
        scope: str,
        kind: str,
        level: int,
        msg: str,
        *args: object,
        exc_info: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Count one event of ``kind`` caused by ``scope``; log it if the limit allows.

        ``msg % args`` is the line (as for :meth:`logging.Logger.log`). Returns
        True when it was logged, False when it was suppressed (and counted).
        """
        key = self._keys.get((scope, kind))
        if key is None:
            key = self._keys[(scope, kind)] = _Key(
                TokenBucket(self.rate, self.burst, self._clock)
            )
        if key.bucket.take():
            if key.suppressed:
                self._summarise(scope, kind, key)
            self.stats.logged[kind] += 1
            self.logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
            return True
        now = self._clock()
        if not key.suppressed:
            key.since = now
            key.level = level
        key.level = max(key.level, level)
        key.suppressed += 1
        self.stats.suppressed[kind] += 1
        if now - key.since >= self.summary_interval:
            self._summarise(scope, kind, key)
        return False

    def _summarise(self, scope: str, kind: str, key: _Key) -> None:
        count, key.suppressed = key.suppressed, 0
        elapsed = max(0.0, self._clock() - key.since)
        self.stats.summaries += 1
        self.logger.log(
            key.level,
            "%s: %d more %s suppressed in the last %.1f s",
            scope,
            count,
            kind,
            elapsed,
            extra={"suppressed": count, "scope": scope, "kind": kind},
        )

    def tick(self) -> None:
        """Log the summaries that are due, and forget keys that owe nothing.

        The backend calls this every second, so a flood that stopped is still
        summarised within ``summary_interval`` (plus a second).
        """
        now = self._clock()
        for (scope, kind), key in list(self._keys.items()):
            if key.suppressed and now - key.since >= self.summary_interval:
                self._summarise(scope, kind, key)
            if not key.suppressed and key.bucket.full():
                del self._keys[(scope, kind)]

    def close(self, scope: str) -> None:
        """``scope`` ended (its connection closed): log what it still owes, forget it."""
        for scope_kind in [k for k in self._keys if k[0] == scope]:
            key = self._keys.pop(scope_kind)
            if key.suppressed:
                self._summarise(scope, scope_kind[1], key)

    @property
    def keys_held(self) -> int:
        """(scope, kind) keys with state (for tests: the limiter's own state is bounded)."""
        return len(self._keys)


class ScopedLog:
    """A :class:`RateLimitedLog` bound to one scope (one connection's events)."""

    __slots__ = ("limiter", "scope")

    def __init__(self, limiter: RateLimitedLog, scope: str) -> None:
        self.limiter = limiter
        self.scope = scope

    def log(
        self, kind: str, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log (or count and suppress) one event of ``kind``; see :meth:`RateLimitedLog.log`."""
        return self.limiter.log(self.scope, kind, level, msg, *args, exc_info=exc_info)

    def close(self) -> None:
        self.limiter.close(self.scope)


#: Guest-triggered lines of device models (a DMA the guest aimed at nothing, an address
#: out of the model's reach...): models have no connection to scope them by, so they
#: log through this one, scoped by model, and the backend counts and ticks it with the
#: others (``pciback ctl status``).
MODEL_LOG = RateLimitedLog(logging.getLogger("pcisplit.devices"))
