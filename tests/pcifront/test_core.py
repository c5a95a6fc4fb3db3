"""The client core with plain frames: no event loop, no transport.

A :class:`~pcifront.core.session.ClientCore` and a backend-side
:class:`~shared.protocol.Connection` are joined through the bytes each returns;
every kind of frame the backend sends is routed to its action.
"""

from __future__ import annotations

import mmap
from typing import Any

import pytest

import pcifront
from pcifront.client.dma import DmaBuffer
from pcifront.core.dma import DmaSpace
from pcifront.core.routes import BusStatistics, InterruptRoutes
from pcifront.core.session import CLOSED_BY_GUEST, ClientCore, ConnectionEnded
from shared.errors import ErrorCode
from shared.protocol import (
    HOTPLUG_FEATURE,
    ConfigReadRequest,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceInfo,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaFaultEvent,
    DmaReadCall,
    DmaWriteCall,
    ErrorReply,
    Event,
    InterruptEvent,
    Limits,
    PingRequest,
    Reply,
    Role,
    ValueReply,
)

FEATURES = ("config-access", "interrupts", "dma", HOTPLUG_FEATURE)
EDU = DeviceInfo(1 << 3, 0x1234, 0x11E8, 0x00FF00, 0x10, 0, 0, 0)


class Sink:
    """An interrupts() block as the routes see it: records what is posted."""

    def __init__(self) -> None:
        self.posted: list[tuple[int, int]] = []

    def _post(self, vector: int, count: int) -> None:
        self.posted.append((vector, count))

    def _close(self) -> None:
        pass

    def _lose(self, reason: str) -> None:
        pass


class Wiring:
    """Where the core delivers: what a client would hand to ``attach``."""

    def __init__(self, core: ClientCore, *, hotplug: bool = True) -> None:
        self.stats = BusStatistics()
        self.routes = InterruptRoutes(self.stats)
        self.dma = DmaSpace()
        self.waiting: set[int] = set()
        self.replies: dict[int, Reply] = {}
        self.events: list[Event] = []
        self.faults: list[DmaFaultEvent] = []
        self.changes: list[DeviceAddedEvent | DeviceRemovedEvent] = []
        core.attach(
            stats=self.stats, resolve=self.resolve, routes=self.routes, dma=self.dma,
            event=self.events.append, fault=self.faults.append,
            apply_change=self.changes.append if hotplug else None,
        )

    def resolve(self, request_id: int, reply: Reply) -> Reply | None:
        if request_id not in self.waiting:
            return None
        self.replies[request_id] = reply
        return reply


def joined(
    *, server_limits: Limits | None = None, hotplug: bool = True
) -> tuple[ClientCore, Connection, Wiring]:
    """A core and a backend connection after the handshake, through bytes only."""
    core = ClientCore("guest0", limits=Limits(max_message_size=1 << 16), features=FEATURES)
    server = Connection(Role.SERVER, limits=server_limits or Limits(), features=FEATURES)
    hello = server.receive(core.hello(b"secret"))
    assert hello.token == b"secret"  # type: ignore[attr-defined]
    assert core.welcome(server.accept()) == 1 << 16  # the smaller max_message_size
    return core, server, Wiring(core, hotplug=hotplug)


def test_the_handshake_names_the_guest_and_the_common_features() -> None:
    core, server, _ = joined()
    assert core.guest == server.guest == "guest0"
    assert core.features == FEATURES


def test_a_refused_handshake_is_a_handshake_error() -> None:
    core = ClientCore("nobody", limits=Limits(), features=FEATURES)
    server = Connection(Role.SERVER, limits=Limits())
    server.receive(core.hello())
    with pytest.raises(pcifront.HandshakeError) as info:
        core.welcome(server.reject(ErrorCode.NOT_AUTHORIZED, "no guest 'nobody' here"))
    assert info.value.code is ErrorCode.NOT_AUTHORIZED


def test_a_reply_goes_to_its_caller_and_a_late_one_is_counted() -> None:
    core, server, wiring = joined()
    rid, frame = core.request(lambda rid: ConfigReadRequest(rid, EDU.address, 0, 4))
    request = server.receive(frame)
    assert isinstance(request, ConfigReadRequest) and request.request_id == rid
    wiring.waiting.add(rid)
    assert core.receive(server.send_reply(ValueReply(rid, 0x11E81234))) is None
    assert wiring.replies == {rid: ValueReply(rid, 0x11E81234)}
    late, frame = core.request(PingRequest)
    server.receive(frame)  # ... and its caller gave up: nobody waits
    assert core.receive(server.send_reply(ErrorReply(late, ErrorCode.BUSY, "later"))) is None
    stats = wiring.stats
    assert (stats.requests_sent, stats.replies_received, stats.late_replies) == (2, 2, 1)


def test_a_bad_argument_is_typed_and_nothing_is_encoded() -> None:
    core, _server, wiring = joined()
    with pytest.raises(pcifront.InvalidAccessError) as info:
        core.request(lambda rid: ConfigReadRequest(rid, EDU.address, 0, 3))
    assert info.value.code is ErrorCode.INVALID_SIZE
    assert wiring.stats.requests_sent == 0 and core.conn.requests_in_flight == 0


def test_full_while_the_backend_in_flight_limit_is_reached() -> None:
    core, server, _ = joined(server_limits=Limits(max_in_flight=2))
    ids = []
    for _ in range(2):
        assert not core.full()
        rid, frame = core.request(PingRequest)
        server.receive(frame)
        ids.append(rid)
    assert core.full()
    core.receive(server.send_reply(ValueReply(ids[0], 0)))  # nobody waits: still frees it
    assert not core.full()


def test_an_interrupt_is_posted_to_its_block_or_counted_as_stray() -> None:
    core, server, wiring = joined()
    sink = Sink()
    wiring.routes.attach_interrupts(EDU.address, sink)
    assert core.receive(server.send(InterruptEvent(EDU.address, 0, 3))) is None
    assert core.receive(server.send(InterruptEvent(2 << 3, 0, 5))) is None  # no block there
    assert sink.posted == [(0, 3)]
    assert (wiring.stats.interrupt_events, wiring.stats.stray_interrupts) == (2, 5)


def test_dma_calls_are_answered_from_the_mapped_buffers() -> None:
    core, server, wiring = joined()
    buf = DmaBuffer(
        None, wiring.dma, mmap.mmap(-1, 4096), 0x10000, 4096,  # type: ignore[arg-type]
        writable=True, shared=False,
    )
    wiring.dma.add(buf)
    write = DmaWriteCall(server.next_call_id(), 0x10010, b"from the device")
    answer = core.receive(server.send(write))
    assert answer is not None
    assert server.receive(answer) == DmaCallResult(write.call_id, ErrorCode.OK, b"")
    read = DmaReadCall(server.next_call_id(), 0x10010, 15)
    answer = core.receive(server.send(read))
    assert answer is not None
    assert server.receive(answer) == DmaCallResult(read.call_id, ErrorCode.OK, b"from the device")
    outside = DmaReadCall(server.next_call_id(), 0x20000, 4)
    answer = core.receive(server.send(outside))
    assert answer is not None
    result = server.receive(answer)
    assert isinstance(result, DmaCallResult) and result.code is ErrorCode.DMA_FAULT
    assert (wiring.dma.calls_answered, wiring.dma.calls_faulted) == (2, 1)
    assert server.outstanding_calls == frozenset()  # every call answered exactly once


def test_a_dma_fault_is_counted_and_handed_on() -> None:
    core, server, wiring = joined()
    fault = DmaFaultEvent(EDU.address, 0x30000, 8, True, "outside every window")
    assert core.receive(server.send(fault)) is None
    assert wiring.faults == [fault] and wiring.stats.dma_faults == 1


def test_hot_plug_events_are_applied_then_acknowledged() -> None:
    core, server, wiring = joined()
    added = DeviceAddedEvent(server.next_change_id(), EDU)
    ack = core.receive(server.send(added))
    assert wiring.changes == [added]
    assert ack is not None and server.receive(ack) == DeviceChangeAck(added.change_id)
    removed = DeviceRemovedEvent(server.next_change_id(), EDU.address, "unassigned")
    ack = core.receive(server.send(removed))
    assert ack is not None and server.receive(ack) == DeviceChangeAck(removed.change_id)
    assert wiring.stats.hotplug_events == 2 and server.outstanding_changes == frozenset()


def test_without_a_change_handler_hot_plug_events_are_plain_events() -> None:
    core, server, wiring = joined(hotplug=False)
    added = DeviceAddedEvent(server.next_change_id(), EDU)
    assert core.receive(server.send(added)) is None  # not acknowledged
    assert wiring.events == [added] and wiring.stats.hotplug_events == 0


def test_an_event_handler_that_cannot_keep_an_event_ends_the_connection() -> None:
    core = ClientCore("guest0", limits=Limits(), features=FEATURES)
    server = Connection(Role.SERVER, limits=Limits(), features=FEATURES)
    server.receive(core.hello())
    core.welcome(server.accept())

    def full(event: Event) -> None:
        raise ConnectionEnded("events arrived faster than the guest consumed them")

    wiring: Any = Wiring(core, hotplug=False)
    core.attach(
        stats=wiring.stats, resolve=wiring.resolve, routes=wiring.routes, dma=wiring.dma,
        event=full,
    )
    with pytest.raises(ConnectionEnded, match="faster than the guest"):
        core.receive(server.send(DeviceAddedEvent(server.next_change_id(), EDU)))


def test_goodbye_from_the_backend_ends_the_connection_with_its_reason() -> None:
    core, server, _ = joined()
    with pytest.raises(ConnectionEnded) as info:
        core.receive(server.close(ErrorCode.OPERATION_FAILED, "backend stopping"))
    assert info.value.reason == "backend closed the connection (OPERATION_FAILED): backend stopping"
    assert isinstance(info.value, pcifront.ConnectionLostError)


def test_a_protocol_violation_ends_the_connection() -> None:
    core, server, _ = joined()
    server.receive(core.request(PingRequest)[1])
    with pytest.raises(ConnectionEnded, match="violated the protocol"):
        core.receive(b"\xc1 not msgpack")


def test_after_our_goodbye_nothing_more_is_routed() -> None:
    core, server, wiring = joined()
    rid, frame = core.request(PingRequest)
    server.receive(frame)
    wiring.waiting.add(rid)
    goodbye = core.goodbye()
    assert goodbye is not None and core.goodbye() is None  # said once
    with pytest.raises(ConnectionEnded) as info:
        core.receive(server.send_reply(ValueReply(rid, 0)))
    assert info.value.reason == CLOSED_BY_GUEST and wiring.replies == {}
