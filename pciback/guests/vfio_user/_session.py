"""One vfio-user client connection to one served device: commands in, replies out, in order.

The codec (:mod:`shared.protocol.vfio_user`) decides what is a message; this
module moves bytes and descriptors and answers each command against the
device's guest-facing access path (:class:`pciback.plane.access.DeviceAccess`:
the config region through the policy, BARs to the model), under the device's
lock, exactly as the native dispatcher does.

Rules (see ``docs/vfio-user.md``):

* commands are answered one at a time, in the order they arrived;
* a posted command (NO_REPLY) never gets a reply, not even an error;
* a config write that the policy refuses is dropped and counted
  (``writes_dropped``), as kernel VFIO does; the policy's audit log has it;
* a malformed message gets an errno reply (its descriptors closed); when the
  stream cannot be trusted any more (:class:`~shared.protocol.vfio_user.StreamBrokenError`),
  the connection ends, logged;
* a client that stops reading its replies stalls only itself: a reply that
  cannot be sent within :data:`SEND_TIMEOUT` seconds ends the connection.

Every received descriptor is owned by this session from the moment it arrives
and closed unless a command keeps it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from pciback._ratelog import ScopedLog
from pciback.guests.vfio_user._dma import ClientDma
from pciback.guests.vfio_user._errors import ClientStalledError, CommandRefusedError
from pciback.guests.vfio_user._irqs import ClientInterrupts
from pciback.guests.vfio_user._regions import CONFIG, pieces, region_info, region_size
from pciback.plane.dma import GuestDma
from pciback.plane.irq import IrqRouter
from pciback.plane.registry import DeviceRegistry, ServedDevice
from pciback.policy import AccessDeniedError
from shared.errors import PcisplitError
from shared.evtchn import EventfdStalledError
from shared.protocol import vfio_user as vu
from shared.sync import FastLock

__all__ = ["VfioUserSession", "VfioUserStatistics", "ClientStalledError", "SEND_TIMEOUT"]

log = logging.getLogger("pcisplit.backend")

#: Seconds a reply may wait for the client to read before the connection ends.
SEND_TIMEOUT = 5.0
_RECV_SIZE = 256 * 1024
#: Most replies held back while more commands are already buffered (bounds reply latency).
REPLY_BATCH = 32
#: The widest piece a BAR access is split into (config accesses: 4 bytes).
BAR_WIDEST = 8


@dataclass
class VfioUserStatistics:
    """Counters of one device's vfio-user front door (``pciback ctl list``)."""

    connections: int = 0
    #: Connections refused: wrong peer credentials, or the device already has a client.
    refused: int = 0
    commands: int = 0
    #: Config writes the policy refused (dropped, as kernel VFIO does).
    writes_dropped: int = 0
    #: Commands answered with an errno (malformed, out of range, not supported).
    errors: int = 0
    #: Connections ended because the client broke the stream, stalled or a bug struck.
    disconnects: int = 0
    #: Device model failures (logged with their traceback).
    model_failures: int = 0


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i:i + 4], "little") for i in range(0, usable, 4))
    return fds


class VfioUserSession:
    """The server side of one vfio-user connection, for the device ``dev`` of ``guest``."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        dev: ServedDevice,
        guest: str,
        *,
        registry: DeviceRegistry,
        router: IrqRouter,
        dma: GuestDma,
        stats: VfioUserStatistics,
        events: ScopedLog,
        limits: vu.VfioUserLimits | None = None,
        max_fds: int | None = None,
    ) -> None:
        self.sock = sock
        self.dev = dev
        self.guest = guest
        self.registry = registry
        self.router = router
        self.stats = stats
        self.events = events
        self.conn = vu.VfioUserConnection(vu.Role.SERVER, limits)
        self.max_fds = max_fds
        self._send_lock = FastLock()
        #: Replies of the current burst of commands, sent together (:meth:`_flush`).
        self._out: list[bytes] = []
        #: Region sizes by index, read once (a device's regions do not change while served).
        self._sizes: dict[int, int] | None = None
        self.outbox = router.outbox(guest)
        self.irqs = ClientInterrupts(dev, guest, router, self.outbox, events)
        self.dma = ClientDma(dma, self.conn, self._send, events, guest)
        #: Commands that keep the descriptors that come with them.
        self._takes_fds = {vu.Command.DEVICE_SET_IRQS, vu.Command.DMA_MAP}
        self._handlers: dict[vu.Command, Callable[..., Awaitable[vu.Body]]] = {
            vu.Command.VERSION: self._version,
            vu.Command.DEVICE_GET_INFO: self._device_info,
            vu.Command.DEVICE_GET_REGION_INFO: self._region_info,
            vu.Command.REGION_READ: self._region_read,
            vu.Command.REGION_WRITE: self._region_write,
            vu.Command.DEVICE_RESET: self._reset,
            vu.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            vu.Command.DEVICE_SET_IRQS: self._set_irqs,
            vu.Command.DMA_MAP: self._dma_map,
            vu.Command.DMA_UNMAP: self._dma_unmap,
        }

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the client leaves; raises what ended the connection otherwise.

        However it ends, the client's eventfds are closed, the device's interrupts
        are disabled and its DMA windows unmapped (after their in-flight DMA).
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver_interrupts, name="vfio-user interrupts")
                await self._receive()
                nursery.cancel_scope.cancel()
        finally:
            self.irqs.close()
            self.router.release_outbox(self.outbox)
            with trio.CancelScope(shield=True):
                await self.dma.close()

    async def _deliver_interrupts(self) -> None:
        try:
            await self.outbox.run(self.irqs.deliver)
        except EventfdStalledError as exc:
            raise ClientStalledError(f"the client made an interrupt eventfd block: {exc}") from None

    async def _receive(self) -> None:
        conn = self.conn
        room = socket.CMSG_SPACE(max(conn.limits.max_msg_fds, 1) * 4)
        try:
            while True:
                try:
                    data, ancillary, flags, _ = await self.sock.recvmsg(
                        _RECV_SIZE, room, socket.MSG_CMSG_CLOEXEC
                    )
                except (ConnectionResetError, BrokenPipeError):
                    return
                fds = _fds_of(ancillary)
                if flags & socket.MSG_CTRUNC:
                    _close_all(fds)
                    raise vu.StreamBrokenError(
                        f"the client sent more descriptors at once than one message may "
                        f"carry ({conn.limits.max_msg_fds})"
                    )
                if not data:
                    _close_all(fds)
                    return
                conn.receive_data(data, fds)
                while True:
                    try:
                        received = conn.next_event()
                    except vu.MalformedMessageError as exc:
                        _close_all(exc.fds)
                        await self._malformed(exc)
                        continue
                    except vu.StreamBrokenError as exc:
                        _close_all(exc.fds)
                        raise
                    if received is None:
                        break
                    if len(self._out) >= REPLY_BATCH:
                        await self._flush()
                    if received.is_reply:
                        self.dma.resolve(received)
                    else:
                        await self._answer(received)
                await self._flush()
        finally:
            _close_all(conn.take_held_fds())

    async def _malformed(self, exc: vu.MalformedMessageError) -> None:
        self.stats.errors += 1
        self.events.log(
            "malformed messages", logging.INFO, "guest %s: vfio-user client of %s sent a "
            "malformed message: %s", self.guest, self.dev.id, exc,
        )
        if exc.reply_expected:
            self._out.append(self.conn.send_error(exc.header, exc.errno))

    async def _answer(self, received: vu.Received) -> None:
        header = received.header
        self.stats.commands += 1
        handler = self._handlers.get(received.command)
        try:
            if handler is None:
                _close_all(received.fds)
                raise CommandRefusedError(
                    errno.ENOTSUP, f"{received.command.name} is not supported by this server"
                )
            if received.command is vu.Command.DMA_UNMAP:
                await self._flush()  # it may wait for DMA that needs the client's answer
            if received.command in self._takes_fds:
                self._check_fd_budget(received.fds)
                reply = await handler(received.body, list(received.fds))
            else:
                _close_all(received.fds)
                reply = await handler(received.body)
        except CommandRefusedError as exc:
            self.stats.errors += 1
            self.events.log(
                f"refused {received.command.name}", logging.INFO,
                "guest %s: vfio-user %s on %s refused (%s): %s", self.guest,
                received.command.name, self.dev.id, exc.errno_name, exc.message,
            )
            if not header.no_reply:
                self._out.append(self.conn.send_error(header, exc.errno))
            if exc.fatal:
                await self._flush()
                raise vu.StreamBrokenError(f"{received.command.name}: {exc.message}") from None
            return
        if not header.no_reply:
            self._out.append(self.conn.send_reply(header, reply))

    def _check_fd_budget(self, fds: Sequence[int]) -> None:
        if self.max_fds is None or not fds:
            return
        held = self.irqs.held_fds + self.dma.held_fds
        if held + len(fds) > self.max_fds:
            _close_all(fds)
            raise CommandRefusedError(
                errno.ENOSPC, f"the command came with {len(fds)} descriptor(s), but this "
                f"connection holds {held} and may hold {self.max_fds} "
                "(limits.max_fds_per_connection)",
            )

    async def _flush(self) -> None:
        """Send the replies of one burst of commands at once (one system call)."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        await self._send_lock.acquire()
        try:
            await self._send_unlocked(data)
        finally:
            self._send_lock.release()

    async def _send_unlocked(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            with trio.fail_after(SEND_TIMEOUT):
                while view:
                    sent = await self.sock.send(view)
                    view = view[sent:]
        except trio.TooSlowError:
            raise ClientStalledError(
                f"the client did not read its replies for {SEND_TIMEOUT} s"
            ) from None
        except OSError as exc:
            raise ClientStalledError(f"the client left: {exc.strerror or exc}") from None

    # -- device access -------------------------------------------------------------------

    async def _enter(self) -> ServedDevice:
        dev = self.dev
        await dev.lock.acquire()
        if dev.guest != self.guest:
            dev.lock.release()
            raise ClientStalledError(
                f"device {dev.id} was taken from guest {self.guest!r}; its vfio-user "
                "connection ends"
            )
        return dev

    def _model_failed(self, what: str) -> CommandRefusedError:
        self.stats.model_failures += 1
        self.events.log(
            "device model failures", logging.ERROR, "device %s failed on vfio-user %s of "
            "guest %s", self.dev.id, what, self.guest, exc_info=True,
        )
        return CommandRefusedError(errno.EIO, f"the device model failed on {what}")

    def _region_sizes(self) -> dict[int, int]:
        if self._sizes is None:
            access = self.dev.access
            config, resources = len(access.config_image()), access.bar_sizes()
            self._sizes = {
                i: region_size(i, config, resources) for i in range(vu.PCI_NUM_REGIONS)
            }
        return self._sizes

    def _check_range(self, region: int, offset: int, count: int) -> int:
        """The region's size; refuses an access outside it."""
        size = self._region_sizes().get(region, 0)
        if size == 0:
            raise CommandRefusedError(
                errno.EINVAL, f"region {region} is not implemented by {self.dev.id}"
            )
        if offset + count > size:
            raise CommandRefusedError(
                errno.EINVAL, f"{count} bytes at {offset:#x} of region {region} pass its end "
                f"({size:#x} bytes)",
            )
        return size

    # -- commands ------------------------------------------------------------------------

    async def _version(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.Version)
        ours = self.conn.advertised(vu.Capabilities(pgsizes=vu.DEFAULT_PGSIZES))
        try:
            return vu.negotiate(body, ours)
        except PcisplitError as exc:
            # The specification: a server that cannot speak the version closes the socket.
            raise CommandRefusedError(errno.ENOTSUP, str(exc), fatal=True) from None

    async def _device_info(self, body: vu.Body | None) -> vu.Body:
        return vu.DeviceInfo(
            vu.DEVICE_FLAG_RESET | vu.DEVICE_FLAG_PCI, vu.PCI_NUM_REGIONS, vu.PCI_NUM_IRQS
        )

    async def _region_info(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.RegionInfoRequest)
        dev = await self._enter()
        try:
            sizes = self._region_sizes()
            info = region_info(body.index, sizes[CONFIG], dev.access.bar_sizes())
        finally:
            dev.lock.release()
        return info.fitted(body.argsz)

    async def _region_read(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.RegionAccess)
        region, offset, count = body.region, body.offset, body.count
        dev = await self._enter()
        out = bytearray()
        try:
            self._check_range(region, offset, count)
            access = dev.access
            try:
                if region == CONFIG:
                    for at, size in pieces(offset, count):
                        out += access.config_read(at, size).to_bytes(size, "little")
                else:
                    for at, size in pieces(offset, count, BAR_WIDEST):
                        out += access.bar_read(region, at, size).to_bytes(size, "little")
            except PcisplitError as exc:
                raise CommandRefusedError(errno.EINVAL, exc.message) from None
            except Exception:  # noqa: BLE001 - a model bug ends nothing; logged in _model_failed
                raise self._model_failed(f"a read of region {region}") from None
        finally:
            dev.lock.release()
        return vu.RegionData(region, offset, bytes(out))

    async def _region_write(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.RegionData)
        region, offset, data = body.region, body.offset, body.data
        dev = await self._enter()
        try:
            self._check_range(region, offset, len(data))
            access = dev.access
            try:
                widest = 4 if region == CONFIG else BAR_WIDEST
                for at, size in pieces(offset, len(data), widest):
                    value = int.from_bytes(data[at - offset:at - offset + size], "little")
                    if region == CONFIG:
                        try:
                            access.config_write(at, size, value)
                        except AccessDeniedError:
                            # Dropped, as kernel VFIO does; the policy's audit log has it.
                            self.stats.writes_dropped += 1
                    else:
                        access.bar_write(region, at, size, value)
            except PcisplitError as exc:
                raise CommandRefusedError(errno.EINVAL, exc.message) from None
            except Exception:  # noqa: BLE001 - a model bug ends nothing; logged in _model_failed
                raise self._model_failed(f"a write of region {region}") from None
        finally:
            dev.lock.release()
        return vu.RegionAccess(region, offset, len(data))

    async def _reset(self, body: vu.Body | None) -> vu.Body:
        dev = await self._enter()
        try:
            # The registry's reset: the model, the policy's registers, the interrupt state;
            # a failure is logged and counted there.
            ok = self.registry.reset(dev, f"vfio-user DEVICE_RESET from guest {self.guest}")
        finally:
            dev.lock.release()
        if not ok:
            raise CommandRefusedError(
                errno.EIO, f"resetting {dev.id} failed (the backend log says why)"
            )
        return vu.Empty()

    # -- interrupts and DMA ----------------------------------------------------------------

    async def _irq_info(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.IrqInfoRequest)
        dev = await self._enter()
        try:
            return self.irqs.info(body.index)
        finally:
            dev.lock.release()

    async def _set_irqs(self, body: vu.Body | None, fds: list[int]) -> vu.Body:
        assert isinstance(body, vu.SetIrqs)
        try:
            dev = await self._enter()
        except BaseException:
            _close_all(fds)
            raise
        try:
            self.irqs.set_irqs(body, fds)
        finally:
            dev.lock.release()
        return vu.Empty()

    async def _dma_map(self, body: vu.Body | None, fds: list[int]) -> vu.Body:
        assert isinstance(body, vu.DmaMap)
        self.dma.map(body, fds)
        return vu.Empty()

    async def _dma_unmap(self, body: vu.Body | None) -> vu.Body:
        assert isinstance(body, vu.DmaUnmap)
        await self.dma.unmap(body)
        return body
