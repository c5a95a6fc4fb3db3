"""FastLock and CallTable: the one lock and the one outstanding-call table of both sides."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from shared.sync import CallTable, FastLock


async def test_fastlock_free_takes_no_checkpoint() -> None:
    lock = FastLock()
    with trio.testing.assert_no_checkpoints():
        await lock.acquire()
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


async def test_fastlock_hands_over_in_arrival_order() -> None:
    lock = FastLock()
    order: list[int] = []
    await lock.acquire()

    async def worker(n: int) -> None:
        async with lock:
            order.append(n)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(worker, n)
            await trio.testing.wait_all_tasks_blocked()
        assert lock.statistics().tasks_waiting == 3
        lock.release()
        # A newcomer while waiters exist queues behind them (the lock was handed over).
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
    assert order == [0, 1, 2]
    assert not lock.locked()


async def test_fastlock_cancelled_waiter_never_owns_it() -> None:
    lock = FastLock()
    await lock.acquire()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def waiter() -> None:
            with scope:
                await lock.acquire()
            assert scope.cancelled_caught

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    lock.release()
    assert not lock.locked()


async def test_calltable_routes_results_and_counts_late_ones() -> None:
    table: CallTable[str] = CallTable(lambda: False)
    first, second = table.open(1), table.open(2)
    got: dict[int, str | None] = {}

    async def wait(call_id: int) -> None:
        call = table.get(call_id)
        assert call is not None
        await table.wait(call)
        got[call_id] = call.result
        table.close(call)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, 1)
        nursery.start_soon(wait, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert first.waiting and second.waiting
        assert table.resolve(2, "two") is second
        assert table.resolve(1, "one") is first
    assert got == {1: "one", 2: "two"}
    assert len(table) == 0
    assert table.resolve(1, "again") is None  # late: nobody waits any more
    with trio.testing.assert_no_checkpoints():
        done = table.open(3)
        table.complete(done, "timed out")
        await table.wait(done)  # a result is there: no parking, no checkpoint
    assert table.resolve(3, "real") is None  # the early completion stands
    assert done.result == "timed out"


async def test_calltable_slots_follow_the_peer_limit() -> None:
    in_flight = {"n": 2}
    table: CallTable[int] = CallTable(lambda: in_flight["n"] >= 2)
    passed = trio.Event()

    async def caller() -> None:
        await table.wait_slot()
        passed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        assert not passed.is_set()
        in_flight["n"] = 1
        table.resolve(99, 0)  # any result frees a slot (even a late one)
        await passed.wait()
    in_flight["n"] = 0
    with trio.testing.assert_no_checkpoints():
        await table.wait_slot()


async def test_calltable_fail_all_wakes_everyone() -> None:
    table: CallTable[int] = CallTable(lambda: True)
    call = table.open(7)
    woke: list[str] = []

    async def waiter() -> None:
        await table.wait(call)
        woke.append("call")

    async def slot() -> None:
        await table.wait_slot()
        woke.append("slot")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(slot)
        await trio.testing.wait_all_tasks_blocked()
        table.fail_all("gone")
        table.fail_all("second reason")
    assert sorted(woke) == ["call", "slot"]
    assert table.failed == "gone" and call.result is None


async def test_calltable_cancelled_wait_leaves_the_id_counted_until_closed() -> None:
    table: CallTable[int] = CallTable(lambda: False)
    call = table.open(5)
    with trio.CancelScope() as scope:
        scope.cancel()
        await table.wait(call)
    assert scope.cancelled_caught and not call.waiting
    with pytest.raises(RuntimeError, match="already registered"):
        table.open(5)
    table.close(call)
    assert table.get(5) is None
