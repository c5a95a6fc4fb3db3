"""The backend's counters of guest connections and requests (``Backend.statistics()``).

The guest side (accepting, handshakes, sessions, the dispatcher) counts here;
``pciback ctl status`` shows them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pciback.guests._accept import AcceptStatistics

__all__ = ["BackendStatistics"]


@dataclass
class BackendStatistics:
    """Counters of one backend (``Backend.statistics()``)."""

    connections_accepted: int = 0
    connections_active: int = 0
    handshakes_rejected: int = 0
    requests: int = 0
    protocol_errors: int = 0
    disconnects_for_misbehaviour: int = 0
    per_guest_requests: dict[str, int] = field(default_factory=dict)
    #: ``[limits]`` key -> times a peer went over that limit (see pciback.guests.limits).
    limits_exceeded: Counter[str] = field(default_factory=Counter)
    accept: AcceptStatistics = field(default_factory=AcceptStatistics)
    #: Connections ended by an unexpected exception (a backend or plugin bug), contained:
    #: logged with its traceback, and the service went on.
    connections_crashed: int = 0
    #: Unexpected exceptions from a listener's accept() (the listener keeps listening).
    accept_failures: int = 0
    #: Replies and events ready after their connection stopped carrying them (dropped).
    replies_dropped: int = 0
    events_dropped: int = 0
    #: Requests answered with an ``ErrorReply`` by the dispatcher, by error code name.
    requests_refused: Counter[str] = field(default_factory=Counter)
    #: Guest-triggered log lines not written (rate limit), all kinds together; by kind in
    #: :meth:`Backend.log_statistics` (each suppressed run is logged as one summary line).
    log_lines_suppressed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``dataclasses.asdict`` turns a Counter into nonsense:
        it rebuilds it from (key, count) pairs, which it then counts)."""
        result = asdict(self)
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Counter):
                result[spec.name] = dict(value)
        return result
