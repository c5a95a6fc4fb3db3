"""The one rule for guest-triggered log lines (pciback/_ratelog.py), on a hand-driven clock."""

from __future__ import annotations

import logging

import pytest

from pciback._ratelog import RateLimitedLog, TokenBucket

LOGGER = "pcisplit.test.ratelog"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rlog(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> RateLimitedLog:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return RateLimitedLog(
        logging.getLogger(LOGGER), rate=0.5, burst=3, summary_interval=10.0, clock=clock
    )


def test_first_burst_logged_then_counted_then_summarised_before_the_next_line(
    rlog: RateLimitedLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    results = [rlog.log("conn 1", "bad requests", logging.INFO, "bad %d", i) for i in range(8)]
    assert results == [True] * 3 + [False] * 5
    assert _lines(caplog) == ["bad 0", "bad 1", "bad 2"]
    clock.now += 2.0  # one token (0.5/s)
    assert rlog.log("conn 1", "bad requests", logging.INFO, "bad %d", 8) is True
    assert _lines(caplog)[3:] == [
        "conn 1: 5 more bad requests suppressed in the last 2.0 s",
        "bad 8",
    ]
    stats = rlog.statistics()
    assert (stats.logged["bad requests"], stats.suppressed["bad requests"]) == (4, 5)
    assert stats.events("bad requests") == 9
    assert stats.summaries == 1


def test_scopes_and_kinds_are_limited_separately(
    rlog: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    for scope in ("conn 1", "conn 2"):
        for kind in ("bad requests", "refused BarReadRequests"):
            for _ in range(5):
                rlog.log(scope, kind, logging.INFO, "%s %s", scope, kind)
    assert len(_lines(caplog)) == 4 * 3
    assert rlog.statistics().suppressed == {"bad requests": 4, "refused BarReadRequests": 4}


def test_a_long_flood_costs_a_bounded_number_of_lines(
    rlog: RateLimitedLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # 10,000 events at 1 kHz for 10 s: the burst, then one line per token (0.5/s: at 2, 4, 6
    # and 8 s), each after the summary of the run before it; the last run is still pending.
    for i in range(10_000):
        clock.now = 1000.0 + i / 1000
        rlog.log("conn 1", "bad requests", logging.WARNING, "bad")
    lines = _lines(caplog)
    stats = rlog.statistics()
    assert stats.events("bad requests") == 10_000
    assert stats.logged["bad requests"] == 3 + 4
    assert lines.count("bad") == 7
    assert stats.summaries == 4
    assert len(lines) == 7 + 4
    assert stats.logged["bad requests"] + stats.suppressed["bad requests"] == 10_000


def test_summary_comes_after_the_interval_even_without_a_token(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    slow = RateLimitedLog(
        logging.getLogger(LOGGER), rate=0.01, burst=1, summary_interval=10.0, clock=clock
    )
    slow.log("conn 1", "bad requests", logging.INFO, "first")
    for _ in range(20):
        clock.now += 1.0
        slow.log("conn 1", "bad requests", logging.INFO, "again")
    # The run began at +1 s; the event at +11 s is the 11th suppressed and 10 s into it.
    assert _lines(caplog) == [
        "first",
        "conn 1: 11 more bad requests suppressed in the last 10.0 s",
    ]


def test_tick_summarises_a_flood_that_stopped_and_forgets_idle_keys(
    rlog: RateLimitedLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(10):
        rlog.log("conn 1", "bad requests", logging.WARNING, "bad")
    rlog.log("conn 2", "bad requests", logging.INFO, "once")
    assert rlog.keys_held == 2
    clock.now += 5.0
    rlog.tick()
    assert len(_lines(caplog)) == 4  # nothing due yet
    clock.now += 5.0
    rlog.tick()
    assert _lines(caplog)[-1] == "conn 1: 7 more bad requests suppressed in the last 10.0 s"
    (summary,) = [r for r in caplog.records if "more" in r.getMessage()]
    assert summary.levelno == logging.WARNING  # the level of what it stands for
    assert summary.suppressed == 7  # type: ignore[attr-defined]
    clock.now += 10.0  # both buckets full again, nothing owed: the state goes
    rlog.tick()
    assert rlog.keys_held == 0


def test_close_logs_what_the_scope_owes_and_forgets_it(
    rlog: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    scoped = rlog.scoped("guest g (connection 7)")
    for _ in range(5):
        scoped.log("refused ConfigReadRequests", logging.INFO, "refused")
    rlog.log("other", "bad requests", logging.INFO, "x")
    scoped.close()
    assert _lines(caplog)[-1] == (
        "guest g (connection 7): 2 more refused ConfigReadRequests suppressed in the last 0.0 s"
    )
    assert rlog.keys_held == 1  # only the other scope's key is left


def test_exc_info_is_kept_on_the_lines_that_are_logged(
    rlog: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        try:
            raise RuntimeError("model bug")
        except RuntimeError:
            rlog.log("conn 1", "device model failures", logging.ERROR, "failed", exc_info=True)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 3
    assert all(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in records)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        RateLimitedLog(logging.getLogger(LOGGER), rate=0)
    with pytest.raises(ValueError, match="burst >= 1"):
        RateLimitedLog(logging.getLogger(LOGGER), burst=0)
    with pytest.raises(ValueError, match="summary_interval > 0"):
        RateLimitedLog(logging.getLogger(LOGGER), summary_interval=0)


def test_token_bucket_mints_nothing_when_the_clock_goes_back(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 1, clock)
    assert bucket.take() is True
    clock.now -= 50
    assert bucket.take() is False
    clock.now += 50.5
    assert bucket.take() is False
    clock.now += 0.5
    assert bucket.take() is True
