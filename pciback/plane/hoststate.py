"""The saved config of writable host devices, on disk, for the backend that comes after a kill.

A host device with ``writable = true`` gets the config space it had when the
backend opened it written back whenever it leaves a guest, and when the
backend stops (``SIGTERM``). A backend killed with ``SIGKILL`` (or that
crashed, or whose machine lost power mid-run) restores nothing: the device
keeps what its last guest wrote. Worse, the next backend would read that
dirty config at start and take it for the clean one.

So the backend records each writable host device's saved config in a state
file beside its control socket (``<control>.state``, e.g.
``/run/pcisplit/pciback.ctl.state``) before any guest can reach the device,
and removes the file when it stops cleanly with every such device back at its
saved config. At the next start, a state file that is still there means the
last backend did not stop cleanly: each device it names is restored to the
recorded config (:meth:`~pciback.devices.HostDevice.adopt_saved_config`)
before any guest connects, and that recorded config stays the one every
later reset puts back.

Keep the control socket (and so this file) on a tmpfs such as ``/run``: a
reboot resets the hardware and must forget the file too. A file whose
devices no longer match (other IDs at that address) stops the start with an
error naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from pciback.devices import DeviceSetupError, HostDevice
from shared.errors import ConfigFileError, PcisplitError, reason

__all__ = ["HostStateFile", "state_path_for", "STATE_VERSION"]

log = logging.getLogger("pcisplit.backend")

STATE_VERSION = 1


def state_path_for(control: Path) -> Path:
    """Where the state file of the backend with control socket ``control`` lives."""
    return control.with_name(control.name + ".state")


class HostStateFile:
    """One backend's state file (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Whether this backend wrote the file (so it may remove it at a clean stop).
        self.owned = False

    def load(self) -> dict[str, bytes]:
        """The saved configs a previous backend left, by host address ({} without a file)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigFileError(
                f"{self.path}: cannot read the saved host device state ({reason(exc)}); fix its "
                "permissions, or delete it if the host was rebooted since it was written"
            ) from exc
        try:
            data = json.loads(text)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, not {STATE_VERSION}")
            return {
                str(address): bytes.fromhex(entry["config"])
                for address, entry in data["devices"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigFileError(
                f"{self.path}: not a pciback host device state file ({exc}); delete it if the "
                "host was rebooted since it was written, otherwise restore the devices by hand"
            ) from exc

    def adopt(self, devices: Iterable[HostDevice]) -> list[str]:
        """Restore what a killed backend left, then record ``devices``' saved configs.

        Returns the addresses that were restored. Raises
        :class:`ConfigFileError` (naming the file) when a recorded config does
        not fit the device now at that address; nothing is written then.
        """
        writable = [dev for dev in devices if dev.writable]
        previous = self.load()
        by_address = {str(dev.address): dev for dev in writable}
        # Check every entry before writing to any device.
        for address, saved in previous.items():
            dev = by_address.get(address)
            if dev is None:
                log.warning(
                    "%s: the backend before this one did not stop cleanly and recorded the "
                    "config of host device %s, which this config no longer serves writable; "
                    "it is NOT restored, and may still hold what its last guest wrote",
                    self.path, address,
                )
                continue
            if len(saved) != len(dev.saved_config) or saved[:4] != dev.saved_config[:4]:
                raise ConfigFileError(
                    f"{self.path}: the saved config of {address} does not fit the device now "
                    f"at that address ({len(saved)} bytes, IDs {saved[:4].hex()}; now "
                    f"{len(dev.saved_config)} bytes, IDs {dev.saved_config[:4].hex()}); the host "
                    "changed since the last backend was killed: check the device, then delete "
                    "the file and start again"
                )
        restored = []
        for address, saved in previous.items():
            dev = by_address.get(address)
            if dev is None:
                continue
            try:
                dev.adopt_saved_config(saved)
            except DeviceSetupError as exc:  # checked above; a race with the hardware
                raise ConfigFileError(f"{self.path}: {exc}") from exc
            restored.append(address)
            log.warning(
                "host device %s: the last backend did not stop cleanly; restored the config it "
                "saved (%s) before serving any guest",
                address, self.path,
            )
        if writable:
            self._write({str(dev.address): dev.saved_config for dev in writable})
            self.owned = True
        elif previous:
            self.remove()
        return restored

    def record(self, devices: Iterable[HostDevice]) -> None:
        """Record the writable host devices served now (after a reload changed them)."""
        writable = [dev for dev in devices if dev.writable]
        if writable:
            self._write({str(dev.address): dev.saved_config for dev in writable})
            self.owned = True
        elif self.owned:
            self.remove()

    def _write(self, configs: dict[str, bytes]) -> None:
        data = {
            "version": STATE_VERSION,
            "devices": {address: {"config": saved.hex()} for address, saved in configs.items()},
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ConfigFileError(
                f"{self.path}: cannot record the saved config of the writable host devices "
                f"({reason(exc)}); the directory of the control socket must be writable"
            ) from exc

    def release(self, devices: Iterable[HostDevice]) -> bool:
        """A clean stop: remove the file if every device holds its saved config again.

        Returns True when the file was removed. Otherwise it stays (and the
        next start restores from it), and a warning names the devices.
        """
        if not self.owned:
            return False
        dirty = []
        for dev in devices:
            try:
                if not dev.holds_saved_config():
                    dirty.append(str(dev.address))
            except PcisplitError as exc:
                dirty.append(f"{dev.address} ({reason(exc)})")
        if dirty:
            log.warning(
                "host device(s) %s do not hold their saved config after the shutdown reset; "
                "%s stays, and the next start restores from it",
                ", ".join(dirty), self.path,
            )
            return False
        self.remove()
        return True

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, reason(exc))
        self.owned = False
