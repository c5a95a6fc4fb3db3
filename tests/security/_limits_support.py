"""Helpers for the stall and growth tests: configs, a hand-driven guest, latency probes."""

from __future__ import annotations

import time

import pcifront
from shared.protocol import BarWriteRequest
from tests.support.configs import edu_config
from tests.support.rawguest import EDU, IRQ_ACK, IRQ_RAISE, RawGuest, raw_guest

__all__ = [
    "EDU",
    "IRQ_ACK",
    "IRQ_RAISE",
    "RawGuest",
    "bar_write",
    "raw_guest",
    "TWO_GUESTS",
    "worst_latency",
]

#: An honest guest ("victim") and a hostile one ("mallory"), one edu device each.
TWO_GUESTS = edu_config(["victim", "mallory"], {"edu-v": "victim", "edu-m": "mallory"})


async def bar_write(g: RawGuest, offset: int, value: int) -> None:
    """Write the hostile guest's edu BAR 0 (``IRQ_RAISE`` raises an interrupt)."""
    await g.ok(lambda rid: BarWriteRequest(rid, EDU, 0, offset, 4, value))


async def worst_latency(bus: pcifront.Bus, rounds: int = 20) -> float:
    """The slowest of ``rounds`` config reads by an honest guest, in wall-clock seconds.

    Wall clock on purpose: a stalled event loop stops trio's clock too.
    """
    (dev,) = bus.devices
    worst = 0.0
    for _ in range(rounds):
        start = time.monotonic()
        assert await dev.config_read(0, 4) == 0x11E81234
        worst = max(worst, time.monotonic() - start)
    return worst
