"""Shared helpers for the FUSE mirror tests: skip only without /dev/fuse, always unmount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import pcifront
from pciback.testing import running_backend
from pcifront.tools.mount import GuestFs, mounted

DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"
DUMPS = sorted(p for p in DATA.glob("*.txt") if not p.name.endswith("vvv.txt"))
LSPCI = shutil.which("lspci")
SETPCI = shutil.which("setpci")

#: The FUSE tests may skip only where /dev/fuse is absent (the reason is printed by -ra).
needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent on this machine: no FUSE mounts"
)
EDU = "[[device]]\nid = 'edu'\nkind = 'emulated'\nmodel = 'edu'\nguest = 'guest0'\n"


def config(*devices: str) -> str:
    return "[[guest]]\nname = 'guest0'\n" + "".join(devices)


def force_unmount(path: Path) -> None:
    """Unmount ``path`` if it is still mounted (a failed test must not leave a mount)."""
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@asynccontextmanager
async def mounted_guest(
    backend_config: str, tmp: Path
) -> AsyncIterator[tuple[pcifront.Bus, GuestFs, Path]]:
    """A backend, a guest connection, and its bus mounted at ``tmp/mnt``; always unmounted."""
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        async with (
            running_backend(backend_config, tmp=tmp) as rb,
            pcifront.connect(rb.address("memory"), include_config=True) as bus,
            mounted(bus, mnt) as fs,
        ):
            yield bus, fs, mnt
    finally:
        force_unmount(mnt)


def sysfs_args(mnt: Path) -> list[str]:
    return ["-A", "linux-sysfs", "-O", f"sysfs.path={mnt}"]


def lspci_size(size: int) -> str:
    """How lspci prints a size (``show_size``): the largest unit that divides it."""
    for suffix in ("", "K", "M", "G"):
        if size % 1024:
            return f"{size}{suffix}"
        size //= 1024
    return f"{size}T"


_REGION = re.compile(r"^(\tRegion (\d): (Memory|I/O ports) at )([0-9a-f]+|<unassigned>)(.*)$")
_ROM = re.compile(r"^(\tExpansion ROM at )([0-9a-f]+|<unassigned>)(.*)$")
_IRQ = re.compile(r"^(\tInterrupt: pin [A-D?] routed to IRQ )(\d+)$")
