"""The host view (``pciback ctl list``): every device of the host and every device served.

The privileged side still sees every device and who owns it (the seed
thread's point, Rolf Neugebauer 2005: "it would also be nice if dom0 could
still see all devices in the system via things like lspci to make it easier
to do device assignment"). So the list has one row for

* every device the backend serves (``[[device]]`` tables: emulated models,
  snapshots, host devices), in config order, then
* every other PCI function of the host, enumerated **read-only** from the
  config's ``sysfs_root`` (``/sys/bus/pci/devices``), in address order. These
  are ``unconfigured``: the backend does not serve them, so they cannot be
  assigned until a ``[[device]]`` table names them.

:func:`scan_host` only lists directories and reads the ``vendor``,
``device`` and ``class`` attributes (the first bytes of ``config`` when a
tree has no such files, as copies of sysfs trees in tests do) and the
``driver`` link. It never opens anything for writing.

Each row is a dict with the keys of :data:`HOST_VIEW_KEYS` (``--json``
prints them; the set and the meaning of each key are stable):

``id``
    the ``[[device]]`` id, or None for an unconfigured host device;
``provider``
    ``host``, ``snapshot`` or ``emulated:<model>``;
``configured``
    whether the backend serves it;
``owner``
    the guest it is assigned to (or leaving), or None;
``hidden``
    offered to nobody (a ``hide`` pattern, or ``pciback ctl hide``);
``state``
    ``connected`` (assigned, and its guest is connected), ``assigned``,
    ``leaving`` (a removal waits for the guest's acknowledgement), ``hidden``,
    ``free`` (served, offered, unowned) or ``unconfigured``;
``virtual``
    its address on the owner's bus, or None;
``host``
    the host address (a snapshot's is the one in its dump), or None;
``vendor_device``, ``class``
    ``"8086:10c9"`` and ``"020000"`` (hex), None when unreadable;
``driver``
    the host kernel driver bound to a host device, or None.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.pci import PciAddress

if TYPE_CHECKING:
    from pciback.config import BackendConfig
    from pciback.plane.registry import ServedDevice

__all__ = [
    "HOST_VIEW_KEYS",
    "HostFunction",
    "HostScan",
    "DeviceIds",
    "scan_host",
    "served_row",
    "unconfigured_row",
    "host_view",
    "format_table",
]

log = logging.getLogger("pcisplit.backend")

HOST_VIEW_KEYS = (
    "id",
    "provider",
    "configured",
    "owner",
    "hidden",
    "state",
    "virtual",
    "host",
    "vendor_device",
    "class",
    "driver",
)

#: The text table's columns: (header, key).
_COLUMNS = (
    ("ID", "id"),
    ("PROVIDER", "provider"),
    ("OWNER", "owner"),
    ("HIDDEN", "hidden"),
    ("STATE", "state"),
    ("VIRTUAL", "virtual"),
    ("HOST", "host"),
    ("VENDOR:DEVICE", "vendor_device"),
    ("CLASS", "class"),
    ("DRIVER", "driver"),
)


@dataclass(frozen=True, slots=True)
class DeviceIds:
    """The identifying registers of a function: vendor, device and 24-bit class code."""

    vendor: int
    device: int
    class_code: int

    @classmethod
    def from_config(cls, header: bytes) -> DeviceIds:
        """From the first 12 bytes of a config space (little-endian, as on the bus)."""
        if len(header) < 12:
            raise ValueError(f"a config header has at least 12 bytes, got {len(header)}")
        return cls(
            vendor=int.from_bytes(header[0:2], "little"),
            device=int.from_bytes(header[2:4], "little"),
            class_code=int.from_bytes(header[9:12], "little"),
        )

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def class_text(self) -> str:
        return f"{self.class_code:06x}"


@dataclass(frozen=True, slots=True)
class HostFunction:
    """One PCI function found under ``sysfs_root``.

    ``ids`` is None when neither the sysfs attributes nor the config header
    could be read; ``problem`` then says why.
    """

    address: PciAddress
    ids: DeviceIds | None
    driver: str | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class HostScan:
    """What :func:`scan_host` found: the functions, and what it could not read.

    ``problem`` is set when the directory itself could not be listed (no
    ``/sys/bus/pci`` in a container, say); ``skipped`` names entries that are
    not PCI addresses.
    """

    root: Path
    functions: tuple[HostFunction, ...]
    problem: str | None = None
    skipped: tuple[str, ...] = ()

    def get(self, address: PciAddress | None) -> HostFunction | None:
        """The function at ``address``, or None."""
        return next((f for f in self.functions if f.address == address), None)


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def _read_ids(path: Path) -> tuple[DeviceIds | None, str | None]:
    try:
        return DeviceIds(
            _read_hex(path / "vendor"), _read_hex(path / "device"), _read_hex(path / "class")
        ), None
    except (OSError, ValueError) as exc:
        attribute_problem = str(exc)
    # A copy of a sysfs tree may hold only ``config``: its header has the same ids.
    try:
        with open(path / "config", "rb") as f:
            return DeviceIds.from_config(f.read(12)), None
    except (OSError, ValueError) as exc:
        return None, f"cannot read its ids ({attribute_problem}; config: {exc})"


def _driver(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path / "driver"))
    except OSError:
        return None  # no driver bound (or a tree without the link)


def scan_host(root: Path) -> HostScan:
    """Every PCI function under ``root`` (``/sys/bus/pci/devices``), read-only, by address.

    Never raises for what it cannot read: an unreadable directory is
    ``HostScan.problem``, an entry that is not a PCI address is in
    ``skipped``, a function whose ids cannot be read has ``ids = None``.
    Each of these is logged too.
    """
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        unreadable = f"cannot list the host's PCI devices in {root}: {exc.strerror or exc}"
        log.warning("host view: %s", unreadable)
        return HostScan(root, (), problem=unreadable)
    functions: list[HostFunction] = []
    skipped: list[str] = []
    for name in names:
        try:
            address = PciAddress.parse(name)
        except ValueError:
            skipped.append(name)
            continue
        path = root / name
        ids, problem = _read_ids(path)
        if problem is not None:
            log.warning("host view: %s: %s", path, problem)
        functions.append(HostFunction(address, ids, _driver(path), problem))
    if skipped:
        log.warning(
            "host view: %d entr%s in %s %s not a PCI address: %s",
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            root,
            "is" if len(skipped) == 1 else "are",
            ", ".join(skipped[:5]),
        )
    functions.sort(key=lambda f: f.address)
    return HostScan(root, tuple(functions), skipped=tuple(skipped))


def _ids_fields(ids: DeviceIds | None) -> dict[str, Any]:
    return {
        "vendor_device": ids.vendor_device if ids is not None else None,
        "class": ids.class_text if ids is not None else None,
    }


def served_row(
    dev: ServedDevice, *, connected: bool, ids: DeviceIds | None, driver: str | None = None
) -> dict[str, Any]:
    """The row of a served device; ``connected``: its owner has a connection now."""
    cfg = dev.config
    virtual = dev.address or dev.leaving_address
    state = dev.state
    if state == "assigned" and connected:
        state = "connected"
    return {
        "id": dev.id,
        "provider": cfg.kind + (f":{cfg.model}" if cfg.model else ""),
        "configured": True,
        "owner": dev.guest or dev.leaving,
        "hidden": dev.hidden,
        "state": state,
        "virtual": str(virtual) if virtual is not None else None,
        "host": str(dev.physical) if dev.physical is not None else None,
        **_ids_fields(ids),
        "driver": driver,
    }


def unconfigured_row(function: HostFunction, *, hidden: bool) -> dict[str, Any]:
    """The row of a host function the backend does not serve."""
    return {
        "id": None,
        "provider": "host",
        "configured": False,
        "owner": None,
        "hidden": hidden,
        "state": "hidden" if hidden else "unconfigured",
        "virtual": None,
        "host": str(function.address),
        **_ids_fields(function.ids),
        "driver": function.driver,
    }


def host_view(
    devices: Iterable[ServedDevice],
    scan: HostScan,
    config: BackendConfig,
    *,
    connected: Callable[[str], bool],
    ids: Callable[[ServedDevice], DeviceIds | None],
) -> list[dict[str, Any]]:
    """Every served device (config order), then every other host function (address order).

    ``connected(guest)`` says whether a guest has a connection; ``ids(dev)``
    reads a served device's ids (the caller holds what it needs to read them).
    A configured ``kind = "host"`` device and the host function at its
    address are one row.
    """
    rows: list[dict[str, Any]] = []
    served_hosts: set[PciAddress] = set()
    for dev in devices:
        driver = None
        if dev.config.kind == "host" and dev.physical is not None:
            served_hosts.add(dev.physical)
            found = scan.get(dev.physical)
            driver = found.driver if found is not None else None
        rows.append(
            served_row(
                dev,
                connected=dev.guest is not None and connected(dev.guest),
                ids=ids(dev),
                driver=driver,
            )
        )
    for function in scan.functions:
        if function.address not in served_hosts:
            hidden = config.is_hidden(function.address) is not None
            rows.append(unconfigured_row(function, hidden=hidden))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as an aligned text table with a header line (``-`` for none)."""
    table = [tuple(header for header, _ in _COLUMNS)]
    table += [tuple(_cell(row[key]) for _, key in _COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
