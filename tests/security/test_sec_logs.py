"""A guest cannot grow the backend's log: 10,000 bad requests of each kind, bounded lines.

Every log line a guest can cause goes through one rate-limited, counted helper
(``pciback/_ratelog.py``). Here guest1 sends 10,000 of each of three answerable
bad requests against the real backend process: a denied config write (the
policy's audit log), a config read whose offset is not a number (a bad request
the protocol answers), and a config read of a device that is not on its bus
(a refusal by the dispatcher). Each gets its ``ErrorReply``; the backend's log
grows by a few dozen lines at most, bounded by the rule (burst + two lines per
token + a summary per interval, for the time the attack took), while its
counters say 10,000 of each.
"""

from __future__ import annotations

import re
import time

import trio
from _hostile import CFG_READ, CFG_WRITE, EDU1, ErrorReply, pack, peer
from conftest import sentinel

from pciback._ratelog import GUEST_LOG_BURST, GUEST_LOG_RATE, SUMMARY_INTERVAL

N = 10_000
#: Requests per write; fewer than the attacker's 64 in flight, so every one is answered.
BATCH = 50
#: A packed address with no device on guest1's bus (slot 2).
NOWHERE = 0x0010
#: The backend's audit defaults ([audit] rate, burst).
AUDIT_RATE, AUDIT_BURST = 5.0, 20

ATTACKS = {
    # kind (the rate-limited log's) -> (request, error code of its reply)
    "denied writes": (lambda rid: pack(CFG_WRITE, rid, EDU1, 0x00, 2, 0x1234), "ACCESS_DENIED"),
    "bad requests": (lambda rid: pack(CFG_READ, rid, EDU1, "zero", 4), None),
    "refused ConfigReadRequests": (lambda rid: pack(CFG_READ, rid, NOWHERE, 0, 4), "NOT_FOUND"),
}

#: A line of the backend's log that guest1's attack caused (a line or a summary).
LINE = {
    "denied writes": re.compile(r"ACCESS_DENIED guest=guest1 "),
    "bad requests": re.compile(
        r"guest guest1 (sent a bad request|\(connection \d+\): \d+ more bad)"
    ),
    "refused ConfigReadRequests": re.compile(
        r"guest guest1:? (ConfigReadRequest refused|\(connection \d+\): \d+ more refused Conf)"
    ),
}


def bound(burst: int, rate: float, seconds: float) -> int:
    """Most lines one (scope, kind) may write in ``seconds`` under the rule: the burst, then
    per token a summary and a line, a summary per interval without a token, one at the end."""
    return int(burst + 2 * rate * seconds + seconds / SUMMARY_INTERVAL + 2)


async def test_ten_thousand_bad_requests_of_each_kind_leave_a_bounded_log(backend, kind):
    before = backend.stats()
    log_before = len(backend.log_text().splitlines())
    start = time.monotonic()
    async with sentinel(backend, kind):
        async with peer(backend.address(kind), handshake=True) as p:
            for name, (make, _code) in ATTACKS.items():
                for first in range(0, N, BATCH):
                    await p.send_many([make(rid) for rid in range(first, first + BATCH)])
                    replies = await p.replies(BATCH, timeout=30)
                    assert all(isinstance(m, ErrorReply) for m in replies), (name, replies[:3])
    with trio.fail_after(10):  # the connection's close is logged just after the sentinel ends
        while backend.stats()["sessions"]:
            await trio.sleep(0.05)
    seconds = time.monotonic() - start
    after = backend.stats()
    new_lines = backend.log_text().splitlines()[log_before:]

    # Counted: every one of the 30,000 events, logged or not.
    def events(stats: dict, kind_: str) -> int:
        log = stats["log"]
        return log["logged"].get(kind_, 0) + log["suppressed"].get(kind_, 0)

    for name in ATTACKS:
        assert events(after, name) - events(before, name) == N, name
    refused_before, refused = (s["backend"]["requests_refused"] for s in (before, after))
    for _make, code in ATTACKS.values():
        if code is not None:
            assert refused[code] - refused_before.get(code, 0) == N, code
    suppressed = (
        after["backend"]["log_lines_suppressed"] - before["backend"]["log_lines_suppressed"]
    )
    assert suppressed >= 3 * N - 3 * bound(AUDIT_BURST, AUDIT_RATE, seconds)

    # Bounded: each kind wrote at most what the rule allows for the time the attack took.
    limits = {
        "denied writes": bound(AUDIT_BURST, AUDIT_RATE, seconds),
        "bad requests": bound(GUEST_LOG_BURST, GUEST_LOG_RATE, seconds),
        "refused ConfigReadRequests": bound(GUEST_LOG_BURST, GUEST_LOG_RATE, seconds),
    }
    for name, pattern in LINE.items():
        lines = [line for line in new_lines if pattern.search(line)]
        assert 1 <= len(lines) <= limits[name], (name, len(lines), limits[name], lines[-5:])
    # Nothing else about guest1 is logged per request either.
    guest1 = [line for line in new_lines if "guest1" in line]
    assert len(guest1) <= sum(limits.values()) + 10, guest1[-20:]
    # A suppressed run is summarised: at the latest when the connection closed.
    assert any(re.search(r"\d+ more bad requests suppressed", line) for line in new_lines)
