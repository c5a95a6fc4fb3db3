"""Hot-plug with acknowledgement, end to end: the backend's Python API and pcifront."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import pcifront
from pciback.plane.hotplug import ANNOUNCE_QUEUE, SessionChanges
from pciback.testing import running_backend
from shared.errors import ErrorCode, PcisplitError
from shared.pci import PciAddress
from shared.protocol import (
    HOTPLUG_FEATURE,
    ConfigReadRequest,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    ErrorReply,
    Limits,
    Message,
    Reply,
    Role,
    ValueReply,
    Welcome,
    encode,
)
from shared.transport import FrameTransport, TransportOptions, open_transport
from tests.support.configs import edu_config

CONFIG = "[hotplug]\nack_timeout = 5.0\n" + edu_config(
    ["alpha", "beta"], {"edu0": "alpha", "edu1": None}
)

EDU_ID = 0x11E81234  # edu's vendor and device id, read as one dword


async def test_assign_announces_the_device_and_the_frontend_acknowledges() -> None:
    async with (
        running_backend(CONFIG) as rb,
        pcifront.connect(rb.address("memory"), guest="alpha") as bus,
    ):
        assert [d.address for d in bus.devices] == ["0000:00:00.0"]
        changes = bus.changes()
        woke = trio.Event()

        async def waiter() -> None:
            await bus.wait_changed()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            result = await rb.backend.assign("edu1", "alpha")
        assert woke.is_set()
        assert (result.notified, result.acknowledged, result.forced) == (1, 1, False)
        assert str(result.address) == "0000:00:01.0"
        change = await changes.__anext__()
        assert change.kind is pcifront.ChangeKind.ADDED
        assert change.device.address == "0000:00:01.0"
        assert [d.address for d in bus.devices] == ["0000:00:00.0", "0000:00:01.0"]
        # The new device is usable at once, and is the one the backend assigned.
        assert await bus.device("00:01.0").config_read(0, 4) == EDU_ID
        assert rb.backend.registry.get("edu1").guest == "alpha"
        assert bus.statistics().hotplug_events == 1
        session = rb.backend.sessions_of("alpha")[0]
        assert session.conn.outstanding_changes == frozenset()


async def test_removal_fails_the_requests_in_flight_with_device_removed_error() -> None:
    async with (
        running_backend(CONFIG) as rb,
        pcifront.connect(rb.address("memory"), guest="alpha") as bus,
    ):
        await rb.backend.assign("edu1", "alpha")
        dev0, dev1 = bus.device("00:00.0"), bus.device("00:01.0")
        changes = bus.changes()
        lock = rb.backend.registry.get("edu0").lock
        outcomes: list[BaseException | int] = []

        async def read() -> None:
            try:
                outcomes.append(await dev0.config_read(0, 4))
            except pcifront.DeviceRemovedError as exc:
                outcomes.append(exc)

        removal: list[object] = []
        async with trio.open_nursery() as nursery:
            # Hold the device so the backend's first request waits for it and the
            # rest queue behind: all four are in flight when the removal starts.
            await lock.acquire()
            for _ in range(4):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()

            async def unassign() -> None:
                removal.append(await rb.backend.unassign("edu0"))

            nursery.start_soon(unassign)
            await trio.testing.wait_all_tasks_blocked()
            # The guest has applied the removal while its requests are still pending.
            assert [d.address for d in bus.devices] == ["0000:00:01.0"]
            assert dev0.removed and outcomes == []
            lock.release()
        assert len(outcomes) == 4
        assert all(isinstance(o, pcifront.DeviceRemovedError) for o in outcomes)
        assert all(o.code is ErrorCode.DEVICE_REMOVED for o in outcomes)  # type: ignore[union-attr]
        (result,) = removal
        assert (result.acknowledged, result.forced) == (1, False)  # type: ignore[attr-defined]
        change = await changes.__anext__()
        assert change.kind is pcifront.ChangeKind.REMOVED and change.device is dev0
        assert change.reason == "unassigned by the operator"
        # Later requests fail at once; the other device is untouched.
        with pytest.raises(pcifront.DeviceRemovedError, match="removed from this guest's bus"):
            await dev0.config_write(0x04, 2, 0)
        assert await dev1.config_read(0, 4) == EDU_ID
        # Released: reset and free, so another guest can have it.
        registry = rb.backend.registry
        assert registry.get("edu0").leaving is None
        await rb.backend.assign("edu0", "beta")


async def test_interrupts_block_of_a_removed_device_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        running_backend(CONFIG) as rb,
        pcifront.connect(rb.address("memory"), guest="alpha") as bus,
    ):
        async with bus.devices[0].interrupts(mode="msi") as irqs:
            await rb.backend.unassign("edu0")
            with pytest.raises(trio.ClosedResourceError):
                await irqs.receive()
            assert [irq async for irq in irqs] == []
        # Nothing to disable on a device that is gone: no request, no warning.
        assert not [r for r in caplog.records if "disabling" in r.getMessage()]
        assert bus.statistics().errors_received == 0


# --------------------------------------------------------------------------- raw frontends


class SilentGuest:
    """A frontend that offers hot-plug but acknowledges only when told to."""

    def __init__(self, transport: FrameTransport, conn: Connection) -> None:
        self.transport = transport
        self.conn = conn
        self.events: list[DeviceAddedEvent | DeviceRemovedEvent] = []
        self.replies: dict[int, Reply] = {}
        self.arrived = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        try:
            while True:
                msg = self.conn.receive(await self.transport.receive_frame())
                if isinstance(msg, DeviceAddedEvent | DeviceRemovedEvent):
                    self.events.append(msg)
                elif isinstance(msg, Reply):
                    self.replies[msg.request_id] = msg
                self.arrived.unpark_all()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def ack(self, change_id: int) -> None:
        await self.transport.send_frame(self.conn.send(DeviceChangeAck(change_id)))

    async def read(self, device: int) -> Reply:
        rid = self.conn.next_request_id()
        await self.transport.send_frame(self.conn.send(ConfigReadRequest(rid, device, 0, 4)))
        while rid not in self.replies:
            await self.arrived.park()
        return self.replies.pop(rid)


@asynccontextmanager
async def silent_guest(
    address: str, guest: str, *, hotplug: bool = True
) -> AsyncIterator[SilentGuest]:
    transport = await open_transport(address, TransportOptions())
    async with transport:
        features = (HOTPLUG_FEATURE,) if hotplug else ()
        conn = Connection(Role.CLIENT, limits=Limits(), features=features, guest=guest)
        await transport.send_frame(conn.hello())
        assert isinstance(conn.receive(await transport.receive_frame()), Welcome)
        await transport.start_session(is_server=False, max_frame_size=transport.max_frame_size)
        client = SilentGuest(transport, conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            yield client
            nursery.cancel_scope.cancel()


async def test_unacknowledged_removal_is_forced_after_the_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pcisplit.backend")
    async with (
        running_backend(CONFIG) as rb,
        silent_guest(rb.address("memory"), "alpha") as guest,
    ):
        registry = rb.backend.registry
        async with trio.open_nursery() as nursery:
            removal: list[object] = []

            async def unassign() -> None:
                removal.append(await rb.backend.unassign("edu0"))

            nursery.start_soon(unassign)
            await trio.testing.wait_all_tasks_blocked()
            # The guest was told and lost the device at once; the device is held, not free.
            assert [type(e) for e in guest.events] == [DeviceRemovedEvent]
            reply = await guest.read(0)
            assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.DEVICE_REMOVED
            assert registry.get("edu0").leaving == "alpha"
            with pytest.raises(PcisplitError, match="still being removed") as refused:
                await rb.backend.assign("edu0", "beta")
            assert refused.value.code is ErrorCode.BUSY
            start = trio.current_time()
        (result,) = removal
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
        assert (result.notified, result.acknowledged, result.forced) == (1, 0, True)  # type: ignore[attr-defined]
        assert "removal forced after 5 s" in result.describe()  # type: ignore[attr-defined]
        forced = [r for r in caplog.records if "did not acknowledge" in r.getMessage()]
        assert len(forced) == 1 and forced[0].levelno == logging.WARNING
        assert "edu0" in forced[0].getMessage() and "alpha" in forced[0].getMessage()
        assert rb.backend.hotplug.forced_removals == 1
        # Forced means released: reset and free for the next owner.
        assert registry.get("edu0").leaving is None
        await rb.backend.assign("edu0", "beta")
        # A late acknowledgement is legal and counted, not an error.
        await guest.ack(guest.events[0].change_id)
        session = rb.backend.sessions_of("alpha")[0]
        await trio.testing.wait_all_tasks_blocked()
        assert session.conn.outstanding_changes == frozenset()
        assert session.changes.late_acks == 1


async def test_an_acknowledged_removal_completes_without_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        running_backend(CONFIG) as rb,
        silent_guest(rb.address("memory"), "alpha") as guest,
    ):
        async with trio.open_nursery() as nursery:
            removal: list[object] = []

            async def unassign() -> None:
                removal.append(await rb.backend.unassign("edu0"))

            start = trio.current_time()
            nursery.start_soon(unassign)
            await trio.testing.wait_all_tasks_blocked()
            assert not removal  # waiting for the guest
            await guest.ack(guest.events[0].change_id)
        (result,) = removal
        assert (result.acknowledged, result.forced) == (1, False)  # type: ignore[attr-defined]
        assert trio.current_time() - start < 1.0


async def test_a_session_without_the_feature_is_not_told_nor_waited_for() -> None:
    async with (
        running_backend(CONFIG) as rb,
        silent_guest(rb.address("memory"), "alpha", hotplug=False) as guest,
    ):
        reply = await guest.read(0)
        assert isinstance(reply, ValueReply) and reply.value == EDU_ID
        result = await rb.backend.unassign("edu0")
        assert (result.notified, result.forced) == (0, False)
        assert "no connected session to tell" in result.describe()
        assert guest.events == []
        reply = await guest.read(0)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.DEVICE_REMOVED


async def test_a_guest_that_disconnects_releases_the_removal_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_backend(CONFIG) as rb:
        async with trio.open_nursery() as nursery:
            removal: list[object] = []
            async with silent_guest(rb.address("memory"), "alpha"):

                async def unassign() -> None:
                    removal.append(await rb.backend.unassign("edu0"))

                start = trio.current_time()
                nursery.start_soon(unassign)
                await trio.testing.wait_all_tasks_blocked()
            # The guest went away without acknowledging: nothing left to wait for.
        (result,) = removal
        assert (result.disconnected, result.forced) == (1, False)  # type: ignore[attr-defined]
        assert trio.current_time() - start < 1.0


async def test_virtual_address_is_not_reused_while_a_device_is_leaving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        running_backend(CONFIG) as rb,
        silent_guest(rb.address("memory"), "alpha") as guest,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rb.backend.unassign, "edu0")
            await trio.testing.wait_all_tasks_blocked()
            added = await rb.backend.assign("edu1", "alpha")
            # 00:00.0 is still held by the leaving edu0: a stale request cannot reach edu1.
            assert str(added.address) == "0000:00:01.0"
            for event in list(guest.events):
                await guest.ack(event.change_id)


async def test_unassigning_what_is_not_assigned_is_a_typed_error() -> None:
    async with running_backend(CONFIG) as rb:
        with pytest.raises(PcisplitError, match="not assigned to any guest") as info:
            await rb.backend.unassign("edu1")
        assert info.value.code is ErrorCode.INVALID_STATE
        with pytest.raises(PcisplitError, match="unknown guest"):
            await rb.backend.assign("edu1", "nobody")
        assert rb.backend.registry.get("edu1").guest is None


async def test_an_acknowledgement_of_nothing_disconnects_only_that_guest() -> None:
    async with (
        running_backend(CONFIG) as rb,
        pcifront.connect(rb.address("memory"), guest="beta") as other,
        silent_guest(rb.address("memory"), "alpha") as liar,
    ):
        # Never announced: the backend cannot trust this frontend (sent past our own checks).
        await liar.transport.send_frame(encode(DeviceChangeAck(42)))
        await trio.testing.wait_all_tasks_blocked()
        assert rb.backend.sessions_of("alpha") == []
        assert rb.backend.stats.disconnects_for_misbehaviour == 1
        # Everyone else keeps hot-plugging.
        result = await rb.backend.assign("edu1", "beta")
        assert result.acknowledged == 1 and [d.address for d in other.devices] == [
            "0000:00:00.0"
        ]


# --------------------------------------------------------------------------- SessionChanges


def _pair(max_in_flight: int) -> tuple[Connection, Connection]:
    """A backend Connection and a hot-plug frontend's, past their handshake."""
    client = Connection(
        Role.CLIENT,
        limits=Limits(max_in_flight=max_in_flight),
        features=(HOTPLUG_FEATURE,),
        guest="alpha",
    )
    server = Connection(Role.SERVER, limits=Limits(), features=(HOTPLUG_FEATURE,))
    server.receive(client.hello())
    assert isinstance(client.receive(server.accept()), Welcome)
    return server, client


def _removal(cid: int) -> DeviceRemovedEvent:
    return DeviceRemovedEvent(cid, PciAddress(0, 0, 1, 0).pack(), "a test")


async def test_announcements_are_calls_in_one_table_and_each_ends_once() -> None:
    conn, frontend = _pair(max_in_flight=2)
    sent: list[Message] = []

    async def send(msg: Message) -> bool:
        # The session's send path: the Connection's rules apply, the frontend reads it.
        frontend.receive(conn.send(msg))
        sent.append(msg)
        return True

    def ack(cid: int) -> DeviceChangeAck:
        msg = conn.receive(frontend.send(DeviceChangeAck(cid)))
        assert isinstance(msg, DeviceChangeAck)
        return msg

    changes = SessionChanges(conn, send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes.run)
        first, second, third = (changes.announce(_removal) for _ in range(3))
        await trio.testing.wait_all_tasks_blocked()
        # The frontend accepts two unacknowledged changes: the third is not sent.
        assert [m.change_id for m in sent] == [first.call.id, second.call.id]  # type: ignore[attr-defined]
        await changes.wait(third)  # ended already: returns at once
        outcome, why = changes.settle(third)
        assert outcome == "undeliverable" and "max_in_flight" in why
        changes.acknowledged(ack(first.call.id))
        await changes.wait(first)
        assert changes.settle(first) == ("acknowledged", "")
        # The operation gives up on the second; its acknowledgement is then late.
        assert changes.settle(second) == ("timed-out", "")
        changes.acknowledged(ack(second.call.id))
        assert changes.late_acks == 1
        assert conn.outstanding_changes == frozenset()
        # The connection ends: whatever is still waiting ends as disconnected, at once.
        fourth = changes.announce(_removal)
        changes.close()
        await changes.wait(fourth)
        assert changes.settle(fourth) == ("disconnected", "the connection ended")
        assert changes.settle(changes.announce(_removal))[0] == "disconnected"


async def test_a_full_announcement_queue_makes_the_next_one_undeliverable() -> None:
    conn, _ = _pair(max_in_flight=ANNOUNCE_QUEUE * 2)

    async def send(msg: Message) -> bool:
        raise AssertionError("nothing is sent: run() is not running")

    changes = SessionChanges(conn, send)
    queued = [changes.announce(_removal) for _ in range(ANNOUNCE_QUEUE)]
    extra = changes.announce(_removal)
    outcome, why = changes.settle(extra)
    assert outcome == "undeliverable" and f"{ANNOUNCE_QUEUE} announcements" in why
    assert len({item.call.id for item in [*queued, extra]}) == ANNOUNCE_QUEUE + 1
    changes.close()
    assert {changes.settle(item)[0] for item in queued} == {"disconnected"}
