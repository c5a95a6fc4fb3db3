"""Devices imported from vfio-user servers: ``kind = "vfio-user"``.

The backend connects to a server someone else wrote (libvfio-user's samples,
SPDK's NVMe emulation, ...) as a vfio-user client and serves its device like
any other provider, so the policy, identity, hot-plug and reset machinery
apply:

- config space is the server's region 7, read and written through the
  guest's policy like a host device's;
- BAR accesses are REGION_READ/REGION_WRITE on regions 0-5 (the BAR kind and
  flags come from the server's own BAR registers);
- the server's interrupts are eventfds handed over with DEVICE_SET_IRQS (INTx
  from the start; MSI or MSI-X vectors while the guest has that mode on);
  tasks wait on them and raise the interrupts in the IRQ router, so the guest
  gets them through its event channels (``_vfio_user_irqs``);
- reset is DEVICE_RESET.

Accesses are synchronous (the provider contract): each one is a round trip on
the socket, bounded by ``timeout``. A server that dies, stalls or breaks the
protocol is contained: the connection is closed, the device fails every later
access with :class:`VfioUserServerLost`, and the backend and its other guests
go on. See ``docs/vfio-user.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from shared.errors import ConfigAccessError, ErrorCode
from shared.pci import Reg, check_access
from shared.protocol import vfio_user as vu

from ._base import BarKind, BarSpec, DeviceContext, DeviceProvider, DeviceSetupError
from ._vfio_user_client import VfioUserClient, VfioUserServerLost
from ._vfio_user_irqs import ForwardingInterruptState, ServerInterrupts

__all__ = ["VfioUserDevice"]

log = logging.getLogger("pcisplit.backend")


class VfioUserDevice(DeviceProvider):
    """A device served by a vfio-user server at ``socket_path``."""

    kind = "vfio-user"

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        client: VfioUserClient | None = None,
    ) -> None:
        """Connect, negotiate and read the device's description.

        Raises :class:`DeviceSetupError` when the server's device is not a PCI
        device pcisplit can serve, and :class:`VfioUserServerLost` when the
        server cannot be reached.
        """
        self.path = Path(socket_path)
        self.client = client or VfioUserClient.connect(self.path, timeout=timeout)
        self.client.closing_hook = _notify_closing
        self._ctx: DeviceContext | None = None
        try:
            self._describe()
        except BaseException:
            self.client.close()
            raise
        self._irq = ServerInterrupts(self.client, self.irqs, str(self.path))
        # The one interrupt state, reporting the guest's mode changes to the server.
        self._interrupt_state = ForwardingInterruptState(self._irq.mode_changed)

    def _describe(self) -> None:
        client = self.client
        self.info = client.device_info()
        if not self.info.flags & vu.DEVICE_FLAG_PCI:
            raise DeviceSetupError(f"{self.path}: the server's device is not a PCI device")
        if self.info.num_regions <= vu.PCI_CONFIG_REGION:
            raise DeviceSetupError(
                f"{self.path}: the server offers {self.info.num_regions} regions; a PCI device "
                "needs at least 8 (BAR0-5, ROM, config space)"
            )
        self.regions = {
            i: client.region_info(i) for i in range(min(self.info.num_regions, vu.PCI_NUM_REGIONS))
        }
        self.irqs = {
            i: client.irq_info(i) for i in range(min(self.info.num_irqs, vu.PCI_NUM_IRQS))
        }
        config = self.regions[vu.PCI_CONFIG_REGION].size
        if config >= 4096:
            self._config_size = 4096
        elif config >= 256:
            self._config_size = 256
        else:
            raise DeviceSetupError(
                f"{self.path}: the server's config region is {config} bytes (256 or 4096 needed)"
            )
        self._bars = self._read_bars()
        self._bar_sizes = {b.index: b.size for b in self._bars}

    def _read_bars(self) -> list[BarSpec]:
        bars: list[BarSpec] = []
        index = 0
        while index < 6:
            size = self.regions[index].size if index in self.regions else 0
            register = self.config_read(Reg.BAR0 + 4 * index, 4)
            if not size:
                index += 1
                continue
            if register & 0x1:
                kind, prefetchable = BarKind.IO, False
            else:
                kind = BarKind.MEM64 if register & 0x6 == 0x4 else BarKind.MEM32
                prefetchable = bool(register & 0x8)
            try:
                bars.append(BarSpec(index, size, kind, prefetchable))
            except ValueError as exc:
                raise DeviceSetupError(f"{self.path}: region {index}: {exc}") from exc
            index += 2 if kind is BarKind.MEM64 else 1
        return bars

    def __repr__(self) -> str:
        return f"VfioUserDevice({str(self.path)!r})"

    @property
    def interrupts_forwarded(self) -> int:
        """Interrupts the server raised and the IRQ router was given."""
        return self._irq.forwarded

    @property
    def lost(self) -> VfioUserServerLost | None:
        """Why the server connection was lost, or None while the device works."""
        return self.client.lost

    # -- the provider contract ----------------------------------------------------------

    @property
    def config_size(self) -> int:
        return self._config_size

    def config_read(self, offset: int, size: int) -> int:
        check_access(offset, size, self._config_size)
        data = self.client.region_read(vu.PCI_CONFIG_REGION, offset, size)
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        check_access(offset, size, self._config_size)
        self.client.region_write(vu.PCI_CONFIG_REGION, offset, value.to_bytes(size, "little"))

    def config_image(self) -> bytes:
        return self.client.region_read(vu.PCI_CONFIG_REGION, 0, self._config_size)

    def bars(self) -> list[BarSpec]:
        return list(self._bars)

    def rom_size(self) -> int:
        rom = self.regions.get(vu.PCI_ROM_REGION)
        return rom.size if rom is not None else 0

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self._check_bar(bar, offset, size)
        return int.from_bytes(self.client.region_read(bar, offset, size), "little")

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self._check_bar(bar, offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise ConfigAccessError(
                f"BAR{bar}: value {value:#x} does not fit in a {size}-byte write",
                code=ErrorCode.INVALID_SIZE,
            )
        self.client.region_write(bar, offset, value.to_bytes(size, "little"))

    def _check_bar(self, bar: int, offset: int, size: int) -> None:
        limit = self._bar_sizes.get(bar)
        if limit is None:
            raise ConfigAccessError(
                f"BAR{bar} is not implemented by the vfio-user server at {self.path}",
                code=ErrorCode.NOT_FOUND,
            )
        try:
            check_access(offset, size, limit, sizes=(1, 2, 4, 8))
        except ConfigAccessError as exc:
            raise ConfigAccessError(f"BAR{bar} ({limit:#x} bytes): {exc.message}",
                                    code=exc.code) from exc

    def reset(self) -> None:
        """DEVICE_RESET (when the server offers it); interrupts back to INTx, watched again."""
        if self.info.flags & vu.DEVICE_FLAG_RESET:
            self.client.reset()
        if self._ctx is not None:
            # The backend cancelled the device's tasks before this reset: watch again.
            self._irq.rewatch()
            self._watch_socket_soon(self._ctx)
        self.interrupt_state.reset()

    # -- interrupts ---------------------------------------------------------------------

    def attach(self, ctx: DeviceContext) -> None:
        """Hand the server an eventfd for INTx, and watch it and the socket."""
        self._ctx = ctx
        self._irq.attach(ctx)
        self._watch_socket_soon(ctx)

    def _watch_socket_soon(self, ctx: DeviceContext) -> None:
        try:
            ctx.spawn(self._watch_socket, "vfio-user socket")
        except RuntimeError:
            # The backend is stopping (its nursery takes no new tasks): the reset
            # that brought us here is its last one, and there is nothing to watch.
            log.debug("vfio-user device %s: not watched again (the backend is stopping)",
                      self.path)

    def loopback_interrupt(self, index: int = vu.PCI_INTX_IRQ, vector: int = 0) -> None:
        """Ask the server to fire interrupt ``vector`` of ``index`` itself
        (SET_IRQS DATA_NONE|ACTION_TRIGGER): the whole path, server eventfd to the
        guest's event channel, without the device model's help."""
        self.client.set_irqs(
            vu.SetIrqs(index, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_TRIGGER, vector, 1)
        )

    async def _watch_socket(self) -> None:
        """Notice a server that goes away (or asks for DMA) while nobody accesses it."""
        ctx = self._ctx
        assert ctx is not None
        while self.client.lost is None:
            try:
                await trio.lowlevel.wait_readable(self.client.fileno())
            except (trio.ClosedResourceError, VfioUserServerLost):
                return
            async with ctx.locked():
                if self.client.lost is not None:
                    return
                try:
                    self.client.service_nowait()
                except VfioUserServerLost as exc:
                    log.warning("vfio-user device %s failed: %s", self.path, exc)
                    return

    def close(self) -> None:
        """Close the connection and the interrupt eventfds."""
        self._irq.close()
        self.client.close()


def _notify_closing(fd: int) -> None:
    """Wake trio tasks waiting on ``fd`` before it is closed (no-op outside trio)."""
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # not inside trio.run: nobody can be waiting
