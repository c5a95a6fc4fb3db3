"""Host devices: real sysfs is only ever READ; writes go to a fake tree in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pciback.devices import (
    SYSFS_PCI_DEVICES,
    BarKind,
    BarSpec,
    DeviceSetupError,
    HostDevice,
    parse_resource_file,
)
from shared.errors import ConfigAccessError, ErrorCode, PcisplitError
from shared.pci import PciAddress, Reg

REAL_DEVICES = (
    sorted(p.name for p in SYSFS_PCI_DEVICES.iterdir()) if SYSFS_PCI_DEVICES.is_dir() else []
)
REPO = Path(__file__).resolve().parents[3]

needs_pci = pytest.mark.skipif(not REAL_DEVICES, reason="this machine has no /sys/bus/pci devices")


def real_config(address: str) -> bytes:
    with open(SYSFS_PCI_DEVICES / address / "config", "rb") as f:
        return f.read()


def steady(image: bytes) -> bytes:
    """The image without Status.INTERRUPT, which live hardware may toggle between reads."""
    out = bytearray(image)
    out[Reg.STATUS] &= ~0x08
    return bytes(out)


@needs_pci
@pytest.mark.parametrize("address", REAL_DEVICES)
def test_real_device_reads_back_identical_to_sysfs(address: str) -> None:
    expected = steady(real_config(address))
    with HostDevice(address) as dev:
        assert not dev.writable
        assert dev.kind == "host"
        assert dev.config_size == len(expected)
        assert steady(dev.config_image()) == expected
        words = b"".join(
            dev.config_read(offset, 4).to_bytes(4, "little")
            for offset in range(0, dev.config_size, 4)
        )
        halves = b"".join(
            dev.config_read(offset, 2).to_bytes(2, "little")
            for offset in range(0, dev.config_size, 2)
        )
        single = bytes(dev.config_read(offset, 1) for offset in range(dev.config_size))
        assert steady(words) == steady(halves) == steady(single) == expected


@needs_pci
@pytest.mark.parametrize("address", REAL_DEVICES)
def test_real_device_bars_match_resource_file(address: str) -> None:
    resource = (SYSFS_PCI_DEVICES / address / "resource").read_text()
    with HostDevice(PciAddress.parse(address)) as dev:
        assert (dev.bars(), dev.rom_size()) == parse_resource_file(resource)
        for spec in dev.bars():
            start, end, _ = (int(f, 16) for f in resource.splitlines()[spec.index].split())
            assert spec.size == end - start + 1
            with pytest.raises(PcisplitError) as info:
                dev.bar_read(spec.index, 0, 4)
            assert info.value.code is ErrorCode.NOT_IMPLEMENTED


@needs_pci
def test_unprivileged_reader_gets_the_header_only() -> None:
    address = REAL_DEVICES[0]
    if os.geteuid() != 0:
        with HostDevice(address) as dev:
            assert dev.restricted and dev.config_size == 64
        return
    # As root, a child drops to "nobody" before opening the file (the kernel checks the
    # opener's CAP_SYS_ADMIN); Linux then returns only the first 64 bytes.
    code = (
        "import os, pwd\n"
        "from pciback.devices import HostDevice\n"
        "nobody = pwd.getpwnam('nobody')\n"
        "os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)\n"
        f"d = HostDevice({address!r})\n"
        "print(d.config_size, d.restricted, d.config_image().hex())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    size, restricted, image = result.stdout.split()
    assert (int(size), restricted) == (64, "True")
    assert bytes.fromhex(image) == real_config(address)[:64]


def test_missing_device_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(PcisplitError) as info:
        HostDevice("0000:7f:1f.7", sysfs_root=tmp_path)
    assert info.value.code is ErrorCode.NOT_FOUND


# -- a fake sysfs tree (the only place anything is written) ------------------------------


RESOURCE = (
    "0x00000000febd0000 0x00000000febd0fff 0x0000000000040200\n"  # BAR0 mem32 4K
    "0x000000000000c000 0x000000000000c01f 0x0000000000040101\n"  # BAR1 I/O 32 B
    "0x0000004000000000 0x000000400fffffff 0x000000000014220c\n"  # BAR2 mem64 pref 256M
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"  # BAR3 (upper half)
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x00000000feb80000 0x00000000feb bfff 0x0000000000046200\n"  # ROM, deliberately broken
)


def fake_device(root: Path, address: str, config: bytes, resource: str) -> Path:
    path = root / address
    path.mkdir(parents=True)
    (path / "config").write_bytes(config)
    (path / "resource").write_text(resource)
    return path


def sample_config() -> bytes:
    if REAL_DEVICES:
        return real_config(REAL_DEVICES[-1])
    image = bytearray(256)
    image[0:4] = b"\x34\x12\xe8\x11"
    return bytes(image)


def test_parse_resource_file() -> None:
    good = RESOURCE.replace("0x00000000feb bfff", "0x00000000feb8ffff")
    bars, rom = parse_resource_file(good + "0x1000 0x1fff 0x200\n")  # a bridge window: ignored
    assert bars == [
        BarSpec(0, 0x1000, BarKind.MEM32),
        BarSpec(1, 0x20, BarKind.IO),
        BarSpec(2, 0x1000_0000, BarKind.MEM64, prefetchable=True),
    ]
    assert rom == 0x10000
    with pytest.raises(DeviceSetupError, match="line 7"):
        parse_resource_file(RESOURCE)


def test_fake_tree_read_only_by_default(tmp_path: Path) -> None:
    config = sample_config()
    path = fake_device(tmp_path, "0000:00:07.0", config, "")
    with HostDevice("00:07.0", sysfs_root=tmp_path) as dev:
        assert dev.config_image() == config
        assert dev.bars() == []
        with pytest.raises(ConfigAccessError) as info:
            dev.config_write(Reg.COMMAND, 2, 0)
        assert info.value.code is ErrorCode.ACCESS_DENIED
        assert "writable" in str(info.value)
        dev.reset()  # nothing could have been written: nothing to restore
        with pytest.raises(ConfigAccessError) as bar_info:
            dev.bar_read(0, 0, 4)
        assert bar_info.value.code is ErrorCode.NOT_FOUND
    assert (path / "config").read_bytes() == config
    with pytest.raises(PcisplitError) as closed:
        dev.config_read(0, 4)
    assert closed.value.code is ErrorCode.INVALID_STATE


def test_fake_tree_writable(tmp_path: Path) -> None:
    config = sample_config()
    path = fake_device(tmp_path, "0000:00:07.0", config, "")
    with HostDevice("0000:00:07.0", writable=True, sysfs_root=tmp_path) as dev:
        dev.config_write(Reg.INTERRUPT_LINE, 1, 0x5A)
        dev.config_write(Reg.COMMAND, 2, 0x0406)
        assert dev.config_read(Reg.INTERRUPT_LINE, 1) == 0x5A
        with pytest.raises(ConfigAccessError):
            dev.config_write(Reg.COMMAND, 2, 0x10000)
        with pytest.raises(ConfigAccessError):
            dev.config_write(0x101 if dev.config_size > 256 else 0xFF, 2, 0)
    written = (path / "config").read_bytes()
    assert written[Reg.INTERRUPT_LINE] == 0x5A
    assert written[Reg.COMMAND : Reg.COMMAND + 2] == b"\x06\x04"
    assert written[8 : Reg.INTERRUPT_LINE] == config[8 : Reg.INTERRUPT_LINE]


@pytest.mark.parametrize(("length", "expected"), [(64, 64), (256, 256), (4096, 4096), (300, 256)])
def test_config_size_from_file(tmp_path: Path, length: int, expected: int) -> None:
    fake_device(tmp_path, "0000:00:07.0", bytes(length), "")
    with HostDevice("0000:00:07.0", sysfs_root=tmp_path) as dev:
        assert dev.config_size == expected
        with pytest.raises(ConfigAccessError):
            dev.config_read(expected, 4)


def test_too_short_config_rejected(tmp_path: Path) -> None:
    fake_device(tmp_path, "0000:00:07.0", bytes(32), "")
    with pytest.raises(PcisplitError, match="64-byte header"):
        HostDevice("0000:00:07.0", sysfs_root=tmp_path)


def test_writable_reset_restores_the_config_saved_at_open(tmp_path: Path) -> None:
    config = sample_config()
    path = fake_device(tmp_path, "0000:00:07.0", config, "")
    with HostDevice("00:07.0", writable=True, sysfs_root=tmp_path) as dev:
        assert dev.saved_config == config
        dev.config_write(Reg.COMMAND, 2, 0x0007)
        dev.config_write(0x10, 4, 0xFEB00000)
        dev.config_write(0x3C, 1, 0x0B)
        assert (path / "config").read_bytes() != config
        dev.reset()
        assert (path / "config").read_bytes() == config
