"""Servers that misbehave: the device fails typed, the backend and other devices live.

A real server does not stall or send garbage on demand, so this one is written
here with the codec's server role (``VfioUserConnection(Role.SERVER)``) and runs
in a thread: it describes a small PCI device honestly, then misbehaves on BAR0
reads the way each test asks.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import pcifront
from pciback.devices import VfioUserClient, VfioUserDevice, VfioUserServerLost
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ErrorCode
from shared.protocol import vfio_user as vu

CONFIG_SPACE = bytearray(256)  # each server works on its own copy
struct.pack_into("<HH", CONFIG_SPACE, 0, 0x1AF4, 0x10F0)  # BAR0 reads 0: 32-bit memory


class ScriptedServer:
    """Answers the description commands; on a BAR0 read does ``behaviour``."""

    def __init__(self, sock: socket.socket, behaviour: str) -> None:
        self.sock = sock
        self.behaviour = behaviour
        self.conn = vu.VfioUserConnection(vu.Role.SERVER)
        self.config = bytearray(CONFIG_SPACE)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stalled = threading.Event()
        #: Replies the server got to its own commands (DMA_READ).
        self.replies: list[vu.Received] = []

    def start(self) -> ScriptedServer:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not None:
                    if not self._answer(event):
                        return
        except OSError:
            return
        finally:
            if self.behaviour != "stall":
                self.sock.close()

    def _answer(self, event: vu.Received) -> bool:
        body, header = event.body, event.header
        reply: vu.Body
        if isinstance(body, vu.Version):
            reply = vu.negotiate(body, self.conn.advertised())
        elif isinstance(body, vu.DeviceInfoRequest):
            reply = vu.DeviceInfo(vu.DEVICE_FLAG_PCI | vu.DEVICE_FLAG_RESET, 9, 5)
        elif isinstance(body, vu.RegionInfoRequest):
            size = {0: 0x1000, 7: 256}.get(body.index, 0)
            reply = vu.RegionInfo(body.index, 3 if size else 0, size)
        elif isinstance(body, vu.IrqInfoRequest):
            reply = vu.IrqInfo(body.index, vu.IRQ_INFO_EVENTFD, 0)
        elif isinstance(body, vu.RegionAccess) and body.region == 7:
            data = bytes(self.config[body.offset:body.offset + body.count])
            reply = vu.RegionData(7, body.offset, data)
        elif isinstance(body, vu.RegionData) and body.region == 7:
            self.config[body.offset:body.offset + body.count] = body.data
            reply = vu.RegionAccess(7, body.offset, body.count)
        elif isinstance(body, vu.RegionAccess) and body.region == 0:
            if self.behaviour == "stall":
                self.stalled.set()
                return True  # read on, answer nothing
            if self.behaviour == "garbage":
                self.sock.sendall(b"\xff" * 16)
                return False
            if self.behaviour == "trickle":
                # A valid reply, one byte at a time: each read comes quickly, the whole never.
                header = vu.Header(event.msg_id, vu.Command.REGION_READ, 36, vu.MessageType.REPLY)
                whole = header.pack() + vu.RegionData(0, body.offset, bytes(4)).encode()
                for byte in whole:
                    self.sock.sendall(bytes([byte]))
                    time.sleep(0.05)  # the peer's pace, not a synchronisation
                return True
            if self.behaviour == "dma":
                # Ask for client memory first (the client mapped none), then answer.
                _, ask = self.conn.send_command(vu.DmaAccess(0x1000, 8))
                self.sock.sendall(ask)
                reply = vu.RegionData(0, body.offset, b"\x5a" * body.count)
            elif self.behaviour == "wrong":
                reply = vu.RegionData(0, body.offset + 4, bytes(body.count))
            else:  # "close"
                return False
        elif event.is_reply or header.no_reply:
            if event.is_reply:
                self.replies.append(event)
            return True
        else:
            self.sock.sendall(self.conn.send_error(header, 22))
            return True
        self.sock.sendall(self.conn.send_reply(header, reply))
        return True


def scripted_device(behaviour: str) -> tuple[VfioUserDevice, ScriptedServer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = ScriptedServer(theirs, behaviour).start()
    client = VfioUserClient(ours, timeout=0.3, name="scripted server")
    client.negotiate()
    return VfioUserDevice("scripted", client=client), server


@pytest.mark.parametrize(
    ("behaviour", "match"),
    [
        ("stall", "no answer within 0.3 s"),
        ("trickle", "no answer within 0.3 s"),
        ("garbage", "broke the protocol"),
        ("wrong", "answered a read of 4 bytes at 0x0"),
        ("close", "closed the connection"),
    ],
)
def test_a_misbehaving_server_fails_the_device_typed(behaviour: str, match: str) -> None:
    device, _server = scripted_device(behaviour)
    assert device.config_read(0, 2) == 0x1AF4
    assert [b.size for b in device.bars()] == [0x1000]
    with pytest.raises(VfioUserServerLost, match=match):
        device.bar_read(0, 0, 4)
    assert device.lost is not None
    # From now on every access fails at once, with the same reason.
    with pytest.raises(VfioUserServerLost, match=match):
        device.config_read(0, 4)
    device.close()


def test_a_server_asking_for_dma_is_refused_and_goes_on() -> None:
    device, server = scripted_device("dma")
    assert device.bar_read(0, 0, 4) == 0x5A5A5A5A
    assert device.config_read(0, 2) == 0x1AF4  # the server has read our answer by now
    (answer,) = server.replies
    assert answer.command is vu.Command.DMA_READ and answer.is_error
    assert answer.header.error_no == errno.EFAULT
    assert device.lost is None
    device.close()


async def test_a_stalled_server_costs_its_guest_one_time_out_and_no_more(tmp_path: Path) -> None:
    path = tmp_path / "stall.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    servers: list[ScriptedServer] = []

    def accept() -> None:
        conn, _ = listener.accept()
        servers.append(ScriptedServer(conn, "stall").start())

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    config = f"""
[[guest]]
name = "guest0"
[[device]]
id = "bad0"
kind = "vfio-user"
socket = "{path}"
timeout = 0.3
guest = "guest0"
[[device]]
id = "edu0"
model = "edu"
guest = "guest0"
"""
    try:
        async with (
            running_backend(config, tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            bad, edu = sorted(bus.devices, key=lambda d: d.vendor_id == 0x1234)
            assert await bad.config_read(0, 2) == 0x1AF4
            with pytest.raises(pcifront.RequestError) as info:
                await bad.bar_read(0, 0, 4)
            assert info.value.code == ErrorCode.OPERATION_FAILED
            assert "no answer within 0.3 s" in str(info.value)
            with pytest.raises(pcifront.RequestError):
                await bad.config_read(0, 4)
            assert await edu.bar_read(0, 0x00, 4) == 0x010000ED
            assert rb.backend.registry.get("bad0").provider.lost is not None  # type: ignore[attr-defined]
    finally:
        listener.close()
        for server in servers:
            server.sock.close()
