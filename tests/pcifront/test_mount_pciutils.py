"""The real pciutils through the mounted sysfs mirror (issue 10 §2, §3, Tests).

Every test mounts the guest's bus under a tmp dir and unmounts it on every
path (``_fuse_support.mounted_guest``); they skip only where /dev/fuse is absent.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import pytest
import trio
from _fuse_support import (
    _IRQ,
    _REGION,
    _ROM,
    DUMPS,
    EDU,
    LSPCI,
    SETPCI,
    config,
    force_unmount,
    lspci_size,
    mounted_guest,
    needs_fuse,
    sysfs_args,
)

import pcifront
from pciback.testing import running_backend
from pcifront.cli import _lspci, build_parser
from pcifront.client.resources import ROM_INDEX
from pcifront.tools.mount import mounted
from shared.pci import DumpEntry, format_dump, parse_dump, virtual_irq

pytestmark = [needs_fuse, pytest.mark.lspci]


async def _run(*argv: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        list(argv), capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def _lspci_mount(mnt: Path, *args: str) -> str:
    assert LSPCI is not None
    code, out, err = await _run(LSPCI, *sysfs_args(mnt), *args)
    assert code == 0, err
    return out


def _cli_args(address: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["lspci", "--connect", address, *flags])


# The mount is served by this test's own trio loop, so every file-system call on it runs
# in a worker thread (a blocking call on the loop's thread would wait for itself).
thread = trio.to_thread.run_sync


async def test_tree_is_shaped_like_sys_bus_pci(tmp_path: Path) -> None:
    async with mounted_guest(config(EDU), tmp_path) as (bus, _fs, mnt):
        (edu,) = bus.devices
        (bar0,) = await edu.resources()
        directory = mnt / "devices" / edu.address

        def check() -> None:
            names = {p.name for p in directory.iterdir()}
            assert {"config", "vendor", "device", "class", "revision", "subsystem_vendor",
                    "subsystem_device", "irq", "resource", "driver"} <= names
            assert (mnt / "slots").is_dir()
            assert (directory / "vendor").read_text() == "0x1234\n"
            assert (directory / "class").read_text() == "0x00ff00\n"
            lines = (directory / "resource").read_text().splitlines()
            assert len(lines) == 7
            end = bar0.start + 0xFFFFF
            assert lines[0] == f"0x{bar0.start:016x} 0x{end:016x} 0x{0x40200:016x}"
            assert (directory / "irq").read_text() == f"{virtual_irq(0, 1)}\n"
            assert os.readlink(directory / "driver").endswith("/pcifront")
            config_file = directory / "config"
            assert config_file.stat().st_size == 256
            fd = os.open(config_file, os.O_RDONLY)
            try:
                assert os.pread(fd, 4, 0) == bytes.fromhex("3412e811")
                assert os.pread(fd, 3, 1) == bytes.fromhex("12e811")  # unaligned: split
                assert os.pread(fd, 16, 256) == b""  # past the config size: end of file
                assert len(os.pread(fd, 4096, 0)) == 256
            finally:
                os.close(fd)

        await thread(check)


async def test_config_reads_are_live_not_cached(tmp_path: Path) -> None:
    async with mounted_guest(config(EDU), tmp_path) as (bus, _fs, mnt):
        (edu,) = bus.devices
        path = mnt / "devices" / edu.address / "config"
        fd = await thread(os.open, path, os.O_RDONLY)
        try:
            before = await thread(os.pread, fd, 1, 0x3C)
            await edu.config_write(0x3C, 1, 0x42)  # another path changes the register
            assert before != b"\x42"
            assert await thread(os.pread, fd, 1, 0x3C) == b"\x42"
        finally:
            await thread(os.close, fd)


async def test_denied_write_fails_the_pwrite_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted_guest(config(EDU), tmp_path) as (bus, fs, mnt):
        (edu,) = bus.devices
        directory = mnt / "devices" / edu.address
        fd = await thread(os.open, directory / "config", os.O_RDWR)
        try:
            with pytest.raises(PermissionError) as info:
                await thread(os.pwrite, fd, b"\x00\x00", 0)
            assert info.value.errno == errno.EACCES
            assert await thread(os.pread, fd, 2, 0) == b"\x34\x12"
            # An allowed write sticks and is read back through the mount.
            await thread(os.pwrite, fd, b"\x06\x00", 4)
            assert await edu.config_read(4, 2) & 0x6 == 0x6
        finally:
            await thread(os.close, fd)
        assert fs.denied_writes == 1
        assert any("denied by the backend's policy" in r.getMessage() for r in caplog.records)
        # Text attributes are read-only.
        with pytest.raises(PermissionError):
            await thread((directory / "vendor").write_text, "0x1\n")


@pytest.mark.parametrize(
    "flags",
    [("-vvv",), ("-nn", "-v"), ("-xxx",), ("-tv",), ("-mm",), ("-k",), ("-b", "-v"), ("-D",),
     ("-PP",), ("-m",), ("-vv", "-s", "00:00.0"), ("-d", "1234:")],
)
async def test_pcifront_lspci_equals_real_lspci_through_the_mount(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """``pcifront lspci`` (a temporary tree) prints what the real lspci prints via the mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        async with (
            running_backend(config(EDU), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), include_config=True) as bus,
            mounted(bus, mnt),
        ):
            ours = await _lspci(_cli_args(rb.address("memory"), *flags))
            real = await _lspci_mount(mnt, *flags)
    finally:
        force_unmount(mnt)
    drop = "\tKernel driver in use:"
    assert [x for x in ours.splitlines() if not x.startswith(drop)] == [
        x for x in real.splitlines() if not x.startswith(drop)
    ]
    assert ours.strip()


def _expected_from_dump(dump_lines: list[str], resources: dict[int, tuple[int, int, bool]],
                        irq: int | None) -> list[str]:
    """The by-design differences, applied to ``lspci -F dump -vvv``: nothing else may differ.

    * Region and Expansion ROM lines gain ``[size=...]`` (sysfs ``resource`` has sizes, a
      dump has none) and show the guest's address (firmware placed BARs the dump left at 0);
    * the IRQ is the guest's virtual one (the dump's is the host's line register).
    """
    out = []
    for line in dump_lines:
        if (match := _REGION.match(line)) is not None:
            index = int(match.group(2))
            start, size, io = resources[index]
            address = f"{start:04x}" if io else f"{start:08x}"
            line = f"{match.group(1)}{address}{match.group(5)} [size={lspci_size(size)}]"
        elif (match := _ROM.match(line)) is not None and ROM_INDEX in resources:
            start, size, _ = resources[ROM_INDEX]
            line = f"{match.group(1)}{start:08x}{match.group(3)} [size={lspci_size(size)}]"
        elif (match := _IRQ.match(line)) is not None and irq is not None:
            line = f"{match.group(1)}{irq}"
        out.append(line)
    return out


async def test_every_dump_through_the_mount_differs_from_lspci_F_only_by_design(
    tmp_path: Path,
) -> None:
    """All 26 real dumps as snapshots on one guest bus, checked device by device."""
    assert LSPCI is not None
    devices = "".join(
        f"[[device]]\nid = 'd{n}'\nkind = 'snapshot'\ndump = '{dump}'\nguest = 'guest0'\n"
        "policy = 'transparent-readonly'\n"
        for n, dump in enumerate(DUMPS)
    )
    async with mounted_guest(config(devices), tmp_path) as (bus, _fs, mnt):
        assert len(bus.devices) == len(DUMPS) == 26
        for dev, dump in zip(bus.devices, DUMPS, strict=True):
            entry = parse_dump(dump.read_text())[0]
            # The same device at the guest's slot: lspci decodes some fields by slot.
            readdressed = tmp_path / f"{dump.stem}.guest-slot.txt"
            header = f"{dev.address[5:]} {entry.header.split(' ', 1)[1]}"
            readdressed.write_text(format_dump([DumpEntry(header, dev.pci_address, entry.data)]))
            code, from_dump, err = await _run(LSPCI, "-F", str(readdressed), "-vvv")
            assert code == 0, err
            through_mount = await _lspci_mount(mnt, "-vvv", "-s", dev.address)
            resources = {
                r.index: (r.start, r.size, r.io) for r in await dev.resources()
            }
            pin = entry.data[0x3D]
            irq = virtual_irq(dev.pci_address.device, pin) if pin else None
            expected = _expected_from_dump(from_dump.splitlines(), resources, irq)
            assert through_mount.splitlines() == expected, dump.stem


async def test_setpci_through_the_mount(tmp_path: Path) -> None:
    assert SETPCI is not None
    async with mounted_guest(config(EDU), tmp_path) as (bus, _fs, mnt):
        (edu,) = bus.devices
        base = [SETPCI, *sysfs_args(mnt), "-s", edu.address]
        # An allowed Command bit sticks.
        code, _, err = await _run(*base, "COMMAND=0x4:0x4")
        assert code == 0, err
        code, out, _ = await _run(*base, "COMMAND")
        assert int(out, 16) & 0x4
        # The all-ones sizing sequence returns the size mask...
        assert (await _run(*base, "BASE_ADDRESS_0=ffffffff"))[0] == 0
        assert (await _run(*base, "BASE_ADDRESS_0"))[1] == "fff00000\n"
        # ...and an address that is not all ones is the address read back, and routed.
        assert (await _run(*base, "BASE_ADDRESS_0=d0000000"))[0] == 0
        assert (await _run(*base, "BASE_ADDRESS_0"))[1] == "d0000000\n"
        assert await bus.mmio_read(0xD000_0000, 4) == 0x010000ED
        # A denied write fails its pwrite (setpci reports it) and changes nothing.
        code, _, err = await _run(*base, "VENDOR_ID=0")
        assert "Permission denied" in err
        assert (await _run(*base, "VENDOR_ID"))[1] == "1234\n"
