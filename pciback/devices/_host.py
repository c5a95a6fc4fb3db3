"""Host devices: a real PCI function read through sysfs.

Config space is ``/sys/bus/pci/devices/<address>/config``, read with
``os.pread``. The file is opened read-only unless the device was created with
``writable=True``; only then is it opened ``O_RDWR`` and do writes reach the
hardware. The backend's policy sits in front of this provider either way.

Linux lets only privileged (CAP_SYS_ADMIN) readers see past the first 64
bytes of config space (128 for CardBus bridges); others get a short read. The
provider detects this when it opens the file and then serves the 64-byte
header only (``config_size == 64``, :attr:`HostDevice.restricted` true).

BAR sizes come from the sysfs ``resource`` file. BAR *access* (mapping
``resourceN``) is not implemented: it answers ``NOT_IMPLEMENTED``. Mapping a
real device's registers needs ``writable=True`` and a later issue's work; the
machines this is developed on must never have their devices' BARs touched.
Reset never writes sysfs ``reset``: a writable device gets the config space
it had when it was opened written back (:meth:`HostDevice.reset`).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from shared.errors import ConfigAccessError, ErrorCode, PcisplitError
from shared.pci import PciAddress, check_access

from ._base import BarKind, BarSpec, DeviceProvider, DeviceSetupError

__all__ = ["HostDevice", "SYSFS_PCI_DEVICES", "parse_resource_file"]

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")

#: The dword holding the command and status registers (restored last, command only).
_COMMAND_DWORD = 0x04

# Linux's IORESOURCE_* flags as sysfs prints them in ``resource``.
_IORESOURCE_IO = 0x0000_0100
_IORESOURCE_MEM = 0x0000_0200
_IORESOURCE_PREFETCH = 0x0000_2000
_IORESOURCE_MEM_64 = 0x0010_0000
_BAR_LINES = 6
_ROM_LINE = 6


def parse_resource_file(text: str) -> tuple[list[BarSpec], int]:
    """Decode a sysfs ``resource`` file into ``(BARs, ROM size)``.

    Each line is ``start end flags`` in hex; lines 0-5 are the BARs and line 6
    the expansion ROM (bridges list their windows after that; they are not
    BARs and are ignored). A line of zeros is an unimplemented BAR.
    """
    rows: list[tuple[int, int, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) != 3:
            raise DeviceSetupError(
                f"sysfs resource line {number} {line!r} is not 'start end flags' in hex"
            )
        try:
            start, end, flags = (int(f, 16) for f in fields)
        except ValueError as exc:
            raise DeviceSetupError(f"sysfs resource line {number} {line!r}: {exc}") from exc
        rows.append((start, end, flags))
    bars: list[BarSpec] = []
    for index, (start, end, flags) in enumerate(rows[:_BAR_LINES]):
        if end == 0 or not flags & (_IORESOURCE_IO | _IORESOURCE_MEM):
            continue
        if flags & _IORESOURCE_IO:
            kind = BarKind.IO
        elif flags & _IORESOURCE_MEM_64:
            kind = BarKind.MEM64
        else:
            kind = BarKind.MEM32
        prefetchable = kind is not BarKind.IO and bool(flags & _IORESOURCE_PREFETCH)
        try:
            bars.append(BarSpec(index, end - start + 1, kind, prefetchable))
        except ValueError as exc:
            raise DeviceSetupError(f"sysfs resource line {index + 1}: {exc}") from exc
    rom_size = 0
    if len(rows) > _ROM_LINE:
        start, end, flags = rows[_ROM_LINE]
        if end and flags & _IORESOURCE_MEM:
            rom_size = end - start + 1
    return bars, rom_size


class HostDevice(DeviceProvider):
    """A real PCI function, config space through sysfs (read-only by default).

    Use it as a context manager, or call :meth:`close`, to release the file.
    """

    kind = "host"

    def __init__(
        self,
        address: PciAddress | str,
        *,
        writable: bool = False,
        sysfs_root: Path = SYSFS_PCI_DEVICES,
        dry_run: bool = False,
    ) -> None:
        self.address = address if isinstance(address, PciAddress) else PciAddress.parse(address)
        self.writable = writable
        #: ``pciback check``: the device is opened read-only whatever ``writable`` says,
        #: and config writes are checked and recorded in :attr:`dry_run_writes`, never made.
        self.dry_run = dry_run
        self.dry_run_writes: list[tuple[int, int, int]] = []
        self.path = Path(sysfs_root) / str(self.address)
        config = self.path / "config"
        flags = (os.O_RDWR if writable and not dry_run else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self._fd = os.open(config, flags)
        except OSError as exc:
            raise PcisplitError(
                f"cannot open {config} ({'read/write' if writable else 'read-only'}): "
                f"{exc.strerror}; check that the device exists and that you may read it",
                code=ErrorCode.NOT_FOUND,
            ) from exc
        try:
            self._config_size, self.restricted = self._probe_size()
            self._bars, self._rom_size = self._read_resources()
            #: The config space as it was when we opened the device: what
            #: :meth:`reset` puts back before anyone else gets it (XSA-306).
            self.saved_config = self.config_image() if writable else b""
        except BaseException:
            os.close(self._fd)
            raise

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sysfs file. Further accesses raise."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> HostDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"<HostDevice {self.address} {mode} config={self._config_size}>"

    # -- DeviceProvider --------------------------------------------------------------------

    @property
    def config_size(self) -> int:
        return self._config_size

    def config_read(self, offset: int, size: int) -> int:
        check_access(offset, size, self._config_size)
        data = self._pread(size, offset)
        if len(data) != size:
            raise PcisplitError(
                f"short read of {self.path / 'config'} at {offset:#x}: got {len(data)} of "
                f"{size} bytes",
                code=ErrorCode.OPERATION_FAILED,
            )
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        check_access(offset, size, self._config_size)
        if not self.writable:
            raise ConfigAccessError(
                f"host device {self.address} is read-only; set writable = true for it in the "
                "backend config to allow config writes",
                code=ErrorCode.ACCESS_DENIED,
            )
        if not 0 <= value < (1 << (8 * size)):
            raise ConfigAccessError(
                f"value {value:#x} does not fit in a {size}-byte config write",
                code=ErrorCode.INVALID_SIZE,
            )
        if self.dry_run:
            self.dry_run_writes.append((offset, size, value))
            return
        try:
            written = os.pwrite(self._checked_fd(), value.to_bytes(size, "little"), offset)
        except OSError as exc:
            raise PcisplitError(
                f"config write to {self.path / 'config'} at {offset:#x} failed: {exc.strerror}",
                code=ErrorCode.OPERATION_FAILED,
            ) from exc
        if written != size:
            raise PcisplitError(
                f"short write to {self.path / 'config'} at {offset:#x}: {written} of {size} bytes",
                code=ErrorCode.OPERATION_FAILED,
            )

    def config_image(self) -> bytes:
        data = self._pread(self._config_size, 0)
        if len(data) != self._config_size:
            raise PcisplitError(
                f"short read of {self.path / 'config'}: {len(data)} of {self._config_size} bytes",
                code=ErrorCode.OPERATION_FAILED,
            )
        return data

    def bars(self) -> list[BarSpec]:
        return list(self._bars)

    def rom_size(self) -> int:
        return self._rom_size

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self._bar_not_implemented(bar)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self._bar_not_implemented(bar)

    def reset(self) -> None:
        """Put back the config space saved when the device was opened.

        The interrupt state returns to power-on. A read-only device needs
        nothing more: no guest write ever reached it (the policy's virtual
        registers are reset by the policy). A writable one
        gets every dword that differs from the saved image written back, the
        command register last so decoding is re-enabled only once the BARs
        and capabilities hold their saved values. This never uses the sysfs
        ``reset`` file (a function-level reset is the kernel's business).
        """
        self.interrupt_state.reset()
        if not self.writable:
            return
        current = self.config_image()
        dwords = [
            off
            for off in range(0, len(self.saved_config), 4)
            if current[off : off + 4] != self.saved_config[off : off + 4] and off != _COMMAND_DWORD
        ]
        if current[4:6] != self.saved_config[4:6]:
            dwords.append(_COMMAND_DWORD)
        saved = self.saved_config
        for off in dwords:
            # Status (the command dword's upper half) is RW1C: writing its saved bits
            # back would clear them, so only the command half is restored.
            size = 2 if off == _COMMAND_DWORD else 4
            self.config_write(off, size, int.from_bytes(saved[off : off + size], "little"))

    def adopt_saved_config(self, saved: bytes) -> None:
        """Restore ``saved`` now and keep it as the config every later reset puts back.

        ``saved`` is what an earlier backend recorded when it opened this
        device (``pciback.plane.hoststate``): that backend was killed before it
        could restore it, so the config space may still hold what its guest
        wrote, and the image read at open time is not the one to trust.
        Refused (:class:`DeviceSetupError`, nothing written) when ``saved``
        does not fit this device: another size, or other vendor/device IDs.
        """
        if not self.writable:
            raise DeviceSetupError(
                f"host device {self.address} is read-only: no guest write ever reached it, "
                "so there is no saved config to restore"
            )
        if len(saved) != len(self.saved_config):
            raise DeviceSetupError(
                f"the saved config of {self.address} has {len(saved)} bytes, but the device "
                f"serves {len(self.saved_config)} now"
            )
        if saved[:4] != self.saved_config[:4]:
            raise DeviceSetupError(
                f"the saved config of {self.address} is of device "
                f"{saved[0:2][::-1].hex()}:{saved[2:4][::-1].hex()}, but that address now holds "
                f"{self.saved_config[0:2][::-1].hex()}:{self.saved_config[2:4][::-1].hex()}"
            )
        self.saved_config = bytes(saved)
        self.reset()

    def holds_saved_config(self) -> bool:
        """Whether the config space equals the saved one (Status aside); True if read-only."""
        if not self.writable:
            return True
        current, saved = self.config_image(), self.saved_config
        return current[:6] + current[8:] == saved[:6] + saved[8:]

    # -- internals -------------------------------------------------------------------------

    def _checked_fd(self) -> int:
        if self._fd < 0:
            raise PcisplitError(
                f"host device {self.address} was closed", code=ErrorCode.INVALID_STATE
            )
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            return os.pread(self._checked_fd(), size, offset)
        except OSError as exc:
            raise PcisplitError(
                f"config read of {self.path / 'config'} at {offset:#x} failed: {exc.strerror}",
                code=ErrorCode.OPERATION_FAILED,
            ) from exc

    def _probe_size(self) -> tuple[int, bool]:
        """The config size we can serve, and whether the kernel restricts our reads."""
        file_size = os.fstat(self._fd).st_size
        readable = len(self._pread(max(file_size, 4096), 0))
        for size in (4096, 256, 64):
            if readable >= size:
                return size, size < file_size
        raise PcisplitError(
            f"{self.path / 'config'} yields only {readable} bytes; a PCI function has at least "
            "the 64-byte header",
            code=ErrorCode.OPERATION_FAILED,
        )

    def _read_resources(self) -> tuple[list[BarSpec], int]:
        resource = self.path / "resource"
        try:
            text = resource.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], 0
        except (OSError, UnicodeDecodeError) as exc:
            raise PcisplitError(
                f"cannot read {resource}: {exc}", code=ErrorCode.OPERATION_FAILED
            ) from exc
        return parse_resource_file(text)

    def _bar_not_implemented(self, bar: int) -> NoReturn:
        if not any(spec.index == bar for spec in self._bars):
            raise ConfigAccessError(
                f"BAR{bar} is not implemented by host device {self.address}",
                code=ErrorCode.NOT_FOUND,
            )
        raise PcisplitError(
            f"BAR access to host device {self.address} is not implemented: mapping its "
            "resource files is future work (it will need writable = true)",
            code=ErrorCode.NOT_IMPLEMENTED,
        )
