"""Hostile vfio-user clients against pciback's vfio-user front door.

The backend process serves ``edu2`` to guest1 over vfio-user (``edu2.sock``)
and ``edu3`` to guest0 (``edu3.sock``). Each attack runs on edu2's socket
while guest0 probes natively (the ``sentinel``: alive, answers in time, fds
and RSS back afterwards); after it, a well-behaved vfio-user client drives
edu3 and a fresh one drives edu2 (the attacked connection ended; the next
client finds the device reset and working). libvfio-user's sample server, for
comparison, exits when a handshake fails or is abandoned, blocks on a
client's eventfd and loses its place when a message arrives in two pieces.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest
import trio
from conftest import EDU_BAR_ID, EDU_ID, sentinel

from pciback.devices import VfioUserClient, VfioUserErrnoError
from shared.protocol import vfio_user as vu

KIND = "unix"
HEADER = struct.Struct("<HHIII")
VERSION_OK = vu.Version(0, 0, vu.Capabilities()).encode()
ACCESS = struct.Struct("<QII")
TRIGGER_FDS = vu.IRQ_DATA_EVENTFD | vu.IRQ_ACTION_TRIGGER


def _frame(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER.size + len(payload), flags, 0) + payload


def _read_cfg(msg_id: int, offset: int = 0, count: int = 4, flags: int = 0) -> bytes:
    return _frame(msg_id, vu.Command.REGION_READ, ACCESS.pack(offset, vu.PCI_CONFIG_REGION, count),
                  flags)


def _posted_write(msg_id: int) -> bytes:
    return _frame(msg_id, vu.Command.REGION_WRITE,
                  ACCESS.pack(4, 0, 4) + b"\x01\x00\x00\x00", vu.FLAG_NO_REPLY)


async def _raw(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return sock


async def _until_closed(sock: trio.socket.SocketType, seconds: float = 10.0) -> bytes:
    got = b""
    with trio.fail_after(seconds):
        try:
            while chunk := await sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: a reset, still a close
    return got


async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    got = b""
    with trio.fail_after(10.0):
        while len(got) < n:
            chunk = await sock.recv(n - len(got))
            assert chunk, "the backend closed the connection"
            got += chunk
    return got


async def _first_answer(
    path: Path, message: bytes
) -> tuple[trio.socket.SocketType, tuple[int, ...]]:
    """Connect and send ``message``; returns the socket and the answer's header. A client
    that comes while the previous one is still being closed is refused (one client at a
    time): then try again, bounded."""
    for _ in range(200):
        sock = await _raw(path)
        await sock.send(message)
        try:
            data = await _recv_exactly(sock, HEADER.size)
        except (ConnectionResetError, AssertionError):  # refused: closed at once
            sock.close()
            await trio.sleep(0.05)
            continue
        return sock, HEADER.unpack(data)
    raise AssertionError(f"{path} refused every client")


async def _raw_ready(path: Path) -> trio.socket.SocketType:
    """A raw connection that completed the VERSION handshake."""
    sock, head = await _first_answer(path, _frame(0, vu.Command.VERSION, VERSION_OK))
    assert not head[3] & vu.FLAG_ERROR, head
    await _recv_exactly(sock, head[2] - HEADER.size)
    return sock


async def _handshake(sock: trio.socket.SocketType) -> None:
    await sock.send(_frame(0, vu.Command.VERSION, VERSION_OK))
    head = HEADER.unpack(await _recv_exactly(sock, HEADER.size))
    await _recv_exactly(sock, head[2] - HEADER.size)


def _well_behaved(path: Path) -> tuple[int, int]:
    with VfioUserClient.connect(path, timeout=10.0) as client:
        ids = int.from_bytes(client.region_read(vu.PCI_CONFIG_REGION, 0, 4), "little")
        bar = int.from_bytes(client.region_read(0, 0, 4), "little")
        return ids, bar


async def _others_fine(backend, *, attacked: bool = True) -> None:
    """edu3 (guest0 over vfio-user) and (``attacked``) a fresh client of edu2 both work."""
    for name in ("edu3.sock", "edu2.sock")[: 2 if attacked else 1]:
        path = backend.workdir / name
        for _ in range(100):  # the attacked connection may still be closing: one client each
            try:
                got = await trio.to_thread.run_sync(_well_behaved, path)
                break
            except Exception:  # noqa: BLE001 - retried: refused while the old client is closing
                await trio.sleep(0.05)
        else:
            raise AssertionError(f"no well-behaved client got through on {name}")
        assert got == (EDU_ID, EDU_BAR_ID)


async def test_abandoned_and_failed_handshakes(backend):
    async with sentinel(backend, KIND):
        path = backend.workdir / "edu2.sock"
        for attack in (
            b"",  # connect, say nothing, leave
            HEADER.pack(0, 1, 40, 0, 0)[:10],  # half a header, then leave
            _frame(0, vu.Command.VERSION, vu.Version(7, 0).encode()),  # a major we do not speak
            _read_cfg(0),  # a command before VERSION
        ):
            sock = await _raw(path)
            if attack:
                await sock.send(attack)
            if len(attack) >= HEADER.size:
                await _until_closed(sock)
            sock.close()
        # A VERSION whose JSON is broken gets an errno; the client may propose again.
        sock, head = await _first_answer(
            path, _frame(0, vu.Command.VERSION, b"\x00\x00\x00\x00{\"x\":\x00")
        )
        assert head[3] & vu.FLAG_ERROR and head[4] == errno.EINVAL, head
        await _handshake(sock)
        sock.close()
        await _others_fine(backend)


async def test_message_in_pieces_and_pipelined(backend):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        data = _read_cfg(1) + _read_cfg(2, 2, 2)
        for piece in (data[:3], data[3:17], data[17:40], data[40:]):
            await sock.send(piece)
            await trio.sleep(0.01)  # the pieces arrive apart (what we test, not a sync)
        first = await _recv_exactly(sock, HEADER.size + ACCESS.size + 4)
        assert first[-4:] == EDU_ID.to_bytes(4, "little")
        second = await _recv_exactly(sock, HEADER.size + ACCESS.size + 2)
        assert second[-2:] == (EDU_ID >> 16).to_bytes(2, "little")
        sock.close()
        await _others_fine(backend)


@pytest.mark.parametrize("size", [0, 8, 15, 0xFFFFFFFF, (1 << 20) + 4096])
async def test_impossible_sizes_end_the_connection(backend, size):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        await sock.send(HEADER.pack(1, vu.Command.REGION_READ, size, 0, 0))
        await _until_closed(sock)
        sock.close()
        await _others_fine(backend)


async def test_malformed_commands_get_errnos(backend):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        bad = (
            _frame(1, vu.Command.REGION_READ, b"\x00" * 5),  # short payload
            _frame(2, 0x7777),  # unknown command
            _frame(3, vu.Command.REGION_READ, ACCESS.pack(0, 99, 4)),  # no such region
            _frame(4, vu.Command.REGION_READ, ACCESS.pack(0xFFFFFFF0, 0, 64)),  # past the BAR
        )
        for frame in bad:
            await sock.send(frame)
            head = HEADER.unpack(await _recv_exactly(sock, HEADER.size))
            assert head[3] & vu.FLAG_ERROR and head[4] in (errno.EINVAL, errno.ENOSYS), head
        sock.close()
        await _others_fine(backend)


async def test_client_that_never_reads(backend):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        big = _frame(1, vu.Command.REGION_READ, ACCESS.pack(0, 0, 1 << 16))
        with trio.move_on_after(2.0):
            for _ in range(10_000):  # until the socket buffers are full both ways
                await sock.send(big)
        await _others_fine(backend, attacked=False)  # while this client holds edu2
        sock.close()
        await _others_fine(backend)


async def test_no_reply_flood(backend):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        flood = b"".join(_posted_write(i & 0xFFFF) for i in range(20_000))
        view = memoryview(flood)
        while view:
            view = view[await sock.send(view):]
        await sock.send(_read_cfg(7))  # the one reply the client gets
        head = HEADER.unpack(await _recv_exactly(sock, HEADER.size))
        assert head[0] == 7 and not head[3] & vu.FLAG_ERROR
        sock.close()
        await _others_fine(backend)


async def test_fd_floods(backend):
    async with sentinel(backend, KIND):
        sock = await _raw_ready(backend.workdir / "edu2.sock")
        r, w = os.pipe()
        try:
            fds = [r] * 8
            for i in range(200):  # descriptors with commands that take none: EINVAL, closed
                await sock.sendmsg([_read_cfg(i)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               struct.pack("8i", *fds))])
                head = HEADER.unpack(await _recv_exactly(sock, HEADER.size))
                assert head[3] & vu.FLAG_ERROR and head[4] == errno.EINVAL, head
            # More descriptors than one message may carry: the stream is not trusted.
            await sock.sendmsg([_read_cfg(999)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             struct.pack("64i", *([r] * 64)))])
            await _until_closed(sock)
        finally:
            os.close(r)
            os.close(w)
            sock.close()
        await _others_fine(backend)


def _dma_and_eventfd_abuse(path: Path) -> None:
    with VfioUserClient.connect(path, timeout=10.0) as client:
        # DMA maps unaligned, at page 0, of a partial page, overlapping; unmapping what is not
        # mapped.
        for body in (vu.DmaMap(0x1001, 4096), vu.DmaMap(0, 4096),
                     vu.DmaMap(0x300000, 100)):
            with pytest.raises(VfioUserErrnoError):
                client.call(body)
        client.call(vu.DmaMap(0x100000, 0x4000))
        with pytest.raises(VfioUserErrnoError):
            client.call(vu.DmaMap(0x102000, 0x4000))
        with pytest.raises(VfioUserErrnoError):
            client.call(vu.DmaUnmap(0x200000, 0x1000))
        # A memfd shorter than the map: refused, never a SIGBUS later.
        memfd = os.memfd_create("short", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4096)
        with pytest.raises(VfioUserErrnoError):
            client.call(vu.DmaMap(0x400000, 0x10000), fds=[memfd])
        os.close(memfd)
        # A blocking eventfd whose counter is full, then a closed one.
        efd = os.eventfd(0)
        os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)
        client.set_irqs(vu.SetIrqs(vu.PCI_MSI_IRQ, TRIGGER_FDS, 0, 1), [efd])
        os.close(efd)
        for _ in range(50):
            client.region_write(0, 0x60, b"\x01\x00\x00\x00")  # raise
            client.region_write(0, 0x64, b"\x01\x00\x00\x00")  # ack
        # edu DMA into a message-backed window this client never answers: it times out.
        client.region_write(0, 0x80, struct.pack("<Q", 0x100000))
        client.region_write(0, 0x88, struct.pack("<Q", 0x40000))
        client.region_write(0, 0x90, struct.pack("<Q", 64))
        client.region_write(0, 0x98, struct.pack("<Q", 1))
        assert int.from_bytes(client.region_read(0, 0, 4), "little") == EDU_BAR_ID


async def test_dma_and_eventfd_abuse(backend):
    async with sentinel(backend, KIND):
        await trio.to_thread.run_sync(_dma_and_eventfd_abuse, backend.workdir / "edu2.sock")
        await _others_fine(backend)
