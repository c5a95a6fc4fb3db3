"""Servers that misbehave: the device fails typed, the backend and other devices live.

A real server does not stall or send garbage on demand, so these run against
the server written in ``_vfio_user_scripted``: it describes a small PCI device
honestly, then misbehaves on BAR0 reads the way each test asks.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from _vfio_user_scripted import ScriptedServer, listening

import pcifront
from pciback.devices import VfioUserClient, VfioUserDevice, VfioUserServerLost
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ErrorCode
from shared.protocol import vfio_user as vu


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
    with listening(path, "stall"):
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
