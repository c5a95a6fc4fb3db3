"""Hot-plug events and their acknowledgements, through plain bytes (no I/O)."""

from __future__ import annotations

import msgpack
import pytest
from _proto_samples import DEVICE, open_pair

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    CALL_RESULT_TAGS,
    EVENT_TAGS,
    HOTPLUG_FEATURE,
    ConfigReadRequest,
    ConnectionState,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceRemovedEvent,
    Limits,
    MessageKind,
    ValueReply,
    encode,
    message_kind,
)

HP = (HOTPLUG_FEATURE,)


def hotplug_pair(**kw: object):  # type: ignore[no-untyped-def]
    return open_pair(client_features=HP, server_features=HP, **kw)  # type: ignore[arg-type]


def test_wire_form_and_kinds() -> None:
    assert msgpack.unpackb(encode(DeviceRemovedEvent(3, 0x8, "gone"))) == [0x65, 3, 0x8, "gone"]
    assert msgpack.unpackb(encode(DeviceChangeAck(3))) == [0x81, 3]
    assert DeviceAddedEvent.TAG in EVENT_TAGS and DeviceRemovedEvent.TAG in EVENT_TAGS
    # The acknowledgement is outside the request range: a malformed one is never "answered".
    assert DeviceChangeAck.TAG in CALL_RESULT_TAGS
    assert message_kind(DeviceAddedEvent) is MessageKind.EVENT
    assert message_kind(DeviceChangeAck) is MessageKind.CHANGE_ACK


def test_added_and_removed_round_trip_with_acknowledgements() -> None:
    client, server = hotplug_pair()
    added = client.receive(server.send(DeviceAddedEvent(server.next_change_id(), DEVICE)))
    assert added == DeviceAddedEvent(1, DEVICE)
    assert server.outstanding_changes == client.owed_changes == frozenset({1})
    removed = client.receive(server.send(DeviceRemovedEvent(server.next_change_id(), 8, "bye")))
    assert isinstance(removed, DeviceRemovedEvent) and removed.change_id == 2
    # Acknowledged in any order; requests keep flowing meanwhile (no extra state).
    client.send(ConfigReadRequest(9, 0x8, 0, 4))
    assert server.receive(client.send(DeviceChangeAck(2))) == DeviceChangeAck(2)
    server.receive(client.send(DeviceChangeAck(1)))
    server.receive(encode(ConfigReadRequest(9, 0x8, 0, 4)))
    client.receive(server.send(ValueReply(9, 1)))
    assert server.outstanding_changes == client.owed_changes == frozenset()
    assert client.state is server.state is ConnectionState.OPEN
    assert server.owed_changes == client.outstanding_changes == frozenset()


def test_change_ids_skip_outstanding_ones_and_only_the_backend_makes_them() -> None:
    client, server = hotplug_pair()
    first = server.next_change_id()
    server.send(DeviceRemovedEvent(first, 8, ""))
    assert server.next_change_id() != first
    with pytest.raises(LocalProtocolError, match="still awaiting"):
        server.send(DeviceRemovedEvent(first, 8, ""))
    with pytest.raises(LocalProtocolError, match="only the backend"):
        client.next_change_id()


def test_acknowledging_what_is_not_owed_is_refused_locally() -> None:
    client, server = hotplug_pair()
    with pytest.raises(LocalProtocolError, match="no hot-plug change 4 is owed"):
        client.send(DeviceChangeAck(4))
    client.receive(server.send(DeviceRemovedEvent(4, 8, "")))
    client.send(DeviceChangeAck(4))
    with pytest.raises(LocalProtocolError, match="no hot-plug change 4 is owed"):
        client.send(DeviceChangeAck(4))  # exactly once
    assert client.state is ConnectionState.OPEN


def test_an_acknowledgement_of_nothing_outstanding_is_fatal_on_the_backend() -> None:
    _client, server = hotplug_pair()
    with pytest.raises(RemoteProtocolError, match="not outstanding"):
        server.receive(encode(DeviceChangeAck(1)))
    assert server.state is ConnectionState.ERROR


def test_a_reused_change_id_is_fatal_on_the_frontend() -> None:
    client, _server = hotplug_pair()
    client.receive(encode(DeviceRemovedEvent(5, 8, "")))
    with pytest.raises(RemoteProtocolError, match="still awaiting"):
        client.receive(encode(DeviceAddedEvent(5, DEVICE)))
    assert client.state is ConnectionState.ERROR


def test_hotplug_needs_the_negotiated_feature_on_both_sides() -> None:
    client, server = open_pair(server_features=HP)  # the frontend did not offer it
    with pytest.raises(LocalProtocolError, match="'hotplug' feature"):
        server.send(DeviceAddedEvent(1, DEVICE))
    assert server.outstanding_changes == frozenset()
    with pytest.raises(RemoteProtocolError, match="'hotplug' feature"):
        client.receive(encode(DeviceAddedEvent(1, DEVICE)))
    assert client.state is ConnectionState.ERROR


def test_outstanding_changes_are_capped_by_the_frontends_max_in_flight() -> None:
    client, server = hotplug_pair(client_limits=Limits(65536, 2))
    for _ in range(2):
        client.receive(server.send(DeviceRemovedEvent(server.next_change_id(), 8, "")))
    with pytest.raises(LocalProtocolError, match="accepts at most 2"):
        server.send(DeviceRemovedEvent(server.next_change_id(), 8, ""))
    # A backend that ignores the cap is a protocol violation on the frontend.
    with pytest.raises(RemoteProtocolError, match="frontend accepts at most 2"):
        client.receive(encode(DeviceRemovedEvent(77, 8, "")))
    assert client.state is ConnectionState.ERROR


def test_only_the_frontend_acknowledges_and_only_the_backend_announces() -> None:
    client, server = hotplug_pair()
    with pytest.raises(LocalProtocolError, match="backend cannot send DeviceChangeAck"):
        server.send(DeviceChangeAck(1))
    with pytest.raises(LocalProtocolError, match="frontend cannot send DeviceAddedEvent"):
        client.send(DeviceAddedEvent(1, DEVICE))
    with pytest.raises(RemoteProtocolError, match="frontend sent DeviceRemovedEvent"):
        server.receive(encode(DeviceRemovedEvent(1, 8, "")))
