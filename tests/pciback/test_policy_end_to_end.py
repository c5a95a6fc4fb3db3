"""Issue 4 end to end: policies through the real service and frontend, on real hardware data."""

from __future__ import annotations

import difflib
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pcifront
from pciback.testing import running_backend
from pcifront.cli import _lspci, build_parser
from shared.errors import ErrorCode
from tests.support.configs import ONE_GUEST

DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"
DUMPS = sorted(p for p in DATA.glob("*.txt") if not p.name.endswith("vvv.txt"))
SYSFS = Path("/sys/bus/pci/devices")
HAVE_LSPCI = shutil.which("lspci") is not None


def _snapshot_config(dump: Path, policy: str) -> str:
    return (
        "[[guest]]\nname = 'guest0'\n"
        f"[[device]]\nid = 'd'\nkind = 'snapshot'\ndump = '{dump}'\nguest = 'guest0'\n"
        f"policy = '{policy}'\n"
    )


def _virtual_offsets(image: bytes) -> set[int]:
    """Bytes the policy keeps virtual: BARs, expansion ROM and the interrupt line."""
    header_type = image[0x0E] & 0x7F
    if header_type == 1:  # bridge: 2 BARs, ROM at 0x38
        offsets = set(range(0x10, 0x18)) | set(range(0x38, 0x3C))
    else:
        offsets = set(range(0x10, 0x28)) | set(range(0x30, 0x34))
    return offsets | {0x3C}


@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.stem)
async def test_transparent_readonly_reads_back_the_dump(dump: Path, tmp_path: Path) -> None:
    from shared.pci import parse_dump, virtual_irq

    original = parse_dump(dump.read_text())[0].data
    async with (
        running_backend(
            _snapshot_config(dump, "transparent-readonly"), transports=("memory",), tmp=tmp_path
        ) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        (dev,) = bus.devices
        assert dev.config is not None and len(dev.config) == len(original)
        virtual = _virtual_offsets(original)
        differing = {i for i in range(len(original)) if dev.config[i] != original[i]}
        assert differing <= virtual, sorted(differing - virtual)
        # Word-by-word reads through the protocol agree with the snapshot image.
        for offset in range(0, 0x40, 4):
            assert await dev.config_read(offset, 4) == int.from_bytes(
                dev.config[offset : offset + 4], "little"
            )
        # Every write is denied, explicitly.
        with pytest.raises(pcifront.AccessDeniedError) as info:
            await dev.config_write(0x04, 2, 0x0006)
        assert info.value.code is ErrorCode.ACCESS_DENIED
        # The interrupt line is the guest's own (firmware's virtual IRQ, or 0xff without
        # a pin), never the host's value.
        pin = original[0x3D]
        assert dev.config[0x3C] == (virtual_irq(0, pin) if pin else 0xFF)


@pytest.mark.lspci
@pytest.mark.skipif(not HAVE_LSPCI, reason="pciutils (lspci) is not installed")
@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.stem)
async def test_real_lspci_decodes_our_dump_like_the_original(dump: Path, tmp_path: Path) -> None:
    """``lspci -F`` of our ``pcifront lspci -xxxx`` output differs from the original's only
    through the virtual fields.

    Proof in two steps: (1) the original dump decodes exactly as the reference decode
    shipped with the data (same pciutils 3.9.0); (2) our output decodes exactly as the
    original dump does once *only* its virtual bytes (BARs, ROM, interrupt line) are
    replaced by the values the guest sees. So every changed decode line is caused by
    those fields and nothing else (this includes lines lspci derives from BAR values,
    such as whether it prints AtomicOpsCap for an endpoint).
    """
    from shared.pci import DumpEntry, format_dump, parse_dump

    async with running_backend(
        _snapshot_config(dump, "transparent-readonly"), transports=("memory",), tmp=tmp_path
    ) as rb:
        args = build_parser().parse_args(
            ["lspci", "--connect", rb.address("memory"), "-xxxx", "-i", "/usr/share/misc/pci.ids"]
        )
        ours_text = await _lspci(args)
    ours = tmp_path / "ours.txt"
    ours.write_text(ours_text)
    ours_image = parse_dump(ours_text)[0].data
    original = parse_dump(dump.read_text())[0]
    patched = bytearray(original.data)
    for offset in _virtual_offsets(original.data):
        patched[offset] = ours_image[offset]
    expected = tmp_path / "patched.txt"
    expected.write_text(format_dump([DumpEntry(original.header, original.address, bytes(patched))]))

    def decode(path: Path) -> list[str]:
        out = subprocess.run(
            [
                "lspci",
                "-F",
                str(path),
                "-vvv",
                "-i",
                "/usr/share/misc/pci.ids",
                "-O",
                "hwdb.disable=1",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        # The first line carries the slot, which is virtual (00:00.x) for us.
        return [re.sub(r"^[0-9a-f:.]+ ", "", out[0]), *out[1:]]

    reference = (DATA / "vvv-3.9.0" / f"{dump.stem}.vvv.txt").read_text().splitlines()
    assert decode(dump)[1:] == reference[1:]
    assert decode(ours) == decode(expected), "\n".join(
        difflib.unified_diff(decode(expected), decode(ours), lineterm="", n=0)
    )


def _host_devices() -> list[str]:
    return sorted(p.name for p in SYSFS.iterdir()) if SYSFS.is_dir() else []


@pytest.mark.skipif(not _host_devices(), reason="no /sys/bus/pci/devices on this machine")
async def test_every_host_device_reads_back_identical_to_sysfs(tmp_path: Path) -> None:
    names = _host_devices()
    config = "[[guest]]\nname = 'guest0'\n" + "".join(
        f"[[device]]\nid = 'h{i}'\nkind = 'host'\naddress = '{name}'\nguest = 'guest0'\n"
        f"policy = 'transparent-readonly'\n"
        for i, name in enumerate(names)
    )
    async with (
        running_backend(config, transports=("memory",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("memory"), include_config=True) as bus,
    ):
        assert len(bus.devices) == len(names)
        for dev, name in zip(bus.devices, names, strict=True):
            real = (SYSFS / name / "config").read_bytes()  # read-only: never written
            assert dev.config is not None
            ours = dev.config[: len(real)]
            virtual = _virtual_offsets(real) | {0x06}  # Status.INTERRUPT may change live
            differing = {i for i in range(len(real)) if ours[i] != real[i]}
            assert differing <= virtual, (name, sorted(differing - virtual))
            with pytest.raises(pcifront.AccessDeniedError):
                await dev.config_write(0x04, 2, 0)


async def test_denied_write_is_an_error_and_an_audit_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ONE_GUEST
    caplog.set_level(logging.INFO, logger="pcisplit.audit")
    async with (
        running_backend(config, transports=("unix",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("unix"), guest="guest0") as bus,
    ):
        edu = bus.devices[0]
        with pytest.raises(pcifront.AccessDeniedError) as info:
            await edu.config_write(0x00, 2, 0xBEEF)  # vendor ID: read-only
        assert "vendor" in str(info.value).lower()
        assert await edu.config_read(0x00, 2) == 0x1234
        # BAR sizing works through the virtual BAR, and never moves the device's BAR.
        await edu.config_write(0x10, 4, 0xFFFFFFFF)
        assert await edu.config_read(0x10, 4) == 0xFFF00000  # 1 MiB, 32-bit, non-prefetchable
        await edu.config_write(0x10, 4, 0xFEB00000)
        assert await edu.config_read(0x10, 4) == 0xFEB00000
        # Command: the guest may set memory decode and bus master.
        await edu.config_write(0x04, 2, 0x0006)
        assert await edu.config_read(0x04, 2) & 0x6 == 0x6
    entries = [r for r in caplog.records if r.name == "pcisplit.audit"]
    assert entries, "the denied write left no audit entry"
    text = entries[0].getMessage()
    assert "guest0" in text and "edu0" in text and "0x0" in text
