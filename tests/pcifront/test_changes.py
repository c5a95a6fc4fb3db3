"""The change tracker on its own: events, snapshots that race them, and consumers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import pcifront
from pcifront.client.changes import CHANGE_BUFFER, ChangeTracker
from pcifront.core.routes import BusStatistics, InterruptRoutes
from shared.protocol import DeviceAddedEvent, DeviceInfo, DeviceRemovedEvent


def info(slot: int, device_id: int = 0x11E8) -> DeviceInfo:
    return DeviceInfo(slot << 3, 0x1234, device_id, 0x00FF00, 0x10, 0, 0, 0)


def tracker(*slots: int) -> tuple[Any, ChangeTracker[pcifront.Device]]:
    # A bus with no interrupts() block active: all the devices need of it.
    bus: Any = SimpleNamespace(devices=[], _link=InterruptRoutes(BusStatistics()))
    t = ChangeTracker(
        bus, lambda i: pcifront.Device(bus, i),
        retire=pcifront.Device._retire, renew=pcifront.Device._update,
    )
    t.rebase([info(s) for s in slots])
    return bus, t


def addresses(bus: Any) -> list[str]:
    return [d.address for d in bus.devices]


async def test_events_update_devices_and_reach_every_consumer() -> None:
    bus, t = tracker(0)
    first, second = t.subscribe(), t.subscribe()
    t.apply_event(DeviceAddedEvent(1, info(2)))
    gone = bus.devices[0]
    t.apply_event(DeviceRemovedEvent(2, 0, "unassigned by the operator"))
    assert addresses(bus) == ["0000:00:02.0"]
    assert gone.removed
    for stream in (first, second):
        a, r = await stream.__anext__(), await stream.__anext__()
        assert (a.kind, a.address) == (pcifront.ChangeKind.ADDED, "0000:00:02.0")
        assert (r.kind, r.device, r.reason) == (
            pcifront.ChangeKind.REMOVED, gone, "unassigned by the operator"
        )
        assert r.as_dict()["event"] == "removed"


async def test_a_snapshot_computed_before_an_event_does_not_undo_it() -> None:
    bus, t = tracker(0, 1)
    keep = bus.devices[0]
    stream = t.subscribe()
    t.begin_refresh()
    # Arrive while the snapshot request is out: one new device, one gone.
    t.apply_event(DeviceAddedEvent(1, info(5)))
    t.apply_event(DeviceRemovedEvent(2, 1 << 3, "gone"))
    added = bus.devices[-1]
    # ... and the snapshot, computed by the backend before either, says 0 and 1.
    t.rebase([info(0), info(1)])
    t.end_refresh()
    assert addresses(bus) == ["0000:00:00.0", "0000:00:05.0"]
    assert bus.devices[0] is keep and bus.devices[1] is added  # no churn
    kinds = [(await stream.__anext__()).kind for _ in range(2)]
    assert kinds == [pcifront.ChangeKind.ADDED, pcifront.ChangeKind.REMOVED]
    assert t.count == 2 + 2  # the first snapshot's two, the two events; none from rebase


async def test_a_snapshot_that_differs_reports_the_differences() -> None:
    bus, t = tracker(0, 1)
    old0, old1 = bus.devices
    changes = t.rebase([info(0, device_id=0x1111), info(1)], reason="re-enumerated")
    assert [(c.kind, c.device.address) for c in changes] == [
        (pcifront.ChangeKind.REMOVED, "0000:00:00.0"),
        (pcifront.ChangeKind.ADDED, "0000:00:00.0"),
    ]
    assert old0.removed and bus.devices[1] is old1 and bus.devices[0].device_id == 0x1111


async def test_wait_changed_wakes_on_a_change_and_fails_when_the_bus_ends() -> None:
    _bus, t = tracker(0)
    woke = []

    async def waiter() -> None:
        await t.wait_changed()
        woke.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        t.apply_event(DeviceAddedEvent(1, info(3)))
    assert woke == [True]
    t.end("the backend closed the connection", lost=True)
    with pytest.raises(pcifront.ConnectionLostError, match="backend closed"):
        await t.wait_changed()


async def test_a_consumer_that_falls_behind_is_told_not_silently_dropped() -> None:
    _bus, t = tracker()
    stream = t.subscribe()
    for n in range(CHANGE_BUFFER + 3):
        t.apply_event(DeviceAddedEvent(n, info(n)))
    with pytest.raises(pcifront.ChangesOverflowError, match="3 device change"):
        await stream.__anext__()
    t.apply_event(DeviceRemovedEvent(9999, 0, ""))
    assert (await stream.__anext__()).kind is pcifront.ChangeKind.REMOVED
