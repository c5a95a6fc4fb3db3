"""One device's vfio-user socket: who may connect, one client at a time, reset on release.

The specification serves one device per socket, so each ``[[device]]`` entry
with ``vfio_user = "PATH"`` gets its own listening socket. The device's guest
(its ``guest`` key) is the only peer that may connect, proven by the
kernel's peer credentials exactly as for a ``unix:`` listener
(:func:`pciback.guests.identity.authorize`). While one client is connected a
second one is refused (closed at once, logged): a device has one driver.

When the client leaves - however it leaves - the device is reset, so nothing
the guest wrote reaches the next one. Any failure of a connection (a broken
stream, a client that stops reading, a bug) ends that connection only; it is
logged once and counted in :class:`VfioUserStatistics`.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from pciback._ratelog import RateLimitedLog
from pciback.config import BackendConfig
from pciback.guests.identity import GuestConfig, authorize
from pciback.guests.vfio_user._errors import ClientStalledError
from pciback.guests.vfio_user._session import VfioUserSession, VfioUserStatistics
from pciback.plane.dma import DmaHub
from pciback.plane.irq import IrqRouter
from pciback.plane.registry import DeviceRegistry, ServedDevice
from shared.errors import PcisplitError
from shared.protocol import vfio_user as vu
from shared.transport import TransportConnectError
from shared.transport._identity import peercred_identity

__all__ = ["VfioUserDoor", "open_doors"]

log = logging.getLogger("pcisplit.backend")


class VfioUserDoor:
    """The vfio-user socket of the device ``dev``, served to the guest ``guest``."""

    def __init__(
        self,
        path: Path,
        dev: ServedDevice,
        guest: GuestConfig,
        *,
        registry: DeviceRegistry,
        router: IrqRouter,
        dma: DmaHub,
        reset: Callable[[ServedDevice, str], Awaitable[bool]],
        guest_log: RateLimitedLog,
        mode: int = 0o600,
        group: int | None = None,
        max_fds: int | None = None,
    ) -> None:
        self.path = path
        self.dev = dev
        self.guest = guest
        self.registry = registry
        self.router = router
        self.dma = dma
        self.max_fds = max_fds
        self._reset = reset
        self.guest_log = guest_log
        self.mode = mode
        self.group = group
        self.stats = VfioUserStatistics()
        #: The connected client's identity (a short text), or None.
        self.client: str | None = None
        self._listener: trio.socket.SocketType | None = None

    async def open(self) -> None:
        """Create the listening socket (a stale socket file from an earlier run is replaced)."""
        path = os.fspath(self.path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, self.mode)
            if self.group is not None:
                os.chown(path, -1, self.group)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise TransportConnectError(
                f"device {self.dev.id}: cannot serve vfio-user on {path}: "
                f"{exc.strerror or exc}; check that the directory exists and that nothing "
                "else uses the path"
            ) from exc
        self._listener = sock
        log.info("device %s: serving vfio-user on %s to guest %s", self.dev.id, path,
                 self.guest.name)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def serve(self) -> None:
        """Accept clients until cancelled; one at a time is served, others are refused."""
        assert self._listener is not None, "open() first"
        listener = self._listener
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    self.guest_log.log(
                        f"vfio-user {self.dev.id}", "accept failures", logging.WARNING,
                        "device %s: accepting a vfio-user client on %s failed: %s; retrying",
                        self.dev.id, self.path, exc.strerror or exc,
                    )
                    await trio.sleep(0.1)
                    continue
                refusal = self._refusal(sock)
                if refusal is not None:
                    self.stats.refused += 1
                    self.guest_log.log(
                        f"vfio-user {self.dev.id}", "refused clients", logging.WARNING,
                        "device %s: vfio-user client on %s refused: %s", self.dev.id,
                        self.path, refusal,
                    )
                    sock.close()
                    continue
                self.client = peercred_identity(sock, f"vfio-user:{self.path}").describe()
                nursery.start_soon(self._run, sock)

    def _refusal(self, sock: trio.socket.SocketType) -> str | None:
        if self.client is not None:
            return f"it already has a client ({self.client}); a device has one driver"
        if self.dev.guest != self.guest.name:
            return (f"the device is not assigned to guest {self.guest.name!r} now "
                    "(pciback ctl assign gives it back)")
        identity = peercred_identity(sock, f"vfio-user:{self.path}")
        refused = authorize(self.guest, identity, scheme="unix", token=b"")
        return None if refused is None else refused.message

    async def _run(self, sock: trio.socket.SocketType) -> None:
        guest = self.guest.name
        self.stats.connections += 1
        events = self.guest_log.scoped(f"guest {guest} (vfio-user {self.dev.id})")
        self.guest_log.log(
            f"guest {guest}", "connections", logging.INFO,
            "device %s: vfio-user client connected (%s)", self.dev.id, self.client,
        )
        session = VfioUserSession(
            sock, self.dev, guest, registry=self.registry, router=self.router,
            dma=self.dma.space(guest), stats=self.stats, events=events, max_fds=self.max_fds,
        )
        try:
            await session.run()
        except (vu.VfioUserProtocolError, ClientStalledError) as exc:
            self.stats.disconnects += 1
            events.log("disconnects", logging.WARNING,
                       "device %s: vfio-user client of guest %s disconnected: %s",
                       self.dev.id, guest, exc)
        except (PcisplitError, OSError) as exc:
            self.stats.disconnects += 1
            events.log("disconnects", logging.WARNING,
                       "device %s: vfio-user connection of guest %s failed: %s",
                       self.dev.id, guest, exc)
        except Exception:  # noqa: BLE001 - a bug ends this connection only; logged with traceback
            self.stats.disconnects += 1
            events.log("failures", logging.ERROR,
                       "device %s: vfio-user connection of guest %s failed (a bug)",
                       self.dev.id, guest, exc_info=True)
        finally:
            sock.close()
            events.close()
            self.client = None
            with trio.CancelScope(shield=True):
                if self.dev.guest == guest:
                    # Whatever the guest wrote must not reach its next driver (XSA-306).
                    await self._reset(self.dev, f"vfio-user client of guest {guest} left")


async def open_doors(
    config: BackendConfig,
    registry: DeviceRegistry,
    router: IrqRouter,
    dma: DmaHub,
    reset: Callable[[ServedDevice, str], Awaitable[bool]],
    guest_log: RateLimitedLog,
) -> dict[str, VfioUserDoor]:
    """Open one vfio-user socket per device whose entry names one, by device id.

    If one cannot be opened, those already open are closed and the error raised.
    """
    doors: dict[str, VfioUserDoor] = {}
    try:
        for cfg in config.devices:
            if cfg.vfio_user is None or cfg.guest is None:
                continue
            door = VfioUserDoor(
                cfg.vfio_user, registry.get(cfg.id), config.guests[cfg.guest],
                registry=registry, router=router, dma=dma, reset=reset, guest_log=guest_log,
                mode=config.listen_mode, group=config.listen_group,
                max_fds=config.resources.max_fds_per_connection,
            )
            await door.open()
            doors[cfg.id] = door
    except BaseException:
        for door in doors.values():
            door.close()
        raise
    return doors
