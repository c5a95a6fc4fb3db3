"""Event-channel ports: coalescing, mask/unmask, eventfd between tasks, in-band."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from shared.evtchn import EventfdPort, InbandPort, InMemoryPort, Port


def eventfd_pair() -> tuple[EventfdPort, EventfdPort]:
    """Two ports on one eventfd: the first notifies, the second waits."""
    sender = EventfdPort.create()
    receiver = EventfdPort(os.dup(sender.fileno()))
    return sender, receiver


@pytest.fixture(params=["memory", "eventfd"])
def pair(request: pytest.FixtureRequest) -> tuple[Port, Port]:
    if request.param == "memory":
        return InMemoryPort.pair()
    return eventfd_pair()


async def test_notifications_while_pending_coalesce(pair: tuple[Port, Port]) -> None:
    a, b = pair
    for _ in range(5):
        a.notify()
    assert b.pending
    await b.wait()
    assert b.statistics().pending is False
    stats = b.statistics()
    assert (stats.received, stats.coalesced, stats.wakeups) == (5, 4, 1)
    assert a.statistics().sent == 5
    with trio.testing.assert_checkpoints():
        with trio.move_on_after(0):  # nothing more is pending: wait blocks
            await b.wait()


async def test_wait_wakes_on_notify(pair: tuple[Port, Port]) -> None:
    a, b = pair
    woke = trio.Event()

    async def waiter() -> None:
        await b.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        a.notify()
        await woke.wait()


async def test_masked_port_keeps_pending_and_delivers_on_unmask(pair: tuple[Port, Port]) -> None:
    a, b = pair
    b.mask()
    woke = trio.Event()

    async def waiter() -> None:
        await b.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        a.notify()
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set(), "a masked port woke its waiter"
        assert b.pending and b.masked
        b.unmask()
        await woke.wait()
    assert not b.pending


async def test_unmask_without_pending_does_not_wake(pair: tuple[Port, Port]) -> None:
    _a, b = pair
    b.mask()
    b.unmask()
    woke = trio.Event()

    async def waiter() -> None:
        await b.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        nursery.cancel_scope.cancel()


async def test_second_waiter_is_busy(pair: tuple[Port, Port]) -> None:
    _a, b = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await b.wait()
        nursery.cancel_scope.cancel()


async def test_close_wakes_waiter_with_closed_error(pair: tuple[Port, Port]) -> None:
    a, b = pair
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await b.wait()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await b.aclose()
    await b.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        b.notify()
    a.close()


async def test_in_memory_notify_to_closed_peer_is_broken() -> None:
    a, b = InMemoryPort.pair()
    b.close()
    with pytest.raises(trio.BrokenResourceError):
        a.notify()


async def test_eventfd_between_two_tasks_ping_pong() -> None:
    ping_tx, ping_rx = eventfd_pair()
    pong_tx, pong_rx = eventfd_pair()
    rounds = 200

    async def responder() -> None:
        for _ in range(rounds):
            await ping_rx.wait()
            pong_tx.notify()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        for _ in range(rounds):
            ping_tx.notify()
            await pong_rx.wait()
    assert ping_rx.statistics().wakeups == rounds
    assert pong_rx.statistics().received == rounds
    for port in (ping_tx, ping_rx, pong_tx, pong_rx):
        port.close()


async def test_eventfd_saturated_counter_coalesces_instead_of_failing() -> None:
    sender, receiver = eventfd_pair()
    os.eventfd_write(sender.fileno(), 0xFFFFFFFFFFFFFFFE)  # a hostile peer maxes it out
    sender.notify()  # EAGAIN inside: already pending, so it merges
    assert sender.statistics().coalesced == 1
    await receiver.wait()
    sender.close()
    receiver.close()


async def test_eventfd_closed_fd_maps_to_closed_resource_error() -> None:
    port = EventfdPort(os.eventfd(0), owns_fd=False)
    os.close(port.fileno())
    with pytest.raises(trio.ClosedResourceError):
        port.notify()


async def test_inband_port_sends_coalesced_frames_and_delivers() -> None:
    send_channel, receive_channel = trio.open_memory_channel[str](10)
    sent_frames = 0

    async def send_notification() -> None:
        nonlocal sent_frames
        sent_frames += 1
        await send_channel.send("notify")

    local = InbandPort(send_notification)
    remote = InbandPort(send_notification)  # its own sends are unused here

    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        local.notify()
        local.notify()
        local.notify()  # all before run() gets to send: one frame
        await trio.testing.wait_all_tasks_blocked()
        assert sent_frames == 1
        assert local.statistics().coalesced == 2

        async def pump() -> None:
            async for _ in receive_channel:
                remote.deliver()

        nursery.start_soon(pump)
        await remote.wait()
        assert remote.statistics().wakeups == 1
        local.notify()
        await remote.wait()
        assert sent_frames == 2
        local.close()
        remote.close()
        nursery.cancel_scope.cancel()


async def test_inband_send_failure_propagates() -> None:
    async def broken_send() -> None:
        raise trio.BrokenResourceError("transport gone")

    port = InbandPort(broken_send)
    with pytest.RaisesGroup(pytest.RaisesExc(trio.BrokenResourceError, match="transport gone")):
        async with trio.open_nursery() as nursery:
            await nursery.start(port.run)
            port.notify()
