"""The sysfs mirror: the guest's virtual bus as a FUSE file system shaped like ``/sys/bus/pci``.

    DIR/devices/DDDD:BB:DD.F/{config,vendor,device,class,revision,subsystem_vendor,
                              subsystem_device,irq,resource,numa_node,enable,driver}
    DIR/slots/

so that unmodified ``lspci -A linux-sysfs -O sysfs.path=DIR`` and ``setpci -A
linux-sysfs -O sysfs.path=DIR`` work on the guest's bus. Built on pyfuse3,
which is trio-native: every file-system request is a trio task that awaits
the backend like any other guest code.

* Every file is opened with ``direct_io``, so every read reaches the backend
  (with its policy applied) instead of the page cache. ``config`` reads and
  writes are split into naturally aligned 1/2/4-byte accesses as the kernel
  does; reads past the config size return end of file, as the kernel's do.
* Text attributes are rendered when opened (as sysfs does on first read),
  from the live header, by :mod:`pcifront.tools.sysfs`.
* A write goes through the backend's policy; a denied one fails the
  ``pwrite`` with ``EACCES`` and logs a line, never a silent success.
* Entries carry no cache time-out, so a device the backend hot-plugs or
  unplugs (``bus.changes()``, followed by :meth:`GuestFs.follow_changes`)
  appears or disappears at once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from pcifront.client.bus import Bus, Device
from pcifront.client.changes import ChangesOverflowError
from pcifront.core.errors import AccessDeniedError, ConnectionLostError, InvalidAccessError
from pcifront.tools.sysfs import ATTRIBUTES, DeviceView, device_files
from shared.errors import PcisplitError

try:  # pyfuse3 is the optional ``mount`` extra
    import pyfuse3
except ImportError:  # pragma: no cover - exercised only without the extra
    pyfuse3 = None

__all__ = ["GuestFs", "MountError", "mounted", "check_mountpoint", "DRIVER_NAME"]

log = logging.getLogger("pcisplit.mount")

#: The FUSE device; its absence is a one-line error.
FUSE_DEVICE = "/dev/fuse"
#: What the ``driver`` link names (``lspci -k`` prints "Kernel driver in use: pcifront").
DRIVER_NAME: Final = "pcifront"
_HEADER_BYTES: Final = 0x48
_ROOT: Final = 1
_DEVICES: Final = 2
_SLOTS: Final = 3
_FIRST_DEVICE_INODE: Final = 1000
_INODES_PER_DEVICE: Final = 64
_SYSFS_ATTR_SIZE: Final = 4096
_DIR_MODE: Final = stat.S_IFDIR | 0o755


class MountError(PcisplitError):
    """The mirror cannot be mounted (no /dev/fuse, no pyfuse3, a bad mount point...)."""


@dataclass
class _Node:
    inode: int
    name: bytes
    parent: int
    mode: int
    device: Device | None = None
    attribute: str | None = None  # file name inside a device directory
    children: dict[bytes, int] = field(default_factory=dict)


@dataclass
class _Handle:
    node: _Node
    data: bytes = b""


def _split(offset: int, length: int) -> list[tuple[int, int]]:
    """Naturally aligned (offset, size) pieces covering a byte range, as the kernel splits them."""
    pieces = []
    end = offset + length
    while offset < end:
        if offset & 1 or end - offset == 1:
            size = 1
        elif offset & 2 or end - offset < 4:
            size = 2
        else:
            size = 4
        pieces.append((offset, size))
        offset += size
    return pieces


def _config_size(device: Device) -> int:
    return len(device.config) if device.config is not None else 256


class _Operations(pyfuse3.Operations if pyfuse3 is not None else object):  # type: ignore[misc]
    """The pyfuse3 callbacks over a :class:`GuestFs` inode table."""

    enable_writeback_cache = False

    def __init__(self, fs: GuestFs) -> None:
        super().__init__()
        self.fs = fs
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    # -- attributes and lookup ------------------------------------------------------
    def _attr(self, node: _Node) -> Any:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        if node.attribute == "config" and node.device is not None:
            attr.st_size = _config_size(node.device)
        elif node.attribute == "driver":
            attr.st_size = len(self.fs.driver_target)
        elif node.attribute is not None:
            attr.st_size = _SYSFS_ATTR_SIZE
        stamp = self.fs.mounted_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        # No caching: hot-plug must show at once, and every access must reach us.
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        return attr

    def _node(self, inode: int) -> _Node:
        node = self.fs.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._node(child))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.attribute != "driver":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.fs.driver_target

    # -- directories -----------------------------------------------------------------
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        node = self._node(fh)
        entries = sorted(node.children.items())
        for position, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            child = self.fs.nodes.get(inode)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(child), position):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and node.attribute != "config":
            raise pyfuse3.FUSEError(errno.EACCES)
        handle = _Handle(node)
        if node.attribute != "config":
            handle.data = await self.fs.render(node)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if handle.node.attribute != "config":
            return handle.data[off : off + size]
        device = self.fs.device_of(handle.node)
        end = min(off + size, _config_size(device))
        out = bytearray()
        for offset, width in _split(off, max(end - off, 0)):
            value = await self.fs.call(device.config_read(offset, width), "read", device, offset)
            out += value.to_bytes(width, "little")
        return bytes(out)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if handle.node.attribute != "config":
            raise pyfuse3.FUSEError(errno.EACCES)
        device = self.fs.device_of(handle.node)
        end = min(off + len(buf), _config_size(device))
        for offset, width in _split(off, max(end - off, 0)):
            value = int.from_bytes(buf[offset - off : offset - off + width], "little")
            await self.fs.call(
                device.config_write(offset, width, value), "write", device, offset, value
            )
        return max(end - off, 0)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        # Shells open with O_TRUNC; a config space cannot be truncated, so ignore it.
        return self._attr(self._node(inode))

    async def statfs(self, ctx: Any) -> Any:
        result = pyfuse3.StatvfsData()
        result.f_bsize = 4096
        result.f_namemax = 255
        return result


class GuestFs:
    """The inode table of one guest's bus, and what its files read and write."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.nodes: dict[int, _Node] = {}
        self.mounted_ns = trio.current_time_ns() if hasattr(trio, "current_time_ns") else 0
        self.driver_target = f"../../../bus/pci/drivers/{DRIVER_NAME}".encode()
        self.denied_writes = 0
        self._slots: dict[str, int] = {}  # address -> device slot number in the inode space
        #: How many times the tree was (re)built; :meth:`wait_rebuilt` waits for the next.
        self.generation = 0
        self._rebuilt = trio.Event()
        root = _Node(_ROOT, b"", _ROOT, _DIR_MODE)
        self.nodes[_ROOT] = root
        for inode, name in ((_DEVICES, b"devices"), (_SLOTS, b"slots")):
            self.nodes[inode] = _Node(inode, name, _ROOT, _DIR_MODE)
            root.children[name] = inode
        self._build(bus.devices)

    # -- the tree -----------------------------------------------------------------------
    def _build(self, devices: list[Device]) -> None:
        directory = self.nodes[_DEVICES]
        for name in list(directory.children):
            base = directory.children.pop(name)
            for inode in range(base, base + _INODES_PER_DEVICE):
                self.nodes.pop(inode, None)
        for device in devices:
            number = self._slots.setdefault(device.address, len(self._slots))
            base = _FIRST_DEVICE_INODE + number * _INODES_PER_DEVICE
            node = _Node(base, device.address.encode(), _DEVICES, _DIR_MODE, device=device)
            self.nodes[base] = node
            directory.children[node.name] = base
            files = [("config", stat.S_IFREG | 0o644)]
            files += [(name, stat.S_IFREG | 0o444) for name in ATTRIBUTES]
            files.append(("driver", stat.S_IFLNK | 0o777))
            for n, (name, mode) in enumerate(files, start=1):
                child = _Node(base + n, name.encode(), base, mode, device=device, attribute=name)
                self.nodes[child.inode] = child
                node.children[child.name] = child.inode
        self.generation += 1
        self._rebuilt.set()
        self._rebuilt = trio.Event()

    async def wait_rebuilt(self, after: int) -> None:
        """Wait until the tree was rebuilt after generation ``after`` (see :attr:`generation`)."""
        while self.generation <= after:
            await self._rebuilt.wait()

    async def follow_changes(self) -> None:
        """Resync whenever the backend hot-plugs or unplugs a device, until the connection ends."""
        while True:
            try:
                async for change in self.bus.changes():
                    log.info("hot-plug: %s %s; resyncing the tree", change.kind.value,
                             change.device.address)
                    await self.resync()
            except ChangesOverflowError:
                await self.resync()  # fell behind: the snapshot says where things are
                continue
            except (ConnectionLostError, trio.ClosedResourceError):
                return
            return

    async def resync(self) -> None:
        """Take a new bus snapshot and add or remove device directories to match."""
        devices = await self.bus.refresh(include_config=True)
        self._build(devices)

    def device_of(self, node: _Node) -> Device:
        if node.device is None or node.device not in self.bus.devices:
            raise pyfuse3.FUSEError(errno.ENODEV)
        return node.device

    # -- reads and writes -----------------------------------------------------------------
    async def call(self, pending: Any, what: str, device: Device, offset: int,
                   value: int | None = None) -> Any:
        """Await one config access and map its failure to an errno for the caller."""
        try:
            return await pending
        except AccessDeniedError as exc:
            self.denied_writes += 1
            log.warning(
                "%s of %s config offset %#x%s denied by the backend's policy: %s",
                what, device.address, offset, "" if value is None else f" value {value:#x}",
                exc.remote_message,
            )
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except InvalidAccessError as exc:
            log.warning("%s of %s offset %#x refused: %s", what, device.address, offset, exc)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except PcisplitError as exc:
            log.error("%s of %s offset %#x failed: %s", what, device.address, offset, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def render(self, node: _Node) -> bytes:
        """The current text of a device attribute (from the live header)."""
        device = self.device_of(node)
        header = bytearray()
        for offset in range(0, _HEADER_BYTES, 4):
            value = await self.call(device.config_read(offset, 4), "read", device, offset)
            header += value.to_bytes(4, "little")
        # The header is read live (BARs, IRQ); read-only IDs beyond it come from the snapshot.
        image = bytes(header) + (device.config or b"")[_HEADER_BYTES:]
        files = device_files(DeviceView(device.pci_address, image, device.bar_sizes))
        assert node.attribute is not None
        return files[node.attribute]


def check_mountpoint(path: Path) -> None:
    """Refuse a mount point that is missing, not a directory, busy or not empty."""
    if pyfuse3 is None:
        raise MountError(
            "pcifront mount needs pyfuse3 (the 'mount' extra): pip install pyfuse3, or "
            "install pcisplit with it: pip install '/path/to/pcisplit[mount]' (a checkout)"
        )
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} is missing: load the fuse module (modprobe fuse) or run "
                         "where FUSE is available")
    if not path.exists():
        raise MountError(f"mount point {path} does not exist; create it with mkdir")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"mount point {path} is busy (something is mounted there already); "
                         f"unmount it (fusermount3 -u {path}) or pick another directory")
    if any(path.iterdir()):
        raise MountError(f"mount point {path} is not empty; its files would be hidden: use an "
                         "empty directory")


@asynccontextmanager
async def mounted(bus: Bus, mountpoint: str | os.PathLike[str]) -> AsyncIterator[GuestFs]:
    """Mount ``bus`` at ``mountpoint`` for the block; always unmounted on the way out.

    Only one mount per process at a time (pyfuse3 keeps one session).
    """
    path = Path(mountpoint)
    check_mountpoint(path)
    if not any(dev.config is not None for dev in bus.devices) and bus.devices:
        await bus.refresh(include_config=True)
    fs = GuestFs(bus)
    operations = _Operations(fs)
    options = {"fsname=pcifront", "subtype=pcifront", "default_permissions"}
    try:
        pyfuse3.init(operations, str(path), options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount at {path}: {exc}") from exc
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(fs.follow_changes)
            try:
                yield fs
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if not unmounted:
            pyfuse3.close(unmount=True)
