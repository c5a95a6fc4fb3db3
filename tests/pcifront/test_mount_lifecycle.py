"""``pcifront mount``: foreground lifecycle, clean unmount on every exit path, refusals,
hot-plug in the tree, and ``pcifront setpci`` (issue 10 §2, §3).

The mount command runs as a real process here because signals and the process
exit are the point; the backend runs in the test's loop on a unix socket.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from _fuse_support import EDU, config, force_unmount, mounted_guest, needs_fuse

import pcifront
from pciback.testing import running_backend
from pcifront.cli import build_parser, main, open_bus
from pcifront.tools import mount as _mount
from pcifront.tools.setpci import SetpciError, SetpciSyntaxError, parse_op, setpci_main
from tests.support.serve import ServeFactory

pytestmark = needs_fuse


async def _start_mount(mnt: Path, address: str) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pcifront.cli", "mount", str(mnt), "--connect", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                break
            line += chunk
    return process, line.decode()


async def _stderr(process: trio.Process) -> str:
    assert process.stderr is not None
    data = b""
    while chunk := await process.stderr.receive_some():
        data += chunk
    return data.decode()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_mount_runs_until_a_signal_and_unmounts(
    tmp_path: Path, signum: signal.Signals
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        async with running_backend(config(EDU), transports=("unix",), tmp=tmp_path) as rb:
            process, line = await _start_mount(mnt, rb.address("unix"))
            assert line == f"mounted guest0's bus (1 devices) at {mnt}\n"
            assert os.path.ismount(mnt)
            names = await trio.to_thread.run_sync(os.listdir, mnt / "devices")
            assert names == ["0000:00:00.0"]
            process.send_signal(signum)
            with trio.fail_after(30):
                code = await process.wait()
                err = await _stderr(process)
            assert code == 0, err
            assert f"{signum.name}: unmounted" in err
            assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)


async def test_mount_unmounts_when_the_backend_goes_away(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        async with running_backend(config(EDU), transports=("unix",), tmp=tmp_path) as rb:
            process, line = await _start_mount(mnt, rb.address("unix"))
            assert line.startswith("mounted")
        # The backend is gone now.
        with trio.fail_after(30):
            code = await process.wait()
            err = await _stderr(process)
        assert code == 1
        assert "the backend went away" in err and "unmounted" in err
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_mount_refuses_bad_mount_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"unix:{tmp_path / 'absent.sock'}"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "not a directory" in _main_error(["mount", str(afile), "--connect", address], capsys)
    assert "does not exist" in _main_error(
        ["mount", str(tmp_path / "nope"), "--connect", address], capsys
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "not empty" in _main_error(["mount", str(full), "--connect", address], capsys)


async def test_mount_refuses_a_busy_mount_point(tmp_path: Path) -> None:
    async with mounted_guest(config(EDU), tmp_path) as (bus, _fs, mnt):
        del bus
        # (In a thread: stat() on the mount is served by this very loop.)
        with pytest.raises(_mount.MountError, match="busy"):
            await trio.to_thread.run_sync(_mount.check_mountpoint, mnt)


def test_missing_dev_fuse_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mount, "FUSE_DEVICE", str(tmp_path / "no-fuse"))
    (tmp_path / "mnt").mkdir()
    err = _main_error(["mount", str(tmp_path / "mnt"), "--connect", "unix:/x"], capsys)
    assert err.startswith("pcifront: ") and "no-fuse is missing" in err


async def test_hotplug_adds_and_removes_device_directories(tmp_path: Path) -> None:
    two = config(EDU, "[[device]]\nid = 'spare'\nkind = 'emulated'\nmodel = 'edu'\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        async with (
            running_backend(two, tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), include_config=True) as bus,
            _mount.mounted(bus, mnt) as fs,
        ):
            devices = mnt / "devices"
            assert await trio.to_thread.run_sync(os.listdir, devices) == ["0000:00:00.0"]
            generation = fs.generation
            await rb.backend.assign("spare", "guest0")  # hot-plug: the mirror follows
            await fs.wait_rebuilt(generation)
            assert sorted(await trio.to_thread.run_sync(os.listdir, devices)) == [
                "0000:00:00.0", "0000:00:01.0",
            ]
            vendor = devices / "0000:00:01.0" / "vendor"
            assert await trio.to_thread.run_sync(vendor.read_text) == "0x1234\n"
            generation = fs.generation
            await rb.backend.unassign("edu")  # hot-unplug
            await fs.wait_rebuilt(generation)
            assert await trio.to_thread.run_sync(os.listdir, devices) == ["0000:00:01.0"]
            assert not await trio.to_thread.run_sync(os.path.exists, devices / "0000:00:00.0")
    finally:
        force_unmount(mnt)


# ------------------------------------------------------------------ pcifront setpci


def _setpci_args(address: str, *ops: str) -> argparse.Namespace:
    return build_parser().parse_args(["setpci", "--connect", address, *ops])


async def test_pcifront_setpci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_backend(config(EDU), tmp=tmp_path) as rb:
        address = rb.address("memory")

        async def setpci(*ops: str) -> str:
            await setpci_main(_setpci_args(address, "-s", "00:00.0", *ops), open_bus)
            return capsys.readouterr().out

        # One invocation is one connection; the device is reset when the guest's last
        # connection ends (reset on release), so write and read back in one call.
        assert int(await setpci("COMMAND=0x4:0x4", "COMMAND"), 16) & 0x4
        assert await setpci("BASE_ADDRESS_0=ffffffff", "BASE_ADDRESS_0") == "fff00000\n"
        assert await setpci("BASE_ADDRESS_0=d0000000", "10.l") == "d0000000\n"
        assert await setpci("CAP_MSI+2.w", "INTERRUPT_PIN", "3d.b") == "0080\n01\n01\n"
        with pytest.raises(SetpciError, match="denied by the backend's policy"):
            await setpci("VENDOR_ID=0")
        assert await setpci("VENDOR_ID") == "1234\n"
        with pytest.raises(SetpciError, match="capability 0x10 not found"):
            await setpci("CAP_EXP+2.w")
        with pytest.raises(SetpciError, match="no device"):
            await setpci_main(_setpci_args(address, "-s", "00:05.0", "COMMAND"), open_bus)


def test_setpci_denied_write_exits_non_zero_with_the_reason(
    tmp_path: Path, serve_pciback: ServeFactory
) -> None:
    # The exit status is the point: both sides run as the real commands (the default
    # configuration serves one edu device to guest0).
    sock = tmp_path / "pciback.sock"
    serve_pciback("--listen", f"unix:{sock}")
    out = subprocess.run(
        [sys.executable, "-m", "pcifront.cli", "setpci", "--connect", f"unix:{sock}",
         "VENDOR_ID=0"], capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "denied by the backend's policy" in out.stderr and "vendor_id" in out.stderr


@pytest.mark.parametrize(
    ("text", "offset", "width", "values"),
    [
        ("COMMAND", 0x04, 2, ()),
        ("command.b", 0x04, 1, ()),
        ("10.L", 0x10, 4, ()),
        ("BASE_ADDRESS_1=0xffffffff", 0x14, 4, ((0xFFFFFFFF, 0xFFFFFFFF),)),
        ("4.w=6:6", 0x04, 2, ((6, 6),)),
        ("3c.b=1,2", 0x3C, 1, ((1, 0xFF), (2, 0xFF))),
        ("CB_LEGACY_MODE_BASE", 0x44, 4, ()),
    ],
)
def test_setpci_syntax(text: str, offset: int, width: int, values: tuple[object, ...]) -> None:
    op = parse_op(text)
    assert (op.offset, op.width, op.values) == (offset, width, values)


def test_setpci_capability_syntax() -> None:
    op = parse_op("CAP_EXP+10.w=1")
    assert op.capability == (False, 0x10, 0) and op.offset == 0x10 and op.width == 2
    assert parse_op("ECAP_AER@1+4.l").capability == (True, 0x01, 1)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("10", "missing width"), ("11.w", "not aligned"), ("1000.l", "out of range"),
     ("ffc.l=1,2", "out of range"),
     ("COMMAND.q", "width"), ("COMMAND=", "no value"), ("COMMAND=12345", "does not fit"),
     ("BOGUS", "not a hex number"), ("4.w=zz", "not a hex number")],
)
def test_setpci_syntax_errors(text: str, reason: str) -> None:
    with pytest.raises(SetpciSyntaxError, match=reason):
        parse_op(text)
