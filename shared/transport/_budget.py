"""Receive-buffer limits: bytes a connection may hold, and a budget shared by all of them.

A peer that starts a frame and never finishes it makes us hold its bytes. One
such peer is bounded by the frame limit; many of them are not, so a listener
hands every connection it accepts one :class:`ReceiveBudget`:

* each connection holds up to :attr:`ReceiveBudget.reserve` bytes (one receive
  chunk) for free, so small-message guests never compete for anything;
* bytes beyond the reserve come out of the shared pool of
  :attr:`ReceiveBudget.total` bytes. A connection that would overdraw it is
  the one growing past what everyone may hold: it is disconnected
  (:class:`~shared.errors.LimitExceededError` ``max_buffered_total``).

:class:`ReceiveLimits` is one connection's side: its own cap
(``max_buffered_per_connection``), its share of the pool, and the
partial-frame idle time-out, which bounds how long those bytes stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from shared.errors import LimitExceededError

__all__ = ["ReceiveBudget", "ReceiveLimits", "BudgetStatistics", "limit_broken"]

#: Bytes every connection may buffer without drawing on the shared pool (one receive chunk).
DEFAULT_RESERVE = 64 * 1024 + 4


def limit_broken(limit: str, message: str) -> trio.BrokenResourceError:
    """The transport-level error for a peer over a limit (``__cause__`` names the limit)."""
    error = trio.BrokenResourceError(message)
    error.__cause__ = LimitExceededError(limit, message)
    return error


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    """``used``: pool bytes held now; ``peak``: the most ever held; ``refused``: disconnects."""

    total: int
    used: int
    peak: int
    refused: int


class ReceiveBudget:
    """Receive-buffer bytes beyond each connection's reserve, shared by every connection."""

    def __init__(self, total: int, *, reserve: int = DEFAULT_RESERVE) -> None:
        if total < 0 or reserve < 0:
            raise ValueError(f"a receive budget needs total, reserve >= 0 (got {total}, {reserve})")
        self.total = total
        self.reserve = reserve
        self._used = 0
        self._peak = 0
        self._refused = 0

    def _adjust(self, old: int, new: int, what: str) -> None:
        delta = new - old
        if delta > 0 and self._used + delta > self.total:
            self._refused += 1
            raise limit_broken(
                "max_buffered_total",
                f"{what}: the backend's receive buffers are full ({self._used} of {self.total} "
                f"bytes shared by all connections) and this connection wants {delta} more; "
                "disconnecting it",
            )
        self._used += delta
        self._peak = max(self._peak, self._used)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.total, self._used, self._peak, self._refused)


class ReceiveLimits:
    """One connection's receive limits (see the module docstring).

    The owner calls :meth:`check` with its buffered byte count after feeding
    bytes and after taking frames, and :meth:`release` when it closes.
    """

    __slots__ = ("budget", "charged", "idle_timeout", "max_buffered", "what")

    def __init__(
        self,
        what: str,
        *,
        budget: ReceiveBudget | None = None,
        max_buffered: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.what = what
        self.budget = budget
        self.max_buffered = max_buffered
        self.idle_timeout = idle_timeout
        self.charged = 0

    def check(self, buffered: int) -> None:
        """Enforce the caps for ``buffered`` bytes held; raises BrokenResourceError."""
        if self.max_buffered is not None and buffered > self.max_buffered:
            raise limit_broken(
                "max_buffered_per_connection",
                f"{self.what}: peer made us buffer {buffered} bytes, over the "
                f"{self.max_buffered}-byte limit per connection; disconnecting it",
            )
        budget = self.budget
        if budget is None:
            return
        over = buffered - budget.reserve
        if over <= 0:
            if self.charged:
                budget._adjust(self.charged, 0, self.what)
                self.charged = 0
            return
        budget._adjust(self.charged, over, self.what)
        self.charged = over

    def release(self) -> None:
        """Give back what this connection holds of the shared pool (it is closing)."""
        if self.budget is not None and self.charged:
            self.budget._adjust(self.charged, 0, self.what)
        self.charged = 0

    def idle_error(self, buffered: int) -> trio.BrokenResourceError:
        """The error for a partial frame that saw no byte for :attr:`idle_timeout` seconds."""
        return limit_broken(
            "partial_frame_timeout",
            f"{self.what}: peer sent {buffered} bytes of a frame and then nothing for "
            f"{self.idle_timeout} s; disconnecting it",
        )
