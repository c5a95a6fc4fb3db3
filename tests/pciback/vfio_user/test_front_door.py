"""pciback's vfio-user front door, driven by the raw vfio-user client (a real socket).

The backend serves pcisplit's edu model on its own vfio-user socket
(``vfio_user = "PATH"`` on the device entry); the client runs in a thread,
as a separate driver would, while the backend runs in the test's trio loop.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from pciback.config import parse_config
from pciback.devices import VfioUserClient, VfioUserErrnoError, VfioUserServerLost
from pciback.devices._edu import (
    EDU_DEVICE_ID,
    EDU_IDENTIFICATION,
    EDU_VENDOR_ID,
    REG_FACTORIAL,
    REG_ID,
    REG_LIVENESS,
    REG_STATUS,
    STATUS_COMPUTING,
    edu_factorial,
)
from pciback.guests.vfio_user import pieces
from pciback.testing import running_backend
from shared.errors import ConfigFileError
from shared.protocol import vfio_user as vu

T = TypeVar("T")
CONFIG = vu.PCI_CONFIG_REGION


def edu_config(sock: Path, *, guest_keys: str = "", policy: str = "") -> str:
    return f"""
[[guest]]
name = "vm1"
{guest_keys}
[[device]]
id = "edu0"
model = "edu"
guest = "vm1"
vfio_user = "{sock}"
{policy}
"""


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def _word(client: VfioUserClient, region: int, offset: int) -> int:
    return int.from_bytes(client.region_read(region, offset, 4), "little")


async def test_edu_end_to_end(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def drive() -> None:
            with VfioUserClient.connect(sock) as client:
                info = client.device_info()
                assert info.flags == vu.DEVICE_FLAG_RESET | vu.DEVICE_FLAG_PCI
                assert (info.num_regions, info.num_irqs) == (vu.PCI_NUM_REGIONS, vu.PCI_NUM_IRQS)
                cfg = client.region_info(CONFIG)
                assert cfg.size == 256 and cfg.readable and cfg.writable
                bar0 = client.region_info(0)
                assert bar0.size == 1 << 20 and bar0.readable and bar0.writable
                assert client.region_info(1).size == 0  # not implemented
                assert client.region_info(vu.PCI_VGA_REGION).flags == 0
                ids = _word(client, CONFIG, 0)
                assert ids == EDU_DEVICE_ID << 16 | EDU_VENDOR_ID
                # Any size and alignment: 3 bytes at offset 1 are split and reassembled.
                assert client.region_read(CONFIG, 1, 3) == struct.pack("<I", ids)[1:]
                assert _word(client, 0, REG_ID) == EDU_IDENTIFICATION
                client.region_write(0, REG_LIVENESS, struct.pack("<I", 0x12345678))
                assert _word(client, 0, REG_LIVENESS) == 0x12345678 ^ 0xFFFFFFFF
                client.region_write(0, REG_FACTORIAL, struct.pack("<I", 10))
                for _ in range(10_000):  # the model computes in a task of the backend
                    if not _word(client, 0, REG_STATUS) & STATUS_COMPUTING:
                        break
                assert _word(client, 0, REG_FACTORIAL) == edu_factorial(10)
                # A posted write gets no reply; the next command's reply is its own.
                client.region_write(0, REG_LIVENESS, struct.pack("<I", 1), posted=True)
                assert _word(client, 0, REG_LIVENESS) == 0xFFFFFFFE
                # Out of a region's range, or a region that does not exist: EINVAL.
                with pytest.raises(VfioUserErrnoError) as exc:
                    client.region_read(CONFIG, 254, 4)
                assert exc.value.errno == errno.EINVAL
                with pytest.raises(VfioUserErrnoError) as exc:
                    client.region_read(3, 0, 4)
                assert exc.value.errno == errno.EINVAL
                client.reset()
                assert _word(client, 0, REG_LIVENESS) == 0xFFFFFFFF  # reset: liveness 0
                assert _word(client, 0, REG_ID) == EDU_IDENTIFICATION

        await in_thread(drive)
        assert door.stats.connections == 1 and door.stats.errors == 2
        assert door.stats.disconnects == 0


async def test_config_writes_go_through_the_policy(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def drive() -> None:
            with VfioUserClient.connect(sock) as client:
                # The vendor id is read-only: the write is dropped, not answered with an error.
                client.region_write(CONFIG, 0, b"\xff\xff")
                assert _word(client, CONFIG, 0) == EDU_DEVICE_ID << 16 | EDU_VENDOR_ID
                # BAR0 sizing through the policy's virtual BARs: all ones, then the size mask.
                client.region_write(CONFIG, 0x10, b"\xff\xff\xff\xff")
                assert _word(client, CONFIG, 0x10) & 0xFFFFFFF0 == 0xFFF00000

        await in_thread(drive)
        assert door.stats.writes_dropped == 1 and door.stats.errors == 0


async def test_the_device_is_reset_when_the_client_leaves(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def write_and_leave() -> None:
            with VfioUserClient.connect(sock) as client:
                client.region_write(0, REG_LIVENESS, struct.pack("<I", 0x55))

        def read() -> int:
            with VfioUserClient.connect(sock) as client:
                return _word(client, 0, REG_LIVENESS)

        await in_thread(write_and_leave)
        while door.client is not None or door.stats.connections < 1:
            await trio.testing.wait_all_tasks_blocked()
        assert await in_thread(read) == 0xFFFFFFFF
        assert door.stats.connections == 2


async def test_one_client_at_a_time(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def second_is_refused() -> None:
            with VfioUserClient.connect(sock) as first:
                with pytest.raises(VfioUserServerLost):
                    VfioUserClient.connect(sock, timeout=5.0)
                assert _word(first, 0, REG_ID) == EDU_IDENTIFICATION

        await in_thread(second_is_refused)
        assert door.stats.refused == 1


async def test_peer_credentials_decide(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    # A guest that only uid 4242 may act as: this process is not it.
    config = edu_config(sock, guest_keys="uid = 4242")
    async with running_backend(config, tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]
        with pytest.raises(VfioUserServerLost):
            await in_thread(lambda: VfioUserClient.connect(sock, timeout=5.0))
        assert door.stats.refused == 1 and door.stats.connections == 0


async def test_a_broken_stream_ends_only_that_connection(tmp_path: Path) -> None:
    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        door = running.backend.vfio_doors["edu0"]

        def hostile() -> None:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(5.0)
            raw.connect(str(sock))
            # A header announcing a message far over any limit: the stream is not trusted.
            raw.sendall(struct.pack("<HHIII", 0, 1, 0xFFFFFFF0, 0, 0))
            assert raw.recv(16) == b""  # the backend hung up
            raw.close()

        await in_thread(hostile)
        while door.client is not None:
            await trio.testing.wait_all_tasks_blocked()
        assert door.stats.disconnects == 1

        def well_behaved() -> int:
            with VfioUserClient.connect(sock) as client:
                return _word(client, 0, REG_ID)

        assert await in_thread(well_behaved) == EDU_IDENTIFICATION


def test_pieces_are_naturally_aligned() -> None:
    assert list(pieces(1, 7)) == [(1, 1), (2, 2), (4, 4)]
    assert list(pieces(0x80, 8, 8)) == [(0x80, 8)]
    assert list(pieces(6, 5, 8)) == [(6, 2), (8, 2), (10, 1)]


def test_config_needs_a_guest_and_one_socket_per_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="needs key 'guest'"):
        parse_config('[[device]]\nid = "e"\nmodel = "edu"\nvfio_user = "a.sock"\n')
    text = (
        '[[guest]]\nname = "g"\n'
        '[[device]]\nid = "a"\nmodel = "edu"\nguest = "g"\nvfio_user = "x.sock"\n'
        '[[device]]\nid = "b"\nmodel = "edu"\nguest = "g"\nvfio_user = "x.sock"\n'
    )
    with pytest.raises(ConfigFileError, match="one device per socket"):
        parse_config(text, base=tmp_path)


async def test_ctl_list_shows_who_drives_the_device(tmp_path: Path) -> None:
    from pciback.cli import main
    from pciback.service import Backend

    sock = tmp_path / "edu0.sock"
    config = parse_config(
        'listen = ["memory:h9-ctl-list"]\n' + edu_config(sock), base=tmp_path
    )
    backend = Backend(config, control=tmp_path / "pciback.ctl")

    def ctl_list() -> dict[str, object]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["ctl", "--control", str(tmp_path / "pciback.ctl"), "list"]) == 0
        text = out.getvalue()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["ctl", "--control", str(tmp_path / "pciback.ctl"), "list", "--json"])
        row = next(r for r in json.loads(out.getvalue())["result"] if r["id"] == "edu0")
        return {"text": text, "row": row}

    def while_connected() -> dict[str, object]:
        with VfioUserClient.connect(sock) as client:
            assert _word(client, 0, REG_ID) == EDU_IDENTIFICATION
            return ctl_list()

    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        idle = await in_thread(ctl_list)
        busy = await in_thread(while_connected)
        nursery.cancel_scope.cancel()
    assert idle["row"]["vfio_user"] == {"socket": str(sock), "client": None}  # type: ignore[index]
    assert f"vfio-user: edu0 on {sock} for guest vm1: no client" in str(idle["text"])
    client = busy["row"]["vfio_user"]["client"]  # type: ignore[index]
    assert client.startswith(f"vfio-user:{sock} pid {os.getpid()} uid {os.getuid()}")
    assert f"for guest vm1: {client}" in str(busy["text"])


async def test_a_native_session_ending_does_not_reset_what_a_vfio_user_client_drives(
    tmp_path: Path,
) -> None:
    import pcifront
    from pciback.testing import TEST_TOKEN

    sock = tmp_path / "edu0.sock"
    async with running_backend(edu_config(sock), tmp=tmp_path) as running:
        client = await in_thread(lambda: VfioUserClient.connect(sock))
        with client:
            await in_thread(
                lambda: client.region_write(0, REG_LIVENESS, struct.pack("<I", 0x77))
            )
            # The same guest connects natively and leaves: its last native connection ended.
            async with pcifront.connect(
                running.address("memory"), guest="vm1", token=TEST_TOKEN
            ) as bus:
                assert len(bus.devices) == 1
            while running.backend.sessions:  # the backend finishes with that session
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert await in_thread(lambda: _word(client, 0, REG_LIVENESS)) == 0x77 ^ 0xFFFFFFFF
