"""Device changes on the guest's bus: hot-plug events, re-enumeration, and who waits for them.

The backend announces each device that joins or leaves the guest's bus
(``DeviceAddedEvent``/``DeviceRemovedEvent``). The client's receive loop hands
each to :meth:`ChangeTracker.apply_event`, which updates ``bus.devices`` at
once, marks a removed :class:`~pcifront.Device` so its later requests fail
with :class:`~pcifront.DeviceRemovedError`, ends its ``interrupts()`` block,
wakes ``await bus.wait_changed()`` and queues a :class:`DeviceChange` for
every ``async for change in bus.changes()``; the receive loop then
acknowledges the event. None of it blocks the receive loop.

A bus snapshot (``bus.refresh()``) and the events travel on one ordered
stream, but the snapshot is *computed* at some moment between the request
and its reply. Events that arrive during that window may or may not be in
it, so :meth:`ChangeTracker.rebase` applies the snapshot and then replays
them: every change is idempotent (add replaces, remove forgets), so the
result is the bus as of the last message received.
"""

from __future__ import annotations

import enum
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio

from pcifront.core.errors import ConnectionLostError
from pcifront.core.views import DeviceView
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import DeviceAddedEvent, DeviceInfo, DeviceRemovedEvent

__all__ = [
    "ChangeKind",
    "DeviceChange",
    "DeviceChanges",
    "ChangeTracker",
    "ChangesOverflowError",
    "CHANGE_BUFFER",
]

#: The bus's device type (:class:`~pcifront.Device`).
D = TypeVar("D", bound=DeviceView)

#: Changes one ``bus.changes()`` iterator buffers for a consumer that is behind.
CHANGE_BUFFER = 1024


class ChangeKind(enum.Enum):
    """What happened to a device."""

    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class DeviceChange(Generic[D]):
    """One device joined (``ADDED``) or left (``REMOVED``) the guest's bus.

    ``reason`` is the backend's text for a removal, or says that the change
    was found by re-enumerating after a reconnect.
    """

    kind: ChangeKind
    device: D
    reason: str = ""

    @property
    def address(self) -> str:
        return self.device.address

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary (what ``pcifront agent --json`` prints)."""
        dev = self.device
        return {
            "event": self.kind.value,
            "address": dev.address,
            "vendor_id": f"{dev.vendor_id:04x}",
            "device_id": f"{dev.device_id:04x}",
            "class": f"{dev.class_code:06x}",
            "reason": self.reason,
        }


class ChangesOverflowError(PcisplitError):
    """A ``bus.changes()`` consumer fell more than :data:`CHANGE_BUFFER` changes behind."""

    code = ErrorCode.BUSY


class DeviceChanges(Generic[D]):
    """``async for change in bus.changes()``: the changes after the call, in order.

    Iteration ends when the guest closes the bus; it raises
    :class:`~pcifront.ConnectionLostError` when the connection is lost for
    good (with ``reconnect=True`` a reconnect is not an end: the changes it
    finds are reported).
    """

    def __init__(self, tracker: ChangeTracker[D]) -> None:
        self._tracker = tracker
        self._queue: deque[DeviceChange[D]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._overflowed = 0

    def _push(self, change: DeviceChange[D]) -> None:
        if len(self._queue) >= CHANGE_BUFFER:
            self._overflowed += 1  # reported to the consumer on its next read
        else:
            self._queue.append(change)
        self._lot.unpark_all()

    def _wake(self) -> None:
        self._lot.unpark_all()

    def __aiter__(self) -> DeviceChanges[D]:
        return self

    async def __anext__(self) -> DeviceChange[D]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._overflowed:
                lost, self._overflowed = self._overflowed, 0
                self._queue.clear()
                raise ChangesOverflowError(
                    f"{lost} device change(s) were not consumed in time (more than "
                    f"{CHANGE_BUFFER} buffered); read bus.devices for the current bus and "
                    "call bus.changes() again"
                )
            if self._queue:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return self._queue.popleft()
            ended = self._tracker.ended
            if ended is not None:
                self._tracker._unsubscribe(self)
                if ended.lost:
                    raise ConnectionLostError(ended.reason)
                raise StopAsyncIteration
            await self._lot.park()

    def aclose(self) -> None:
        """Stop receiving changes (also happens when the iterator is garbage-collected)."""
        self._tracker._unsubscribe(self)


@dataclass(frozen=True, slots=True)
class _End:
    reason: str
    lost: bool


class DeviceList(Protocol[D]):
    """Where the devices live: a bus's public ``devices`` list."""

    devices: list[D]


class ChangeTracker(Generic[D]):
    """Applies device changes to one bus's ``devices`` and tells whoever waits.

    ``make_device(info)`` builds a new device; ``retire(device, reason)`` marks
    one that left (its later requests fail, its ``interrupts()`` block ends);
    ``renew(device, info)`` gives a device that stayed its latest snapshot.
    """

    def __init__(
        self,
        bus: DeviceList[D],
        make_device: Callable[[DeviceInfo], D],
        *,
        retire: Callable[[D, str], None],
        renew: Callable[[D, DeviceInfo], None],
    ) -> None:
        self._bus = bus
        self._make_device = make_device
        self._retire = retire
        self._renew = renew
        self._subscribers: weakref.WeakSet[DeviceChanges[D]] = weakref.WeakSet()
        self._changed = trio.Event()
        self._refreshes = 0
        self._replay: list[DeviceAddedEvent | DeviceRemovedEvent] = []
        self.ended: _End | None = None
        #: Changes applied so far (added + removed).
        self.count = 0

    # ------------------------------------------------------------------ waiting
    def subscribe(self) -> DeviceChanges[D]:
        stream = DeviceChanges(self)
        self._subscribers.add(stream)
        return stream

    def _unsubscribe(self, stream: DeviceChanges[D]) -> None:
        self._subscribers.discard(stream)

    async def wait_changed(self) -> None:
        """Return after the next change to ``bus.devices``.

        Raises :class:`~pcifront.ConnectionLostError` if the bus ends first
        (or has ended).
        """
        before = self.count
        if self.ended is None:
            await self._changed.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.count == before and self.ended is not None:
            raise ConnectionLostError(self.ended.reason)

    def _publish(self, changes: Iterable[DeviceChange[D]]) -> None:
        published = False
        for change in changes:
            published = True
            self.count += 1
            for stream in list(self._subscribers):
                stream._push(change)
        if published:
            self._changed.set()
            self._changed = trio.Event()

    def end(self, reason: str, *, lost: bool) -> None:
        """The bus is over (closed by the guest, or lost for good): wake every waiter."""
        if self.ended is not None:
            return
        self.ended = _End(reason, lost)
        self._changed.set()
        for stream in list(self._subscribers):
            stream._wake()

    # ------------------------------------------------------------------ applying
    def apply_event(self, event: DeviceAddedEvent | DeviceRemovedEvent) -> None:
        """Apply one hot-plug event received from the backend (the receive loop calls this)."""
        if self._refreshes:
            self._replay.append(event)
        self._publish(self._apply(event))

    def _apply(self, event: DeviceAddedEvent | DeviceRemovedEvent) -> list[DeviceChange[D]]:
        if isinstance(event, DeviceAddedEvent):
            packed = event.info.address
            reason = ""
        else:
            packed = event.device
            reason = event.message
        bus = self._bus
        old = [d for d in bus.devices if d.info.address == packed]
        changes = [DeviceChange(ChangeKind.REMOVED, d, reason) for d in old]
        for dev in old:
            self._retire(dev, reason or "a new device took its address")
        devices = [d for d in bus.devices if d.info.address != packed]
        if isinstance(event, DeviceAddedEvent):
            dev = self._make_device(event.info)
            devices.append(dev)
            devices.sort(key=lambda d: d.info.address)
            changes.append(DeviceChange(ChangeKind.ADDED, dev))
        # A new list: code iterating over the old one is not disturbed.
        bus.devices = devices
        return changes

    def begin_refresh(self) -> None:
        """A snapshot request is about to go out: remember the events until its reply."""
        self._refreshes += 1

    def end_refresh(self) -> None:
        self._refreshes -= 1
        if not self._refreshes:
            self._replay.clear()

    def rebase(self, infos: Iterable[DeviceInfo], *, reason: str = "") -> list[DeviceChange[D]]:
        """Make ``bus.devices`` the snapshot ``infos`` plus the events received meanwhile.

        Devices that are the same as before (address, ids, class, revision)
        keep their :class:`~pcifront.Device` object; the differences are
        published as changes (with ``reason``) and returned.
        """
        target = {info.address: info for info in infos}
        reasons: dict[int, str] = {}
        for event in self._replay:
            if isinstance(event, DeviceAddedEvent):
                target[event.info.address] = event.info
            else:
                target.pop(event.device, None)
                reasons[event.device] = event.message
        bus = self._bus
        old = {d.info.address: d for d in bus.devices}
        devices: list[D] = []
        changes: list[DeviceChange[D]] = []
        for packed, info in sorted(target.items()):
            prev = old.pop(packed, None)
            if prev is not None and _same_device(prev.info, info):
                self._renew(prev, info)  # the latest image (include_config)
                devices.append(prev)
                continue
            if prev is not None:
                self._retire(prev, reason or "replaced by another device")
                changes.append(DeviceChange(ChangeKind.REMOVED, prev, reason))
            dev = self._make_device(info)
            devices.append(dev)
            changes.append(DeviceChange(ChangeKind.ADDED, dev, reason))
        for packed, prev in old.items():
            why = reasons.get(packed) or reason
            self._retire(prev, why or "gone from the bus snapshot")
            changes.append(DeviceChange(ChangeKind.REMOVED, prev, why))
        bus.devices = devices
        self._publish(changes)
        return changes


def _same_device(a: DeviceInfo, b: DeviceInfo) -> bool:
    # The config image may differ (include_config, live registers); identity does not.
    return (a.address, a.vendor_id, a.device_id, a.class_code, a.revision, a.header_type) == (
        b.address,
        b.vendor_id,
        b.device_id,
        b.class_code,
        b.revision,
        b.header_type,
    )
