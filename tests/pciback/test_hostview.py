"""The host view (`pciback ctl list`): every host PCI function, every served device.

The host's devices come from a fake sysfs tree in tmp_path here; one test reads
this machine's real /sys, read-only (an audit hook proves nothing was opened
for writing), and compares it with pciutils' lspci.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pcifront
from pciback.cli import check_config
from pciback.config import parse_config
from pciback.devices import SYSFS_PCI_DEVICES
from pciback.ops.control_server import _not_served
from pciback.ops.hostview import HOST_VIEW_KEYS, DeviceIds, scan_host
from pciback.plane.registry import DeviceRegistry
from pciback.testing import FakeHost
from shared.pci import PciAddress
from tests.support.configs import writable_host_config
from tests.support.inprocess import ctl, ctl_json, serving

REPO = Path(__file__).resolve().parents[2]
DUMP = REPO / "tests/data/pcidata/eth_intel_82576_sriov.txt"


def _fake_host(host: FakeHost) -> None:
    host.add("0000:00:1f.2", 0x8086, 0x2922, 0x010601, attributes=True, driver="ahci")
    host.add("0000:05:00.0", 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    host.add("0000:07:00.0", 0x10DE, 0x1DB6, 0x030200, attributes=True, driver="nouveau")


# --------------------------------------------------------------------------- the scan


def test_scan_reads_ids_drivers_and_says_what_it_skipped(fake_host: FakeHost) -> None:
    _fake_host(fake_host)
    (fake_host.root / "not-an-address").mkdir()
    fake_host.add("0000:09:00.0", 0x1234, 0x5678, 0x0)
    fake_host.config("0000:09:00.0").write_bytes(b"\x34\x12")  # a truncated header
    scan = scan_host(fake_host.root)
    assert [str(f.address) for f in scan.functions] == [
        "0000:00:1f.2", "0000:05:00.0", "0000:07:00.0", "0000:09:00.0"
    ]
    sata, nic, gpu, broken = scan.functions
    assert (sata.ids, sata.driver) == (DeviceIds(0x8086, 0x2922, 0x010601), "ahci")
    # No attribute files (a copied tree): the ids come from the config header.
    assert (nic.ids, nic.driver) == (DeviceIds(0x8086, 0x10C9, 0x020000), None)
    assert gpu.ids is not None and gpu.ids.vendor_device == "10de:1db6"
    assert gpu.ids.class_text == "030200"
    assert broken.ids is None and broken.problem is not None and "config" in broken.problem
    assert scan.skipped == ("not-an-address",) and scan.problem is None


def test_scan_of_a_missing_tree_reports_it(tmp_path: Path) -> None:
    scan = scan_host(tmp_path / "nothing")
    assert scan.functions == ()
    assert scan.problem is not None and "cannot list the host's PCI devices" in scan.problem


# --------------------------------------------------------------------------- ctl list




HOST_CONFIG = f"""
sysfs_root = "sysfs"
hide = ["0000:07:*.*"]
[[guest]]
name = "alpha"
[[guest]]
name = "beta"
[[device]]
id = "edu-a"
model = "edu"
guest = "alpha"
[[device]]
id = "nic"
kind = "snapshot"
dump = "{DUMP}"
guest = "beta"
[[device]]
id = "hostnic"
kind = "host"
address = "0000:05:00.0"
"""


async def test_list_shows_every_host_device_and_every_served_one(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    _fake_host(fake_host)
    async with serving(HOST_CONFIG, tmp_path) as (_backend, address):
        async with pcifront.connect(address, guest="alpha"):
            listing = await ctl_json(tmp_path, "list")
            code, text, _ = await ctl(tmp_path, "list")
    rows = listing["result"]
    assert all(sorted(row) == sorted(HOST_VIEW_KEYS) for row in rows)
    assert rows == [
        {
            "id": "edu-a", "provider": "emulated:edu", "configured": True, "owner": "alpha",
            "hidden": False, "state": "connected", "virtual": "0000:00:00.0", "host": None,
            "vendor_device": "1234:11e8", "class": "00ff00", "driver": None,
        },
        {
            "id": "nic", "provider": "snapshot", "configured": True, "owner": "beta",
            "hidden": False, "state": "assigned", "virtual": "0000:00:00.0",
            "host": "0000:01:00.0", "vendor_device": "8086:10c9", "class": "020000",
            "driver": None,
        },
        {
            "id": "hostnic", "provider": "host", "configured": True, "owner": None,
            "hidden": False, "state": "free", "virtual": None, "host": "0000:05:00.0",
            "vendor_device": "8086:10c9", "class": "020000", "driver": None,
        },
        {
            "id": None, "provider": "host", "configured": False, "owner": None,
            "hidden": False, "state": "unconfigured", "virtual": None, "host": "0000:00:1f.2",
            "vendor_device": "8086:2922", "class": "010601", "driver": "ahci",
        },
        {
            "id": None, "provider": "host", "configured": False, "owner": None,
            "hidden": True, "state": "hidden", "virtual": None, "host": "0000:07:00.0",
            "vendor_device": "10de:1db6", "class": "030200", "driver": "nouveau",
        },
    ]
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID", "PROVIDER", "OWNER", "HIDDEN", "STATE", "VIRTUAL", "HOST", "VENDOR:DEVICE",
        "CLASS", "DRIVER",
    ]
    assert lines[4].split() == [
        "-", "host", "-", "no", "unconfigured", "-", "0000:00:1f.2", "8086:2922", "010601", "ahci"
    ]
    # A table: every column starts at the same offset on every line.
    starts = [lines[0].index(header) for header in lines[0].split()]
    for line in lines[1:]:
        assert all(line[s - 2 : s] == "  " and line[s] != " " for s in starts[1:]), line


async def test_host_device_that_is_not_configured_cannot_be_assigned(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    _fake_host(fake_host)
    async with serving(HOST_CONFIG, tmp_path) as (backend, _address):
        refused = await ctl_json(tmp_path, "assign", "0000:00:1f.2", "alpha")
        assert refused["code"] == "NOT_FOUND"
        assert "host device 0000:00:1f.2 is not served by this backend" in refused["error"]
        assert 'kind = "host" and address = "0000:00:1f.2"' in refused["error"]
        code, _, err = await ctl(tmp_path, "assign", "00:1f.2", "alpha")
        assert code == 1 and "assign refused (NOT_FOUND): host device 0000:00:1f.2" in err
        hide = await ctl_json(tmp_path, "hide", "0000:00:1f.2")
        assert "cannot be hidden (it is offered to no guest already)" in hide["error"]
        assert refused["error"].endswith(f"to {tmp_path / 'backend.toml'} and restart the backend")
        # Nothing changed: the guest's bus is as configured.
        assert [d.id for d in backend.registry.devices_of("alpha")] == ["edu-a"]
        # An address that is no device at all is the ordinary "no such device".
        missing = await ctl_json(tmp_path, "assign", "0000:0a:00.0", "alpha")
        assert missing["code"] == "NOT_FOUND"
        assert "no device with id or host address" in missing["error"]
        # The configured host device is found by its host address and can be assigned.
        moved = await ctl_json(tmp_path, "assign", "0000:05:00.0", "alpha")
        assert moved["result"]["device"] == "hostnic"
        rows = {r["host"]: r for r in (await ctl_json(tmp_path, "list"))["result"]}
        assert rows["0000:05:00.0"]["owner"] == "alpha"
        assert rows["0000:05:00.0"]["state"] == "assigned"


def test_the_refusal_says_where_to_configure_a_backend_without_a_file() -> None:
    message = _not_served(PciAddress.parse("0000:00:1f.2"), "assign", "<embedded default>")
    assert message.endswith("to a config file and start the backend with --config FILE "
                            "(it runs without one now)")


async def test_list_without_a_host_tree_still_lists_the_served_devices(tmp_path: Path) -> None:
    text = 'sysfs_root = "nowhere"\n[[guest]]\nname="g"\n[[device]]\nid="e"\nmodel="edu"\n'
    async with serving(text, tmp_path):
        listing = await ctl_json(tmp_path, "list")
        code, out, _ = await ctl(tmp_path, "list")
    assert [row["id"] for row in listing["result"]] == ["e"]
    assert code == 0
    assert out.splitlines()[-1].startswith("(host devices not listed: cannot list the host's")


# --------------------------------------------------------------------------- the real /sys

_WATCH: list[str] = []
_WATCHING = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Record every open under /sys that asks for more than reading."""
    if not _WATCHING or event != "open":
        return
    path, mode, flags = (*args, None, None, None)[:3]
    if not str(path).startswith("/sys"):
        return
    writes = isinstance(mode, str) and any(c in mode for c in "wax+")
    if isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
        writes = True
    if writes:
        _WATCH.append(f"{path} mode={mode} flags={flags}")


sys.addaudithook(_audit)


@pytest.mark.skipif(not SYSFS_PCI_DEVICES.is_dir(), reason="this machine has no /sys/bus/pci")
@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
def test_the_real_host_is_read_only_and_agrees_with_lspci() -> None:
    global _WATCHING
    _WATCHING = True
    try:
        scan = scan_host(SYSFS_PCI_DEVICES)
    finally:
        _WATCHING = False
    assert _WATCH == [], "scan_host opened something under /sys for writing"
    assert scan.problem is None
    assert {str(f.address) for f in scan.functions} == {p.name for p in SYSFS_PCI_DEVICES.iterdir()}
    lspci = subprocess.run(
        ["lspci", "-n", "-D"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    theirs = {}
    for line in lspci:  # "0000:00:02.0 0180: 1af4:1042 (rev 01)"
        address, klass, ids = line.split()[:3]
        theirs[PciAddress.parse(address)] = (ids, klass.rstrip(":"))
    ours = {
        f.address: (f.ids.vendor_device, f.ids.class_text[:4])
        for f in scan.functions
        if f.ids is not None
    }
    assert ours == theirs


def test_check_config_closes_the_host_devices_it_opened(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    # `pciback check` (and the docs runner, which calls check_config once per block)
    # opens every host device to validate it; nothing may stay open afterwards.
    _fake_host(fake_host)
    config = tmp_path / "host.toml"
    config.write_text(HOST_CONFIG)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        check_config(config)
    assert len(os.listdir("/proc/self/fd")) == before


def _host_with_a_memory_bar(host: FakeHost) -> Path:
    """A writable-looking host function whose memory decode is off (firmware would set it)."""
    host.add(
        "0000:05:00.0", 0x8086, 0x10C9, 0x020000,
        resource="0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n"
        + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 6,
    )
    config = host.config("0000:05:00.0")
    image = bytearray(config.read_bytes())
    image[0x10:0x14] = (0xFE00_0000).to_bytes(4, "little")  # BAR0: 32-bit memory
    config.write_bytes(bytes(image))
    return config


def test_check_never_writes_a_writable_host_device(tmp_path: Path, fake_host: FakeHost) -> None:
    config_file = _host_with_a_memory_bar(fake_host)
    original = config_file.read_bytes()
    config = tmp_path / "host.toml"
    config.write_text(writable_host_config(fake_host.root, "0000:05:00.0"))
    check_config(config)
    assert config_file.read_bytes() == original  # pciback check: nothing written
    # Serving it does program the decode bits (so the check above could have written).
    registry = DeviceRegistry(parse_config(config.read_text(), base=tmp_path))
    registry.close()
    assert config_file.read_bytes()[4] & 0x02 and config_file.read_bytes() != original
