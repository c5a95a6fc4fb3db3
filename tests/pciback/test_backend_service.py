"""The backend service end to end, through the real frontend and through raw protocol peers."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

import pcifront
from pciback.config import parse_config
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ErrorCode, RemoteProtocolError
from shared.protocol import (
    Connection,
    DoneReply,
    ErrorReply,
    Goodbye,
    HandshakeRejected,
    Limits,
    PingRequest,
    Role,
    decode,
    encode_frame,
)
from shared.transport import TransportOptions, open_transport
from tests.support.configs import ONE_GUEST, device_table, edu_config
from tests.support.tls import TlsFiles

DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"

TWO_GUESTS = (
    edu_config(["alpha", "beta"], {"edu-a": "alpha"})
    + device_table(
        "sata", "beta", model=None, kind="snapshot", dump=str(DATA / "sata_intel_ich10_ahci.txt")
    )
    + device_table("edu-b", "beta")
    + device_table("spare")
)


@pytest.mark.parametrize("kind", ["memory", "unix", "tcp"])
async def test_edu_through_the_whole_stack(kind: str, tmp_path: Path) -> None:
    async with (
        running_backend(
            ONE_GUEST,
            transports=(kind,),
            tmp=tmp_path,
        ) as rb,
        pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus,
    ):
        (edu,) = bus.devices
        assert await edu.bar_read(0, 0x04, 4) == 0xFFFFFFFF  # ~0 at power-on
        assert edu.address == "0000:00:00.0"
        assert (edu.vendor_id, edu.device_id, edu.class_code) == (0x1234, 0x11E8, 0x00FF00)
        assert await edu.config_read(0, 4) == 0x11E81234
        assert await edu.config_read(8, 1) == 0x10
        assert await edu.bar_read(0, 0x00, 4) == 0x010000ED
        await edu.bar_write(0, 0x04, 4, 0xF0F0F0F0)
        assert await edu.bar_read(0, 0x04, 4) == 0x0F0F0F0F
        await edu.bar_write(0, 0x08, 4, 10)
        while await edu.bar_read(0, 0x20, 4) & 1:
            await trio.sleep(0)
        assert await edu.bar_read(0, 0x08, 4) == 3628800
        await edu.reset()
        assert await edu.bar_read(0, 0x04, 4) == 0xFFFFFFFF  # ~0 after reset
        await bus.ping()


async def test_many_requests_in_flight_get_one_reply_each(tmp_path: Path) -> None:
    async with (
        running_backend(
            ONE_GUEST,
            transports=("unix",),
            tmp=tmp_path,
        ) as rb,
        pcifront.connect(rb.address("unix"), guest="guest0") as bus,
    ):
        edu = bus.devices[0]
        results: dict[int, int] = {}

        async def read(i: int) -> None:
            results[i] = await edu.config_read((i % 16) * 4, 4)

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(read, i)
        image = (await bus.refresh(include_config=True))[0].config
        assert image is not None
        for i, value in results.items():
            off = (i % 16) * 4
            assert value == int.from_bytes(image[off : off + 4], "little")
        assert bus.statistics().max_in_flight_seen > 1
        assert bus.statistics().replies_received >= 300


async def test_each_guest_sees_only_its_devices_in_assignment_order(tmp_path: Path) -> None:
    async with running_backend(TWO_GUESTS, transports=("memory",), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address("memory"), guest="alpha") as alpha:
            assert [(d.address, d.device_id) for d in alpha.devices] == [("0000:00:00.0", 0x11E8)]
        async with pcifront.connect(rb.address("memory"), guest="beta") as beta:
            # sata is 00:1f.2 on its host: it keeps function 2 on virtual slot 0.
            assert [(d.address, d.vendor_id, d.device_id) for d in beta.devices] == [
                ("0000:00:00.2", 0x8086, 0x3A22),
                ("0000:00:01.0", 0x1234, 0x11E8),
            ]
            # beta cannot reach alpha's device: there is nothing at alpha's address for beta.
            with pytest.raises(pcifront.DeviceNotFoundError) as info:
                await beta.device("00:00.0").config_read(0, 4)
            assert info.value.code is ErrorCode.NOT_FOUND


async def test_bad_accesses_get_clear_typed_errors(pcisplit_bus: pcifront.Bus) -> None:
    edu = pcisplit_bus.devices[0]
    with pytest.raises(pcifront.InvalidAccessError) as info:
        await edu.config_read(0x11, 2)
    assert info.value.code is ErrorCode.INVALID_OFFSET and "misaligned" in str(info.value)
    with pytest.raises(pcifront.InvalidAccessError) as info:
        await edu.config_read(0x400, 4)  # edu has a 256-byte config space
    assert "outside" in str(info.value)
    with pytest.raises(pcifront.InvalidAccessError):
        await edu.bar_read(0, 0x00, 2)  # edu MMIO below 0x80 is 4-byte only
    with pytest.raises(pcifront.RequestError) as info:
        await edu.bar_read(3, 0, 4)  # no BAR3
    assert info.value.code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_OFFSET)
    # The connection is still fine after all of that.
    assert await edu.config_read(0, 2) == 0x1234


async def test_unknown_guest_is_refused_by_name(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(pcifront.HandshakeError) as info:
        async with pcifront.connect(pcisplit_backend.address("memory"), guest="mallory"):
            pass
    assert info.value.code is ErrorCode.UNKNOWN_GUEST
    assert "mallory" in str(info.value)


async def _raw_open(address: str, *, guest: str = "guest0", version: tuple[int, int] = (1, 0)):  # type: ignore[no-untyped-def]
    transport = await open_transport(address, TransportOptions())
    conn = Connection(Role.CLIENT, limits=Limits(), guest=guest, version=version)
    await transport.send_frame(conn.hello())
    reply = conn.receive(await transport.receive_frame())
    return transport, conn, reply


async def test_version_mismatch_names_both_versions(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    transport, _conn, reply = await _raw_open(pcisplit_backend.address("unix"), version=(2, 3))
    async with transport:
        assert isinstance(reply, HandshakeRejected)
        assert reply.code is ErrorCode.VERSION_MISMATCH
        assert "2.3" in reply.message and "1.0" in reply.message


async def test_unknown_operation_gets_not_implemented(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    transport, conn, _ = await _raw_open(pcisplit_backend.address("unix"))
    async with transport:
        await transport.send_frame(msgpack.packb([0x1F, 77, 1, 2]))
        reply = decode(await transport.receive_frame(), max_size=65536)
        assert isinstance(reply, ErrorReply) and reply.request_id == 77
        assert reply.code is ErrorCode.NOT_IMPLEMENTED
        # Still serving this peer.
        await transport.send_frame(conn.send(PingRequest(conn.next_request_id())))
        assert isinstance(conn.receive(await transport.receive_frame()), DoneReply)


async def test_malformed_frame_disconnects_only_that_peer(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    address = pcisplit_backend.address("unix")
    async with pcifront.connect(address, guest="guest0") as good:
        transport, _conn, _ = await _raw_open(address)
        async with transport:
            await transport.send_frame(b"\xc1garbage")  # 0xc1 is never valid msgpack
            last = await transport.receive_frame()
            with pytest.raises(trio.EndOfChannel):
                await transport.receive_frame()
        bye = decode(last, max_size=65536)  # the backend says why before it hangs up
        assert isinstance(bye, Goodbye) and bye.code is ErrorCode.PROTOCOL_ERROR
        assert await good.devices[0].config_read(0, 2) == 0x1234


async def test_oversized_frame_disconnects_only_that_peer(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    address = pcisplit_backend.address("unix")
    async with pcifront.connect(address, guest="guest0") as good:
        transport, _conn, _ = await _raw_open(address)
        stream = transport.stream  # type: ignore[attr-defined]
        async with transport:
            # Announce a 1 GiB frame; the backend must refuse before buffering it.
            await stream.send_all(encode_frame(b"")[:0] + (1 << 30).to_bytes(4, "little"))
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                while True:
                    await transport.receive_frame()
        assert await good.devices[0].config_read(0, 2) == 0x1234
        assert pcisplit_backend.backend.statistics().disconnects_for_misbehaviour >= 1


async def test_peer_that_vanishes_mid_request_does_not_hurt_others(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    address = pcisplit_backend.address("unix")
    for _ in range(5):
        transport, conn, _ = await _raw_open(address)
        await transport.send_frame(conn.send(PingRequest(conn.next_request_id())))
        await transport.aclose()
    async with pcifront.connect(address, guest="guest0") as bus:
        assert await bus.devices[0].config_read(0, 2) == 0x1234


async def test_handshake_timeout_drops_silent_peer(tmp_path: Path) -> None:
    cfg = parse_config("[[guest]]\nname='guest0'", base=tmp_path)
    async with running_backend(cfg, transports=("memory",), tmp=tmp_path) as rb:
        rb.backend.handshake_timeout = 0.05
        transport = await open_transport(rb.address("memory"))
        async with transport:
            with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
                with trio.fail_after(5):
                    await transport.receive_frame()


async def test_goodbye_is_sent_on_protocol_violation(pcisplit_backend) -> None:  # type: ignore[no-untyped-def]
    transport, conn, _ = await _raw_open(pcisplit_backend.address("unix"))
    async with transport:
        await transport.send_frame(b"\x93\x01\x02")  # a Hello again, truncated: fatal
        with pytest.raises(RemoteProtocolError):
            conn.receive(b"\x93\x01\x02")
        bye = decode(await transport.receive_frame(), max_size=65536)
        assert isinstance(bye, Goodbye) and bye.code is ErrorCode.PROTOCOL_ERROR
        assert bye.message  # it says why before closing
        with pytest.raises((trio.EndOfChannel, trio.BrokenResourceError)):
            await transport.receive_frame()


async def test_plain_tcp_needs_explicit_permission(tmp_path: Path) -> None:
    text = "[[guest]]\nname='guest0'\n[[device]]\nid='e'\nmodel='edu'\nguest='guest0'"
    async with running_backend(
        text, transports=("tcp",), tmp=tmp_path, allow_plain_tcp=False
    ) as rb:
        with pytest.raises(pcifront.HandshakeError) as info:
            async with pcifront.connect(rb.address("tcp"), guest="guest0", token=TEST_TOKEN):
                pass
        assert info.value.code is ErrorCode.ACCESS_DENIED and "allow_plain_tcp" in str(info.value)
    async with running_backend(text, transports=("tcp",), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address("tcp"), guest="guest0", token=TEST_TOKEN) as bus:
            assert bus.devices[0].vendor_id == 0x1234


async def test_tls_client_certificate_names_the_guest(tmp_path: Path, tls_files: TlsFiles) -> None:
    config = tls_files.section + edu_config(["guest0", "guest1"], {"e": "guest0"})
    client_ctx = tls_files.client_context("guest0")
    async with running_backend(config, transports=("tls",), tmp=tmp_path) as rb:
        opts = TransportOptions(ssl_context=client_ctx)
        async with pcifront.connect(rb.address("tls"), guest="guest0", options=opts) as bus:
            assert bus.devices[0].device_id == 0x11E8
        with pytest.raises(pcifront.HandshakeError) as info:
            async with pcifront.connect(
                rb.address("tls"), guest="guest1", options=TransportOptions(ssl_context=client_ctx)
            ):
                pass
        assert info.value.code is ErrorCode.NOT_AUTHORIZED and "guest0" in str(info.value)


async def test_backend_goodbye_reaches_waiting_requests_as_connection_lost(
    pcisplit_backend,  # type: ignore[no-untyped-def]
) -> None:
    async with pcifront.connect(pcisplit_backend.address("memory"), guest="guest0") as bus:
        await bus.transport.aclose()
        with pytest.raises(pcifront.ConnectionLostError):
            await bus.devices[0].config_read(0, 4)
