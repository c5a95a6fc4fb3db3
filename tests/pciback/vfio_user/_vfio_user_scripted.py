"""A vfio-user server written here, for what real servers do not do on demand.

It speaks through the codec's server role (``VfioUserConnection(Role.SERVER)``)
in a thread. It describes a small PCI device honestly (vendor 0x1af4, BAR0 of
4 KiB memory, optionally MSI and MSI-X capabilities with 4 vectors each), keeps the eventfds
a client hands it with SET_IRQS, and fires them when the client asks
(SET_IRQS DATA_NONE|TRIGGER), as libvfio-user does. On a BAR0 read it does
what ``behaviour`` says: ``"stall"``, ``"trickle"``, ``"garbage"``, ``"wrong"``,
``"close"``, ``"dma"``, or anything else to answer normally.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.protocol import vfio_user as vu

CONFIG_SPACE = bytearray(256)  # each server works on its own copy
struct.pack_into("<HH", CONFIG_SPACE, 0, 0x1AF4, 0x10F0)  # BAR0 reads 0: 32-bit memory
#: For servers made with ``msi=True``: an MSI capability (4 vectors, 32-bit) at 0x40
#: and an MSI-X capability (4 entries; table at BAR0 0x0, PBA at BAR0 0x800) at 0x50.
MSI_CAP = 0x40
MSIX_CAP = 0x50


def _with_msi(space: bytearray) -> bytearray:
    space = bytearray(space)
    struct.pack_into("<H", space, 0x06, 0x0010)  # status: capabilities list
    space[0x34] = MSI_CAP
    struct.pack_into("<BBH", space, MSI_CAP, 0x05, MSIX_CAP, 0x0004)  # MSI, 4 vectors capable
    struct.pack_into("<BBHII", space, MSIX_CAP, 0x11, 0x00, 0x0003, 0x0000, 0x0800)
    return space


class ScriptedServer:
    """Answers the description commands; on a BAR0 read does ``behaviour``."""

    def __init__(self, sock: socket.socket, behaviour: str = "normal", *, msi: bool = False,
                 intx: bool = False) -> None:
        self.sock = sock
        self.behaviour = behaviour
        self.conn = vu.VfioUserConnection(vu.Role.SERVER)
        self.config = _with_msi(CONFIG_SPACE) if msi else bytearray(CONFIG_SPACE)
        if intx:
            self.config[0x3D] = 1  # interrupt pin A
        self.irq_counts = {
            vu.PCI_INTX_IRQ: 1 if intx else 0,
            vu.PCI_MSI_IRQ: 4 if msi else 0,
            vu.PCI_MSIX_IRQ: 4 if msi else 0,
        }
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stalled = threading.Event()
        #: Replies the server got to its own commands (DMA_READ).
        self.replies: list[vu.Received] = []
        #: The eventfds the client handed over: interrupt type -> vector -> fd.
        self.eventfds: dict[int, dict[int, int]] = {}
        self.resets = 0

    def start(self) -> ScriptedServer:
        self.thread.start()
        return self

    def _run(self) -> None:
        room = socket.CMSG_SPACE(64 * 4)
        try:
            while True:
                data, ancillary, _flags, _ = self.sock.recvmsg(65536, room)
                if not data:
                    return
                fds: list[int] = []
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[: len(payload) // 4 * 4]))
                self.conn.receive_data(data, fds)
                while (event := self.conn.next_event()) is not None:
                    if not self._answer(event):
                        return
        except OSError:
            return
        finally:
            if self.behaviour != "stall":
                self.close()

    def close(self) -> None:
        self.sock.close()
        for vectors in self.eventfds.values():
            for fd in vectors.values():
                os.close(fd)
        self.eventfds.clear()

    def _set_irqs(self, body: vu.SetIrqs, fds: tuple[int, ...]) -> None:
        vectors = self.eventfds.setdefault(body.index, {})
        if body.data_type == vu.IRQ_DATA_EVENTFD:
            for i, fd in enumerate(fds):
                old = vectors.pop(body.start + i, None)
                if old is not None:
                    os.close(old)
                vectors[body.start + i] = fd
        elif body.action == vu.IRQ_ACTION_TRIGGER and body.count == 0:
            for fd in vectors.values():
                os.close(fd)
            vectors.clear()
        elif body.action == vu.IRQ_ACTION_TRIGGER:
            for vector in range(body.start, body.start + body.count):
                if vector in vectors:
                    os.eventfd_write(vectors[vector], 1)

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
            reply = vu.IrqInfo(body.index, vu.IRQ_INFO_EVENTFD, self.irq_counts.get(body.index, 0))
        elif event.command is vu.Command.DEVICE_RESET and not event.is_reply:
            self.resets += 1
            reply = vu.Empty()
        elif isinstance(body, vu.SetIrqs):
            self._set_irqs(body, event.fds)
            reply = vu.Empty()
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
                head = vu.Header(event.msg_id, vu.Command.REGION_READ, 36, vu.MessageType.REPLY)
                whole = head.pack() + vu.RegionData(0, body.offset, bytes(4)).encode()
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
            elif self.behaviour == "close":
                return False
            else:
                reply = vu.RegionData(0, body.offset, bytes(body.count))
        elif event.is_reply or header.no_reply:
            if event.is_reply:
                self.replies.append(event)
            return True
        else:
            self.sock.sendall(self.conn.send_error(header, 22))
            return True
        self.sock.sendall(self.conn.send_reply(header, reply))
        return True


@contextmanager
def listening(
    path: Path, behaviour: str = "normal", **options: bool
) -> Iterator[list[ScriptedServer]]:
    """Listen on ``path``; the first client gets a :class:`ScriptedServer` (in the list)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    servers: list[ScriptedServer] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed before anyone came
        servers.append(ScriptedServer(conn, behaviour, **options).start())

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield servers
    finally:
        listener.close()
        for server in servers:
            server.sock.close()
