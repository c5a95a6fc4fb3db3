"""Fair turns between busy guests (``pciback.guests.fairness``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.guests.fairness import FairTurns
from pciback.testing import running_backend
from tests.support.configs import edu_config


async def test_a_single_guest_takes_no_turn_and_no_checkpoint() -> None:
    fair = FairTurns()
    for _ in range(2):  # until the last two bursts served are its own
        await fair.acquire("only")
        fair.release("only", 8)
    for _ in range(5):
        with trio.testing.assert_no_checkpoints():
            assert await fair.acquire("only") is False
        fair.release("only", 8)
    assert fair.stats.uncontended == 5
    assert fair.stats.turns == 2  # the two warm-up bursts only


async def test_a_quiet_guest_goes_before_guests_that_were_served_more() -> None:
    fair = FairTurns()
    # Two busy guests were served a lot already; the quiet one hardly at all.
    for key, served in (("busy-a", 400), ("busy-b", 300), ("quiet", 1)):
        await fair.acquire(key)
        fair.release(key, served)
    turns_before = fair.stats.turns
    order: list[str] = []
    go = trio.Event()

    async def session(key: str) -> None:
        await go.wait()
        took = await fair.acquire(key)
        assert took is True  # contended: every one of them takes a turn
        order.append(key)
        fair.release(key, 8)

    async with trio.open_nursery() as nursery:
        for key in ("busy-a", "busy-b", "quiet"):  # woken in one batch, in any order
            nursery.start_soon(session, key)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert order == ["quiet", "busy-b", "busy-a"]
    assert fair.stats.turns - turns_before == 3
    assert fair.stats.waits_cut_short == 0


async def test_two_busy_guests_both_get_turns() -> None:
    # Each session yields between bursts (its receive), as a backend session does.
    fair = FairTurns()
    grants: list[str] = []
    burst = {"big": 32, "small": 4}

    async def session(key: str) -> None:
        for _ in range(200):
            await fair.acquire(key)
            grants.append(key)
            fair.release(key, burst[key])
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session, "big")
        nursery.start_soon(session, "small")
    middle = grants[10:110]  # both are busy all through these (each runs 200)
    # Neither waits for the other to finish; the small-burst guest, ahead by what it
    # was served, gets at least half of the turns.
    assert middle.count("small") >= 50, grants
    assert fair.stats.waits_cut_short == 0


async def test_a_turn_never_blocks_longer_than_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fair = FairTurns(max_wait=0.005)
    await fair.acquire("a")
    fair.release("a", 1)
    assert await fair.acquire("hog") is True  # contended ("a" was just served): a turn
    # "hog" keeps its turn (waiting for a device lock, say); "b" goes ahead after max_wait.
    start = trio.current_time()
    assert await fair.acquire("b") is True
    assert trio.current_time() - start == pytest.approx(0.005)
    assert fair.stats.waits_cut_short == 1
    fair.release("b", 1)
    fair.release("hog", 1)


async def test_a_cancelled_wait_leaves_no_trace(autojump_clock: trio.testing.MockClock) -> None:
    fair = FairTurns(max_wait=60.0)
    await fair.acquire("a")
    fair.release("a", 1)
    await fair.acquire("holder")
    with trio.move_on_after(0.001):
        await fair.acquire("gives-up")
    got: list[str] = []

    async def waiter() -> None:
        await fair.acquire("next")
        got.append("next")
        fair.release("next", 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        fair.release("holder", 1)  # the turn passes to the one still waiting
    assert got == ["next"]
    assert fair._heap == []


CONFIG = edu_config(["busy", "quiet"], {"edu-busy": "busy", "edu-quiet": "quiet"})


async def test_two_busy_guests_take_turns_and_are_all_answered(tmp_path: Path) -> None:
    async with running_backend(CONFIG, transports=("shm",), tmp=tmp_path) as rb:
        address = rb.address("shm")
        counts = {"busy": 0, "quiet": 0}

        async def guest(name: str, depth: int, reads: int) -> None:
            async with pcifront.connect(address, guest=name) as bus:
                dev = bus.devices[0]

                async def worker() -> None:
                    for _ in range(reads):
                        assert await dev.config_read(0, 4) == 0x11E81234
                        counts[name] += 1

                async with trio.open_nursery() as nursery:
                    for _ in range(depth):
                        nursery.start_soon(worker)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guest, "busy", 8, 100)
            nursery.start_soon(guest, "quiet", 1, 200)
        fair = rb.backend.fair
    assert counts == {"busy": 800, "quiet": 200}
    assert fair.stats.turns > 0  # the two were served in turns while both were busy
    assert fair._heap == [] and fair._holder is None
