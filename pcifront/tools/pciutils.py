"""Decoding through the system's own pciutils, fed the guest's view as a sysfs-shaped tree.

``pcifront lspci`` does not re-implement pciutils' decoders: it writes the
guest's bus to a temporary directory shaped like ``/sys/bus/pci``
(:func:`pcifront.tools.sysfs.write_tree`) and runs the system's ``lspci -A
linux-sysfs -O sysfs.path=DIR`` on it, so every decoder pciutils has comes for
free and stays current, and the output is what the real lspci prints for the
same device through the FUSE mirror (apart from the "Kernel driver in use"
line: the temporary tree has no driver link).

Also here: the JSON view (``--json``), built from the same device views.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pcifront.client.resources import ROM_INDEX, resources_from_image
from pcifront.tools.lspci import DeviceFilter, needs_domains
from pcifront.tools.pciids import PciIds
from pcifront.tools.sysfs import DeviceView, irq_of, write_tree
from shared.errors import PcisplitError

__all__ = [
    "PciutilsMissingError",
    "PciutilsError",
    "find_tool",
    "run_lspci",
    "json_listing",
    "KMOD_NOISE",
]

#: lspci's harmless complaint on machines without /lib/modules (dropped from stderr).
KMOD_NOISE: Final = "lspci: Unable to load libkmod resources: error -2"
_SEARCH_PATH: Final = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")


class PciutilsMissingError(PcisplitError):
    """The system's pciutils (lspci or setpci) is not installed."""


class PciutilsError(PcisplitError):
    """The system's lspci refused the arguments or failed; the message is its own."""


def find_tool(name: str) -> str | None:
    """The path of pciutils' ``lspci`` or ``setpci``, or None when not installed."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _SEARCH_PATH:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_tool(name: str, what: str) -> str:
    path = find_tool(name)
    if path is None:
        raise PciutilsMissingError(
            f"{what} needs the system's {name} from pciutils, which is not installed; "
            "install it (apt-get install pciutils)"
        )
    return path


def run_lspci(views: Sequence[DeviceView], arguments: Sequence[str]) -> tuple[str, str]:
    """Run the system's lspci with ``arguments`` on a sysfs-shaped tree of ``views``.

    Returns ``(stdout, stderr)`` with the libkmod noise removed from stderr.
    Raises :class:`PciutilsMissingError` without pciutils and
    :class:`PciutilsError` when lspci exits non-zero.
    """
    lspci = require_tool("lspci", "this lspci option")
    with tempfile.TemporaryDirectory(prefix="pcifront-sysfs-") as tmp:
        root = write_tree(Path(tmp), list(views))
        result = subprocess.run(
            [lspci, "-A", "linux-sysfs", "-O", f"sysfs.path={root}", *arguments],
            capture_output=True,
            text=True,
            check=False,
        )
    stderr = "".join(
        line for line in result.stderr.splitlines(keepends=True) if line.rstrip() != KMOD_NOISE
    )
    if result.returncode != 0:
        message = stderr.strip().removeprefix("lspci: ") or f"exit status {result.returncode}"
        raise PciutilsError(f"lspci: {message}")
    return result.stdout, stderr


def json_listing(
    views: Sequence[DeviceView],
    *,
    slot: str | None,
    vendor_device: str | None,
    ids: PciIds | None,
) -> str:
    """The selected devices as a JSON array (for scripts): IDs, names, IRQ and resources."""
    selection = DeviceFilter.parse(slot, vendor_device)
    chosen = [view for view in views if selection.matches(view)]
    domains = needs_domains(views)
    out = []
    for view in sorted(chosen, key=lambda v: v.address):
        config = view.config
        vendor = int.from_bytes(config[0:2], "little")
        device = int.from_bytes(config[2:4], "little")
        klass = int.from_bytes(config[0x0A:0x0C], "little")
        address = view.address
        slot_text = f"{address.bus:02x}:{address.device:02x}.{address.function}"
        entry: dict[str, object] = {
            "slot": f"{address.domain:04x}:{slot_text}" if domains else slot_text,
            "address": str(address),
            "vendor_id": f"{vendor:04x}",
            "device_id": f"{device:04x}",
            "class": f"{klass:04x}",
            "prog_if": f"{config[0x09]:02x}",
            "revision": f"{config[0x08]:02x}",
            "header_type": f"{config[0x0E]:02x}",
            "irq": irq_of(config),
            "resources": [
                {
                    "index": r.index,
                    "kind": "rom" if r.index == ROM_INDEX else "io" if r.io else "memory",
                    "start": f"{r.start:#x}",
                    "size": r.size,
                    "prefetchable": r.prefetchable,
                    "64bit": r.is_64bit,
                }
                for r in resources_from_image(config, view.bar_sizes)
            ],
        }
        if ids is not None:
            entry["vendor"] = ids.vendor_name(vendor)
            entry["device"] = ids.device_name(vendor, device)
            entry["class_name"] = ids.subclass_name(klass >> 8, klass & 0xFF) or ids.class_name(
                klass >> 8
            )
        out.append(entry)
    return json.dumps(out, indent=2) + "\n"
