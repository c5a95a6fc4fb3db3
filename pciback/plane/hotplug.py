"""Hot-plug with acknowledgement: move devices in and out of connected guests.

:meth:`Hotplug.assign` puts a device on a guest's bus and announces it to each
of the guest's connected sessions with a ``DeviceAddedEvent``;
:meth:`Hotplug.unassign` takes it off at once (requests on its address are
answered ``DEVICE_REMOVED`` from then on), announces a ``DeviceRemovedEvent``,
and waits for every session's ``DeviceChangeAck``. The device is reset and
freed (:meth:`DeviceRegistry.release`) once every session has acknowledged
or gone away, or when ``ack_timeout`` runs out: then the removal is *forced*
and logged. Either way nobody else can be assigned the device before it was
reset.

Announcements never block the operation on a slow guest: each session has a
bounded queue and a task that sends from it (:class:`SessionChanges`), and
the time-out covers sending and acknowledging alike. An announcement awaiting
its acknowledgement is a call in :class:`shared.sync.CallTable`, keyed by its
change id, like the frontend's requests and the backend's DMA calls. Sessions that did not
negotiate the ``hotplug`` feature are not told (they see ``DEVICE_REMOVED``
replies and new snapshots) and are not waited for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

from pciback.plane.registry import DeviceRegistry, device_info
from shared.errors import LocalProtocolError
from shared.pci import PciAddress
from shared.protocol import (
    HOTPLUG_FEATURE,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    Message,
)
from shared.sync import Call, CallTable

__all__ = [
    "Hotplug",
    "HotplugResult",
    "SessionChanges",
    "Announcement",
    "ChangeSink",
    "ANNOUNCE_QUEUE",
]

log = logging.getLogger("pcisplit.backend")

#: Announcements queued for one session that has not sent them yet; beyond this
#: the session is counted as not reachable (the operation does not wait for it).
ANNOUNCE_QUEUE = 64

Outcome = Literal["acknowledged", "disconnected", "undeliverable", "timed-out"]
#: How one announcement ended, and why (for the log).
Ending = tuple[Outcome, str]


class Announcement:
    """One queued or sent announcement: the event to build and its call in the table.

    The change id is taken when the announcement is queued, so the
    acknowledgement finds it in :class:`~shared.sync.CallTable` like any
    other outstanding call; the event is built and sent later, in order.
    """

    __slots__ = ("call", "make")

    def __init__(self, make: Callable[[int], Message], call: Call[Ending]) -> None:
        self.make = make
        self.call = call


class SessionChanges:
    """One session's side of hot-plug: queued announcements and their acknowledgements.

    ``send`` is the session's one send path. :meth:`run` sends the queue (a
    task in the session's nursery); the session's receive loop hands each
    :class:`DeviceChangeAck` to :meth:`acknowledged`; :meth:`close` ends
    every announcement still waiting when the connection ends. The
    announcements awaiting acknowledgement are calls in a
    :class:`~shared.sync.CallTable` keyed by change id, the table the
    frontend's requests and the backend's DMA calls use too.
    """

    def __init__(self, conn: Connection, send: Callable[[Message], Awaitable[bool]]) -> None:
        self._conn = conn
        self._send = send
        self.enabled = HOTPLUG_FEATURE in conn.features
        self._in, self._out = trio.open_memory_channel[Announcement](ANNOUNCE_QUEUE)
        # No slot limit here: the Connection refuses an announcement over its limit of
        # unacknowledged changes when it is sent (TooManyInFlightError).
        self._calls: CallTable[Ending] = CallTable(lambda: False)
        #: Acknowledgements that came after the backend stopped waiting (legal, counted).
        self.late_acks = 0
        self.announced = 0

    def announce(self, make: Callable[[int], Message]) -> Announcement:
        """Queue an event built by ``make(change_id)``; never blocks."""
        call = self._calls.open(self._conn.next_change_id())
        item = Announcement(make, call)
        if self._calls.failed is not None:
            self._end(call, "disconnected", "the connection ended")
            return item
        try:
            self._in.send_nowait(item)
        except trio.WouldBlock:
            self._end(call, "undeliverable", f"{ANNOUNCE_QUEUE} announcements already queued")
        return item

    def _end(self, call: Call[Ending], outcome: Outcome, why: str) -> None:
        """``call`` ended without an acknowledgement; its id is forgotten."""
        self._calls.complete(call, (outcome, why))
        self._calls.close(call)

    async def run(self) -> None:
        """Send queued announcements through the session's send path, in order."""
        async for item in self._out:
            # Sent even when the operation stopped waiting meanwhile (a forced removal):
            # the guest still learns of it, and its acknowledgement counts as late.
            call = item.call
            try:
                sent = await self._send(item.make(call.id))
            except LocalProtocolError as exc:
                # TooManyInFlightError: the guest leaves too many changes unacknowledged.
                self._end(call, "undeliverable", str(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._end(call, "disconnected", "the connection broke while announcing")
                raise
            else:
                if sent:
                    self.announced += 1
                else:  # the session's send path: the connection no longer carries events
                    self._end(call, "disconnected", "the connection ended before the announcement")

    async def wait(self, item: Announcement) -> None:
        """Park until ``item`` is acknowledged, fails or the connection ends (cancellable)."""
        await self._calls.wait(item.call)

    def settle(self, item: Announcement) -> Ending:
        """How ``item`` ended; one still pending is given up (``timed-out``) now.

        A given-up announcement's acknowledgement may still come: it is counted
        in :attr:`late_acks`.
        """
        call = item.call
        if call.result is None:
            if self._calls.failed is not None:
                return "disconnected", "the connection ended"
            self._end(call, "timed-out", "")
        assert call.result is not None
        return call.result

    def acknowledged(self, ack: DeviceChangeAck) -> None:
        call = self._calls.resolve(ack.change_id, ("acknowledged", ""))
        if call is None:
            # Not waited for any more: the operation gave up (time-out) before it came.
            self.late_acks += 1
            return
        self._calls.close(call)

    def close(self) -> None:
        """The connection ended: a guest that is gone holds nothing; stop waiting for it."""
        self._calls.fail_all("the connection ended")
        while True:
            try:
                self._out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._in.close()


class ChangeSink(Protocol):
    """What :class:`Hotplug` needs of a session: its guest and its :class:`SessionChanges`."""

    guest: str
    changes: SessionChanges


@dataclass(frozen=True)
class HotplugResult:
    """What happened to one hot-plug operation (``pciback ctl`` prints it)."""

    device: str
    guest: str
    address: PciAddress
    change: Literal["added", "removed"]
    #: Sessions that were told (negotiated ``hotplug``), and how each answered.
    notified: int
    acknowledged: int
    disconnected: int
    #: Removal: completed without every acknowledgement, after the time-out.
    forced: bool
    waited: float

    def describe(self) -> str:
        what = "assigned to" if self.change == "added" else "removed from"
        text = f"device {self.device} {what} guest {self.guest} at {self.address}"
        if self.notified == 0:
            return text + " (no connected session to tell)"
        text += f"; {self.acknowledged} of {self.notified} session(s) acknowledged"
        if self.disconnected:
            text += f", {self.disconnected} disconnected"
        if self.forced:
            text += f"; removal forced after {self.waited:g} s"
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "guest": self.guest,
            "address": str(self.address),
            "change": self.change,
            "notified": self.notified,
            "acknowledged": self.acknowledged,
            "disconnected": self.disconnected,
            "forced": self.forced,
            "waited": round(self.waited, 6),
        }


class Hotplug:
    """Assign and unassign devices while guests are connected.

    ``sessions(guest)`` returns the guest's connected sessions.
    ``ack_timeout`` is how long an operation waits for acknowledgements
    (``[hotplug] ack_timeout`` in the config); after it a removal is forced.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        sessions: Callable[[str], Iterable[ChangeSink]],
        *,
        ack_timeout: float,
    ) -> None:
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be positive, got {ack_timeout!r}")
        self.registry = registry
        self._sessions = sessions
        self.ack_timeout = ack_timeout
        self.forced_removals = 0

    async def assign(self, device_id: str, guest: str) -> HotplugResult:
        """Put ``device_id`` on ``guest``'s bus and tell its sessions; wait for their acks.

        Raises the registry's typed error (unknown device or guest, already
        assigned, still leaving another guest) and changes nothing then.
        """
        address = self.registry.assign(device_id, guest)
        dev = self.registry.get(device_id)
        async with dev.lock:
            info = device_info(dev, include_config=False)
        log.info("device %s assigned to guest %s at %s", device_id, guest, address)
        return await self._announce(
            device_id, guest, address, "added", lambda cid: DeviceAddedEvent(cid, info)
        )

    async def unassign(
        self, device_id: str, *, reason: str = "unassigned by the operator"
    ) -> HotplugResult:
        """Take ``device_id`` off its guest now; release it once acknowledged or timed out."""
        guest, address = self.registry.detach(device_id)
        packed = address.pack()
        reset_ok = False
        try:
            result = await self._announce(
                device_id,
                guest,
                address,
                "removed",
                lambda cid: DeviceRemovedEvent(cid, packed, reason[:1024]),
            )
        finally:
            # Also when our caller is cancelled: a detached device is always reset and freed
            # (or, if its reset failed, hidden; the registry logs that).
            reset_ok = self.registry.release(device_id)
        done = "reset it" if reset_ok else "could NOT reset it (now hidden)"
        if result.forced:
            self.forced_removals += 1
            log.warning(
                "device %s: guest %s did not acknowledge its removal within %g s; removed it "
                "anyway (forced) and %s",
                device_id,
                guest,
                self.ack_timeout,
                done,
            )
        elif reset_ok:
            log.info("device %s removed from guest %s and reset", device_id, guest)
        else:
            log.error("device %s removed from guest %s; %s", device_id, guest, done)
        return result

    async def _announce(
        self,
        device_id: str,
        guest: str,
        address: PciAddress,
        change: Literal["added", "removed"],
        make: Callable[[int], Message],
    ) -> HotplugResult:
        items = [
            (s.changes, s.changes.announce(make))
            for s in self._sessions(guest)
            if s.changes.enabled
        ]
        start = trio.current_time()
        with trio.move_on_after(self.ack_timeout) as scope:
            for changes, item in items:
                await changes.wait(item)
        waited = trio.current_time() - start
        endings = [changes.settle(item) for changes, item in items]
        for outcome, why in endings:
            if outcome == "undeliverable":
                log.warning(
                    "device %s: could not announce its %s to guest %s: %s",
                    device_id,
                    "arrival" if change == "added" else "removal",
                    guest,
                    why,
                )
        acknowledged = sum(outcome == "acknowledged" for outcome, _ in endings)
        disconnected = sum(outcome == "disconnected" for outcome, _ in endings)
        return HotplugResult(
            device=device_id,
            guest=guest,
            address=address,
            change=change,
            notified=len(items),
            acknowledged=acknowledged,
            disconnected=disconnected,
            forced=change == "removed" and (scope.cancelled_caught or any(
                outcome == "undeliverable" for outcome, _ in endings
            )),
            waited=waited,
        )
