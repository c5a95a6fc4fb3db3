"""The vfio-user codec with plain bytes: both roles joined through bytes, no I/O."""

from __future__ import annotations

import ast
import errno
import itertools
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.protocol import vfio_user as vu

ROOT = Path(__file__).resolve().parents[4]
LIMITS = vu.VfioUserLimits()


def handshake(
    client_caps: vu.Capabilities | None = None, server_caps: vu.Capabilities | None = None
) -> tuple[vu.VfioUserConnection, vu.VfioUserConnection]:
    client = vu.VfioUserConnection(vu.Role.CLIENT)
    server = vu.VfioUserConnection(vu.Role.SERVER)
    _, data = client.send_command(vu.Version(0, 0, client.advertised(client_caps)))
    server.receive_data(data)
    proposal = server.next_event()
    assert proposal is not None and isinstance(proposal.body, vu.Version)
    reply = vu.negotiate(proposal.body, server.advertised(server_caps))
    client.receive_data(server.send_reply(proposal.header, reply))
    answer = client.next_event()
    assert answer is not None and answer.is_reply
    assert client.state == server.state == "ready"
    return client, server


def test_sources_import_no_io() -> None:
    forbidden = {"trio", "socket", "os", "time", "asyncio", "select", "selectors", "subprocess"}
    for path in (ROOT / "shared" / "protocol" / "vfio_user").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_header_layout_is_the_specifications() -> None:
    h = vu.Header(0x1234, vu.Command.REGION_READ, 32, vu.MessageType.COMMAND, no_reply=True)
    assert h.pack() == struct.pack("<HHIII", 0x1234, 9, 32, 0x10, 0)
    r = vu.Header(7, 1, 16, vu.MessageType.REPLY, error=True, error_no=errno.EINVAL)
    assert r.pack() == struct.pack("<HHIII", 7, 1, 16, 0x21, errno.EINVAL)
    assert vu.Header.unpack(r.pack()) == r


def test_version_json_is_nul_terminated_and_negotiated_down() -> None:
    client, server = handshake(
        vu.Capabilities(write_multiple=False, pgsizes=4096),
        vu.Capabilities(write_multiple=True, pgsizes=4096 | 2 << 20),
    )
    assert client.peer_caps.write_multiple is False  # not proposed: not granted
    assert client.peer_caps.pgsizes == 4096
    assert server.peer_caps.effective_max_data_xfer_size == LIMITS.max_data_xfer_size
    encoded = vu.Version(0, 0, vu.Capabilities(max_msg_fds=4)).encode()
    assert encoded[:4] == b"\0\0\0\0" and encoded.endswith(b"}\0")
    assert json.loads(encoded[4:-1]) == {"capabilities": {"max_msg_fds": 4}}


def test_version_without_json_means_defaults() -> None:
    v = vu.Version.decode(b"\0\0\0\0", LIMITS)
    assert v.capabilities is None
    assert v.caps.effective_max_msg_fds == 1
    assert v.caps.effective_max_data_xfer_size == 1 << 20


def test_reply_rules_checked_by_the_client() -> None:
    proposal = vu.Version(0, 3, vu.Capabilities())
    with pytest.raises(LocalProtocolError, match="major"):
        vu.check_reply(proposal, vu.Version(1, 0))
    with pytest.raises(LocalProtocolError, match="minor"):
        vu.check_reply(proposal, vu.Version(0, 4))
    with pytest.raises(LocalProtocolError, match="write_multiple"):
        vu.check_reply(proposal, vu.Version(0, 0, vu.Capabilities(write_multiple=True)))
    with pytest.raises(LocalProtocolError, match="twin_socket"):
        vu.check_reply(proposal, vu.Version(0, 0, vu.Capabilities(twin_socket_supported=True)))
    with pytest.raises(LocalProtocolError, match="pgsizes"):
        vu.check_reply(proposal, vu.Version(0, 0, vu.Capabilities(pgsizes=8192)))
    # Extra, unknown keys (libvfio-user's "migration") are tolerated.
    vu.check_reply(proposal, vu.Version(0, 1, vu.Capabilities(migration_pgsize=4096)))
    with pytest.raises(LocalProtocolError, match="major"):
        vu.negotiate(vu.Version(2, 0), vu.Capabilities())


def test_a_bad_version_reply_breaks_the_client_stream() -> None:
    client = vu.VfioUserConnection(vu.Role.CLIENT)
    msg_id, _ = client.send_command(vu.Version(0, 0, client.advertised()))
    reply = vu.Version(0, 5).encode()
    client.receive_data(vu.Header(msg_id, 1, 16 + len(reply), vu.MessageType.REPLY).pack() + reply)
    with pytest.raises(vu.StreamBrokenError, match="minor"):
        client.next_event()
    assert client.state == "broken"


# -- every command round-trips ---------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
small = st.binary(min_size=0, max_size=64)
region_index = st.integers(0, 8)

dma_maps = st.builds(
    vu.DmaMap, address=st.integers(0, 1 << 48), size=st.integers(1, 1 << 40),
    flags=st.sampled_from([1, 2, 3]), offset=u32,
)
sparse = st.lists(
    st.builds(vu.SparseArea, offset=st.integers(0, 1 << 12), size=st.integers(0, 1 << 12)),
    max_size=8,
).map(tuple)
region_infos = st.builds(
    lambda i, f, s, o, sp, ty: vu.RegionInfo(
        i, f | (vu.REGION_FLAG_CAPS if sp is not None or ty is not None else 0),
        s + (1 << 13), o, sp, ty,
    ),
    region_index, st.integers(0, 7), st.integers(0, 1 << 30), u32, st.none() | sparse,
    st.none() | st.tuples(u32, u32),
)
set_irqs = st.one_of(
    st.builds(lambda i, s, c, a: vu.SetIrqs(i, vu.IRQ_DATA_NONE | a, s, c),
              st.integers(0, 4), st.integers(0, 8), st.integers(1, 8),
              st.sampled_from([vu.IRQ_ACTION_MASK, vu.IRQ_ACTION_UNMASK,
                               vu.IRQ_ACTION_TRIGGER])),
    st.lists(st.sampled_from([0, 1]), min_size=1, max_size=16).map(
        lambda b: vu.SetIrqs(2, vu.IRQ_DATA_BOOL | vu.IRQ_ACTION_TRIGGER, 0, len(b), bytes(b))
    ),
    st.just(vu.SetIrqs(1, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_TRIGGER, 0, 0)),
)
multi = st.lists(
    st.builds(vu.MultiWrite, region=region_index, offset=st.integers(0, 4096),
              data=st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=8,
).map(lambda w: vu.WriteMulti(tuple(w)))
features = st.builds(
    vu.DeviceFeature, flags=st.integers(0, 8).map(lambda f: f | vu.FEATURE_GET), data=small,
)

#: (command, request strategy, reply strategy) for every command a client sends.
CLIENT_COMMANDS = [
    (vu.Command.DMA_MAP, dma_maps, st.just(vu.Empty())),
    (vu.Command.DMA_UNMAP,
     st.builds(vu.DmaUnmap, address=u32, size=u32) | st.just(vu.DmaUnmap(0, 0, vu.DMA_UNMAP_ALL)),
     st.builds(vu.DmaUnmap, address=u32, size=u32)),
    (vu.Command.DEVICE_GET_INFO, st.builds(vu.DeviceInfoRequest),
     st.builds(vu.DeviceInfo, flags=st.integers(0, 3), num_regions=u32, num_irqs=u32)),
    (vu.Command.DEVICE_GET_REGION_INFO,
     st.builds(vu.RegionInfoRequest, index=region_index, argsz=st.integers(32, 4096)),
     region_infos),
    (vu.Command.DEVICE_GET_REGION_IO_FDS, st.builds(vu.RegionIoFdsRequest, index=region_index),
     st.just(vu.RegionIoFds(2))),
    (vu.Command.DEVICE_GET_IRQ_INFO, st.builds(vu.IrqInfoRequest, index=st.integers(0, 4)),
     st.builds(vu.IrqInfo, index=st.integers(0, 4), flags=st.integers(0, 15), count=u32)),
    (vu.Command.DEVICE_SET_IRQS, set_irqs, st.just(vu.Empty())),
    (vu.Command.REGION_READ,
     st.builds(vu.RegionAccess, region=region_index, offset=u32, count=st.integers(0, 64)),
     st.builds(vu.RegionData, region=region_index, offset=u32, data=small)),
    (vu.Command.REGION_WRITE, st.builds(vu.RegionData, region=region_index, offset=u32, data=small),
     st.builds(vu.RegionAccess, region=region_index, offset=u32, count=st.integers(0, 64))),
    (vu.Command.DEVICE_RESET, st.just(vu.Empty()), st.just(vu.Empty())),
    (vu.Command.DEVICE_FEATURE, features, features),
    (vu.Command.MIG_DATA_READ, st.builds(vu.MigDataRead, size=st.integers(0, 64)),
     st.builds(vu.MigData, data=small)),
    (vu.Command.MIG_DATA_WRITE, st.builds(vu.MigData, data=small), st.just(vu.Empty())),
]


@pytest.mark.parametrize(
    ("command", "requests", "replies"), CLIENT_COMMANDS, ids=[c[0].name for c in CLIENT_COMMANDS]
)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_client_command_round_trips(
    command: vu.Command, requests: st.SearchStrategy[vu.Body], replies: st.SearchStrategy[vu.Body],
    data: st.DataObject,
) -> None:
    client, server = handshake()
    request, reply = data.draw(requests), data.draw(replies)
    msg_id, wire = client.send_command(request, command=command)
    server.receive_data(wire)
    got = server.next_event()
    assert got is not None and got.command is command and got.msg_id == msg_id
    assert got.body is not None and got.body.encode() == request.encode()
    client.receive_data(server.send_reply(got.header, reply))
    answer = client.next_event()
    assert answer is not None and answer.is_reply and answer.msg_id == msg_id
    assert answer.body is not None and answer.body.encode() == reply.encode()
    assert client.in_flight == 0


@settings(max_examples=40, deadline=None)
@given(multi)
def test_write_multi_round_trips_when_agreed(writes: vu.WriteMulti) -> None:
    client, server = handshake(
        vu.Capabilities(write_multiple=True), vu.Capabilities(write_multiple=True)
    )
    _, wire = client.send_command(writes)
    server.receive_data(wire)
    got = server.next_event()
    assert got is not None and got.body == writes
    client.receive_data(server.send_reply(got.header, vu.WriteMultiReply(len(writes.writes))))
    answer = client.next_event()
    assert answer is not None and answer.body == vu.WriteMultiReply(len(writes.writes))


def test_write_multi_refused_unless_agreed() -> None:
    _client, server = handshake()
    # The client may build it (it is the server's refusal that matters here).
    body = vu.WriteMulti((vu.MultiWrite(2, 0, b"\1"),))
    payload = body.encode()
    server.receive_data(vu.Header(1, 15, 16 + len(payload)).pack() + payload)
    with pytest.raises(vu.MalformedMessageError) as info:
        server.next_event()
    assert info.value.errno == errno.ENOTSUP and info.value.reply_expected


@settings(max_examples=40, deadline=None)
@given(address=u32, data=small)
def test_server_to_client_dma_round_trips(address: int, data: bytes) -> None:
    client, server = handshake()
    _msg_id, wire = server.send_command(vu.DmaAccess(address, len(data)))
    client.receive_data(wire)
    got = client.next_event()
    assert got is not None and got.body == vu.DmaAccess(address, len(data))
    server.receive_data(client.send_reply(got.header, vu.DmaData(address, data)))
    answer = server.next_event()
    assert answer is not None and answer.body == vu.DmaData(address, data)
    _, wire = server.send_command(vu.DmaData(address, data))
    client.receive_data(wire)
    got = client.next_event()
    assert got is not None and got.body == vu.DmaData(address, data)
    server.receive_data(client.send_reply(got.header, vu.DmaWriteReply(address, len(data))))
    answer = server.next_event()
    assert answer is not None and answer.body == vu.DmaWriteReply(address, len(data))


def test_dma_write_reply_of_the_specifications_12_bytes_decodes() -> None:
    assert vu.DmaWriteReply.decode(struct.pack("<QI", 0x1000, 4), LIMITS) == vu.DmaWriteReply(
        0x1000, 4
    )


def test_region_info_sparse_and_type_capabilities_chain() -> None:
    info = vu.RegionInfo(
        0, vu.REGION_FLAG_READ | vu.REGION_FLAG_MMAP | vu.REGION_FLAG_CAPS, 0x4000, 0,
        (vu.SparseArea(0x1000, 0x1000), vu.SparseArea(0x3000, 0x1000)), (3, 1),
    )
    wire = info.encode()
    argsz, _flags, _index, cap_offset = struct.unpack_from("<IIII", wire)
    assert argsz == len(wire) == 32 + 8 + 8 + 32 + 8 + 8 and cap_offset == 32
    assert struct.unpack_from("<HHI", wire, 32) == (vu.CAP_SPARSE_MMAP, 1, 32 + 8 + 8 + 32)
    back = vu.RegionInfo.decode(wire, LIMITS)
    assert back.sparse == info.sparse and back.region_type == (3, 1) and back.complete
    # Too little room: the bare structure with the argsz needed.
    short = info.fitted(32)
    assert len(short.encode()) == 32
    again = vu.RegionInfo.decode(short.encode(), LIMITS)
    assert not again.complete and again.argsz == len(wire)


def test_region_info_capability_loops_and_overlaps_are_refused() -> None:
    head = struct.pack("<IIIIQQ", 64, vu.REGION_FLAG_CAPS, 0, 32, 0x1000, 0)
    looping = head + struct.pack("<HHI", 99, 1, 32) + bytes(24)
    with pytest.raises(LocalProtocolError, match="not past itself"):
        vu.RegionInfo.decode(looping, LIMITS)
    lying = head + struct.pack("<HHI", vu.CAP_SPARSE_MMAP, 1, 0) + struct.pack("<II", 1000, 0)
    with pytest.raises(LocalProtocolError, match="does not hold"):
        vu.RegionInfo.decode(lying, LIMITS)


# -- the stream -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
def test_messages_reassemble_from_any_pieces(cuts: list[int]) -> None:
    client, server = handshake()
    sent = [
        vu.RegionAccess(2, 1, 1),
        vu.RegionData(2, 0, b"\xff"),
        vu.RegionInfoRequest(7, 256),
        vu.SetIrqs(0, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_UNMASK, 0, 1),
        vu.RegionData(7, 0x40, bytes(range(100))),
    ]
    wire = b"".join(client.send_command(b, no_reply=i == 1)[1] for i, b in enumerate(sent))
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    got = []
    for a, b in itertools.pairwise(points):
        server.receive_data(wire[a:b])
        while (event := server.next_event()) is not None:
            got.append(event)
    assert [e.body for e in got] == sent
    assert got[1].header.no_reply and server.buffered == 0


def test_a_message_in_two_pieces() -> None:
    client, server = handshake()
    _, wire = client.send_command(vu.RegionAccess(2, 5, 1))
    server.receive_data(wire[:10])
    assert server.next_event() is None
    server.receive_data(wire[10:])
    event = server.next_event()
    assert event is not None and event.body == vu.RegionAccess(2, 5, 1)


def test_fds_belong_to_the_message_they_arrived_with() -> None:
    client, server = handshake()
    _, plain = client.send_command(vu.RegionAccess(2, 0, 1))
    _, mapped = client.send_command(vu.DmaMap(0x10000, 0x1000), fds=1)
    _, irqs = client.send_command(
        vu.SetIrqs(0, vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER, 0, 2), fds=2
    )
    # One read of everything, and a second holding the rest, as a socket may deliver them.
    server.receive_data(plain + mapped[:5], fds=())
    server.receive_data(mapped[5:])
    server.receive_data(irqs[:3], fds=(40, 41))
    server.receive_data(irqs[3:])
    events = [server.next_event() for _ in range(3)]
    assert [e.fds for e in events if e] == [(), (), (40, 41)]


def test_ids_may_repeat_and_replies_match_in_order() -> None:
    client, server = handshake()
    for _ in range(2):
        _, wire = client.send_command(vu.RegionAccess(2, 1, 1), msg_id=7)
        server.receive_data(wire)
    assert client.in_flight == 2
    for value in (b"\1", b"\2"):
        got = server.next_event()
        assert got is not None
        client.receive_data(server.send_reply(got.header, vu.RegionData(2, 1, value)))
        answer = client.next_event()
        assert answer is not None and answer.msg_id == 7
        assert isinstance(answer.body, vu.RegionData) and answer.body.data == value
    assert client.in_flight == 0


def test_no_reply_commands_await_nothing_and_cannot_be_answered() -> None:
    client, server = handshake()
    _, wire = client.send_command(vu.RegionData(2, 0, b"\1"), no_reply=True)
    assert client.in_flight == 0
    server.receive_data(wire)
    got = server.next_event()
    assert got is not None and got.header.no_reply
    with pytest.raises(LocalProtocolError):
        server.send_reply(got.header, vu.RegionAccess(2, 0, 1))


def test_error_replies_carry_the_errno_and_nothing_else() -> None:
    client, server = handshake()
    _, wire = client.send_command(vu.RegionAccess(9, 0, 4))
    server.receive_data(wire)
    got = server.next_event()
    assert got is not None
    error = server.send_error(got.header, errno.EINVAL)
    assert len(error) == 16
    client.receive_data(error)
    answer = client.next_event()
    assert answer is not None and answer.is_error and answer.body is None
    assert answer.header.error_no == errno.EINVAL


# -- hostile input --------------------------------------------------------------------


def raw(cmd: int, payload: bytes, *, msg_id: int = 1, flags: int = 0) -> bytes:
    return struct.pack("<HHIII", msg_id, cmd, 16 + len(payload), flags, 0) + payload


@pytest.mark.parametrize(
    ("wire", "errno_value", "match"),
    [
        (raw(9, bytes(15)), errno.EINVAL, "not 16"),  # truncated REGION_READ
        (raw(9, bytes(17)), errno.EINVAL, "not 16"),  # trailing bytes
        (raw(10, struct.pack("<QII", 0, 2, 8) + b"\1"), errno.EINVAL, "count 8"),
        (raw(14, b""), errno.ENOSYS, "unknown command 14"),
        (raw(99, b""), errno.ENOSYS, "unknown command 99"),
        (raw(2, struct.pack("<IIQQQ", 32, 0, 0, 0x1000, 0)), errno.EINVAL, "size 0"),
        (raw(8, struct.pack("<IIIII", 20, vu.IRQ_DATA_NONE | vu.IRQ_DATA_BOOL
                            | vu.IRQ_ACTION_TRIGGER, 0, 0, 1)), errno.EINVAL, "one data type"),
        (raw(3, struct.pack("<IIQQ", 24, 3, 0, 0)), errno.EINVAL, "not supported"),
        (raw(11, struct.pack("<QQ", 0, 4)), errno.EINVAL, "does not receive"),
        (raw(1, vu.Version(0, 0).encode()), errno.EINVAL, "after the handshake"),
        (raw(9, struct.pack("<QII", 0, 2, (1 << 20) + 1)), errno.EINVAL, "max_data_xfer_size"),
    ],
)
def test_bad_messages_get_typed_errors_and_the_stream_goes_on(
    wire: bytes, errno_value: int, match: str
) -> None:
    _, server = handshake()
    server.receive_data(wire + raw(13, b"", msg_id=2))
    with pytest.raises(vu.MalformedMessageError, match=match) as info:
        server.next_event()
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.errno == errno_value
    after = server.next_event()  # the next message is still found
    assert after is not None and after.command is vu.Command.DEVICE_RESET


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (struct.pack("<HHIII", 1, 9, 15, 0, 0), "message size"),
        (struct.pack("<HHIII", 1, 9, 0xFFFFFFFF, 0, 0), "limit"),
        (struct.pack("<HHIII", 1, 9, 32, 0x40, 0), "reserved"),
        (struct.pack("<HHIII", 1, 9, 32, 2, 0), "neither"),
        (struct.pack("<HHIII", 1, 9, 32, 0x20, 0), "error flag"),
        (raw(9, b"", flags=1), "awaits none"),  # a reply to nothing
    ],
)
def test_untrustworthy_streams_break(wire: bytes, match: str) -> None:
    _, server = handshake()
    server.receive_data(wire, fds=(5,))
    with pytest.raises(vu.StreamBrokenError, match=match) as info:
        server.next_event()
    assert info.value.fds == (5,)  # handed back for the caller to close
    with pytest.raises(vu.StreamBrokenError):
        server.next_event()


def test_oversize_is_refused_from_the_header_alone() -> None:
    _, server = handshake()
    server.receive_data(struct.pack("<HHIII", 1, 10, LIMITS.max_message_size + 1, 0, 0))
    with pytest.raises(vu.StreamBrokenError, match="limit"):
        server.next_event()


def test_commands_before_version_break_the_stream() -> None:
    server = vu.VfioUserConnection(vu.Role.SERVER)
    server.receive_data(raw(4, vu.DeviceInfoRequest().encode()))
    with pytest.raises(vu.StreamBrokenError, match="before the VERSION"):
        server.next_event()
    client = vu.VfioUserConnection(vu.Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="before the VERSION"):
        client.send_command(vu.DeviceInfoRequest())


def version_payload(text: bytes) -> bytes:
    return b"\0\0\0\0" + text


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\0\0", "shorter than 4"),
        (version_payload(b'{"capabilities":{}}'), "NUL"),
        (version_payload(b"{not json}\0"), "not valid JSON"),
        (version_payload(b"[1,2]\0"), "must be an object"),
        (version_payload(b"[" * 5000 + b"]" * 5000 + b"\0"), "over the"),
        (version_payload(b'{"a":' * 20 + b"1" + b"}" * 20 + b"\0"), "nests 20 deep"),
        (version_payload(b'{"capabilities":{"max_msg_fds":-1}}\0'), "non-negative"),
        (version_payload(b'{"capabilities":{"max_msg_fds":1.5}}\0'), "non-negative"),
        (version_payload(b'{"capabilities":{"max_msg_fds":NaN}}\0'), "NaN"),
        (version_payload(b'{"capabilities":{"write_multiple":1}}\0'), "true or false"),
        (version_payload(b'{"capabilities":{"twin_socket":[]}}\0'), "object"),
        (version_payload(b'{"capabilities":{},"capabilities":{}}\0'), "repeats"),
        (version_payload(b'{"capabilities":{}}\0\0'), "NUL byte before"),
        (version_payload(b'\xff\xfe{}\0'), "UTF-8"),
        (version_payload(b'{"capabilities":5}\0'), "JSON object"),
    ],
)
def test_hostile_version_json_is_a_typed_error(payload: bytes, match: str) -> None:
    server = vu.VfioUserConnection(vu.Role.SERVER)
    server.receive_data(raw(1, payload))
    with pytest.raises(vu.MalformedMessageError, match=match) as info:
        server.next_event()
    assert info.value.reply_expected
    # The server answers with an errno and may take another proposal.
    server.send_error(info.value.header, info.value.errno)
    assert server.state == "await-version"


def test_unknown_capabilities_are_ignored_but_named() -> None:
    v = vu.Version.decode(version_payload(b'{"capabilities":{"future":{"x":1}}}\0'), LIMITS)
    assert v.caps.unknown == ("future",)


@pytest.mark.parametrize(
    ("body", "fds", "match"),
    [
        (vu.DmaMap(0, 0x1000), 2, "0..1"),
        (vu.SetIrqs(0, vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER, 0, 2), 1, "2..2"),
        (vu.SetIrqs(0, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_TRIGGER, 0, 1), 1, "0..0"),
        (vu.RegionAccess(2, 0, 1), 1, "0..0"),
        (vu.RegionAccess(2, 0, 1), 9, "limit is 8"),
    ],
)
def test_wrong_fd_counts_are_refused_and_handed_back(body: vu.Body, fds: int, match: str) -> None:
    _, server = handshake()
    cmd = next(c for c, cls in vu.REQUEST_BODIES.items() if isinstance(body, cls))
    server.receive_data(raw(cmd, body.encode()), fds=tuple(range(100, 100 + fds)))
    with pytest.raises(vu.MalformedMessageError, match=match) as info:
        server.next_event()
    assert info.value.fds == tuple(range(100, 100 + fds))


def test_sending_more_fds_than_the_peer_takes_is_our_error() -> None:
    client, _ = handshake()
    client.peer_caps = vu.Capabilities(max_msg_fds=1)
    with pytest.raises(LocalProtocolError, match="accepts 1"):
        client.send_command(
            vu.SetIrqs(2, vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER, 0, 2), fds=2
        )


def test_in_flight_is_bounded() -> None:
    client = vu.VfioUserConnection(vu.Role.CLIENT, vu.VfioUserLimits(max_in_flight=2))
    server = vu.VfioUserConnection(vu.Role.SERVER)
    _, wire = client.send_command(vu.Version(0, 0, client.advertised()))
    server.receive_data(wire)
    got = server.next_event()
    assert got is not None and isinstance(got.body, vu.Version)
    client.receive_data(server.send_reply(got.header, vu.negotiate(got.body, server.advertised())))
    client.next_event()
    client.send_command(vu.RegionAccess(2, 0, 1))
    client.send_command(vu.RegionAccess(2, 0, 1))
    with pytest.raises(LocalProtocolError, match="max_in_flight"):
        client.send_command(vu.RegionAccess(2, 0, 1))
    client.send_command(vu.RegionData(2, 0, b"\0"), no_reply=True)  # posted: not counted


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=4))
def test_any_bytes_give_messages_or_typed_errors(data: bytes, fd_runs: list[int]) -> None:
    # Fresh (the handshake's rules) and after a handshake (every command's decoder).
    for conn in (vu.VfioUserConnection(vu.Role.SERVER), *handshake()):
        conn.receive_data(data, fds=tuple(range(len(fd_runs))))
        for _ in range(50):
            try:
                if conn.next_event() is None:
                    break
            except vu.MalformedMessageError:
                continue
            except vu.StreamBrokenError:
                break
