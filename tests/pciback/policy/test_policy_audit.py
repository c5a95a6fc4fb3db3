"""The audit log of denied writes: content, logger name, token-bucket rate limit."""

from __future__ import annotations

import logging

import pytest
from _policy_support import synthetic_device

from pciback.policy import AUDIT_LOGGER, AccessDeniedError, AuditLog, PolicedDevice


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUDIT_LOGGER]


def test_denied_write_is_an_error_and_an_audit_entry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    dev = PolicedDevice(synthetic_device(), guest="vm7", device="00:05.0", audit=AuditLog())
    with pytest.raises(AccessDeniedError) as info:
        dev.config_write(0x00, 2, 0x1234)
    assert info.value.rule == "vendor_id"
    assert "denied by rule 'vendor_id'" in str(info.value)
    (record,) = _records(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "ACCESS_DENIED guest=vm7 device=00:05.0 offset=0x000 size=2 value=0x1234 rule=vendor_id"
    )
    entry = record.audit  # type: ignore[attr-defined]
    assert (entry.guest, entry.device, entry.offset, entry.size, entry.value, entry.rule) == (
        "vm7",
        "00:05.0",
        0,
        2,
        0x1234,
        "vendor_id",
    )


def test_accepted_writes_are_not_audited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    dev = PolicedDevice(synthetic_device(), guest="vm7", device="d", audit=AuditLog())
    dev.config_write(0x3C, 1, 0x05)
    assert _records(caplog) == []


def test_rate_limit_suppresses_and_then_summarises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    clock = FakeClock()
    audit = AuditLog(rate=1.0, burst=3, clock=clock)
    args = {"guest": "g", "device": "d", "offset": 0, "size": 2, "value": 1, "rule": "vendor_id"}
    results = [audit.denied(**args) for _ in range(10)]  # type: ignore[arg-type]
    assert results == [True] * 3 + [False] * 7
    assert len(_records(caplog)) == 3
    clock.now += 0.5  # half a token: still suppressed
    assert audit.denied(**args) is False  # type: ignore[arg-type]
    clock.now += 0.5
    assert audit.denied(**args) is True  # type: ignore[arg-type]
    messages = [r.getMessage() for r in _records(caplog)]
    assert messages[3] == (
        "ACCESS_DENIED guest=g device=d: 8 more denied writes suppressed in the last 1.0 s"
    )
    assert messages[4].startswith("ACCESS_DENIED guest=g device=d offset=0x000")
    stats = audit.statistics()
    assert (stats.logged, stats.suppressed) == (4, 8)


def test_rate_limit_is_per_guest_and_device(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    audit = AuditLog(rate=1.0, burst=1, clock=FakeClock())
    base = {"offset": 0, "size": 1, "value": 0, "rule": "r"}
    assert audit.denied(guest="a", device="d1", **base) is True  # type: ignore[arg-type]
    assert audit.denied(guest="a", device="d1", **base) is False  # type: ignore[arg-type]
    assert audit.denied(guest="a", device="d2", **base) is True  # type: ignore[arg-type]
    assert audit.denied(guest="b", device="d1", **base) is True  # type: ignore[arg-type]


def test_forget_logs_the_pending_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    audit = AuditLog(rate=1.0, burst=1, clock=FakeClock())
    base = {"guest": "g", "device": "d", "offset": 0, "size": 1, "value": 0, "rule": "r"}
    audit.denied(**base)  # type: ignore[arg-type]
    audit.denied(**base)  # type: ignore[arg-type]
    audit.forget("g", "d")
    last = _records(caplog)[-1].getMessage()
    assert last.endswith("1 more denied writes suppressed in the last 0.0 s")


def test_a_flood_that_stops_is_summarised_by_the_tick(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    clock = FakeClock()
    audit = AuditLog(rate=1.0, burst=2, summary_interval=10.0, clock=clock)
    base = {"guest": "g", "device": "d", "offset": 0, "size": 1, "value": 0, "rule": "r"}
    for _ in range(50):
        audit.denied(**base)  # type: ignore[arg-type]
    assert len(_records(caplog)) == 2
    clock.now += 9.0
    audit.tick()  # not due yet: the run is 9 s old
    assert len(_records(caplog)) == 2
    clock.now += 1.0
    audit.tick()
    assert _records(caplog)[-1].getMessage() == (
        "ACCESS_DENIED guest=g device=d: 48 more denied writes suppressed in the last 10.0 s"
    )
    stats = audit.statistics()
    assert (stats.logged, stats.suppressed) == (2, 48)


def test_a_clock_going_backwards_mints_no_tokens() -> None:
    clock = FakeClock()
    audit = AuditLog(rate=1.0, burst=1, clock=clock)
    base = {"guest": "g", "device": "d", "offset": 0, "size": 1, "value": 0, "rule": "r"}
    assert audit.denied(**base) is True  # type: ignore[arg-type]
    clock.now -= 50
    assert audit.denied(**base) is False  # type: ignore[arg-type]
    clock.now += 50.5
    assert audit.denied(**base) is False  # type: ignore[arg-type]


def test_flooding_guest_is_limited_through_the_device(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    clock = FakeClock()
    dev = PolicedDevice(
        synthetic_device(), guest="g", device="d", audit=AuditLog(rate=2, burst=5, clock=clock)
    )
    for _ in range(1000):
        with pytest.raises(AccessDeniedError):
            dev.config_write(0x08, 1, 0)
    assert len(_records(caplog)) == 5


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="rate"):
        AuditLog(rate=0)
    with pytest.raises(ValueError, match="burst"):
        AuditLog(burst=0)
