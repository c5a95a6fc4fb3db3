"""Boot the test guest against vfio-user servers and run a shell script inside it.

::

    result = await vm.guest.run_script(
        "cat /sys/bus/pci/devices/*/vendor", sockets=["/run/gpio.sock"], timeout=60)
    assert result.status == 0, result.console
    print(result.output)

One QEMU (from ``.vm/root``, run through chroot in a private mount namespace) per call:
the kernel and initramfs from ``.vm/boot``, the script appended to the initramfs as
``/pcisplit/script``, one ``vfio-user-pci`` device per socket, guest RAM in a shared memfd
(so that a server can map it for DMA), no other devices (no network, no disks). The guest
powers off when the script ends. QEMU is always killed and reaped before this returns, also
on time-out, error or cancellation. TCG unless the host has hardware KVM (:func:`accel`).

The guest's serial ports: ttyS0 is the console (the kernel's log, init's messages and the
script's stderr: :attr:`GuestResult.console`), ttyS1 carries the script's stdout
(:attr:`GuestResult.output`) and ttyS2 its exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from vm import initramfs
from vm.errors import GuestError, GuestTimeout
from vm.image import Image, chroot_argv
from vm.servers import is_socket

__all__ = ["GuestResult", "accel", "qemu_argv", "device_json", "run_script", "run_script_sync",
           "QEMU"]

QEMU = "/usr/bin/qemu-system-x86_64"
#: Where the parts appear inside the root while QEMU runs (tmpfs under /run, see chroot_argv).
BOOT_IN_ROOT = "/run/pcisplit/boot"
WORK_IN_ROOT = "/run/pcisplit/work"
SOCKETS_IN_ROOT = "/run/pcisplit/sock"
#: How many bytes of console the errors quote.
CONSOLE_TAIL = 3000


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What a guest's script did: exit status, stdout, and the console around it."""

    status: int
    output: str
    console: str
    seconds: float


def accel() -> str:
    """``kvm`` when the host has hardware KVM (``kvm_intel``/``kvm_amd``), else ``tcg``.

    A bare ``/dev/kvm`` is not enough: a nested ``kvm_pvm`` cannot run an unmodified kernel.
    """
    hardware = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def device_json(socket_path: str, **properties: object) -> str:
    """The ``-device`` argument of one ``vfio-user-pci`` device on the UNIX socket."""
    return json.dumps({"driver": "vfio-user-pci",
                       "socket": {"type": "unix", "path": socket_path}, **properties},
                      separators=(",", ":"))


def qemu_argv(kernel: str, initrd: str, *, sockets: Sequence[str] = (), append: str = "",
              serial: Sequence[str] = (), memory_mb: int = 256,
              machine: str = "q35", reboot: bool = False) -> list[str]:
    """QEMU's command line (paths as QEMU sees them): the guest, its ports, its devices.

    A guest's reboot stops QEMU unless ``reboot`` (then it resets the machine, devices
    included, and boots again).
    """
    argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
            *([] if reboot else ["-no-reboot"]),
            "-machine", f"{machine},memory-backend=ram0", "-accel", accel(),
            "-m", f"{memory_mb}M",
            "-object", f"memory-backend-memfd,id=ram0,size={memory_mb}M,share=on",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 {append}".strip()]
    for port in serial:
        argv += ["-serial", port]
    for path in sockets:
        argv += ["-device", device_json(path)]
    return argv


def _socket_binds(sockets: Sequence[str | os.PathLike[str]]) -> tuple[list[tuple[Path, str]],
                                                                      list[str]]:
    """Bind mounts for the sockets' directories, and each socket's path inside the root."""
    binds: list[tuple[Path, str]] = []
    inside: list[str] = []
    dirs: dict[Path, str] = {}
    for raw in sockets:
        path = Path(raw).absolute()
        if path.parent not in dirs:
            dirs[path.parent] = f"{SOCKETS_IN_ROOT}{len(dirs)}"
            binds.append((path.parent, dirs[path.parent]))
        inside.append(f"{dirs[path.parent]}/{path.name}")
    return binds, inside


def _tail(text: str) -> str:
    return text[-CONSOLE_TAIL:] if len(text) > CONSOLE_TAIL else text


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


async def run_script(script: str, *, sockets: Sequence[str | os.PathLike[str]] = (),
                     timeout: float = 120.0, memory_mb: int = 256, machine: str = "q35",
                     image: Image | None = None, cmdline: str = "quiet",
                     boots: int = 1) -> GuestResult:
    """Boot a guest with a ``vfio-user-pci`` device per socket, run ``script`` (busybox sh).

    Returns the script's exit status and output. With ``boots`` > 1 the script may reset
    the machine (``reboot -f``) to run again, up to ``boots`` runs in all: it sees which run
    it is in ``$PCISPLIT_BOOT`` (1, 2, ...); the output and console of every run are kept.
    Raises :class:`GuestTimeout` when the guest has not powered off after ``timeout``
    seconds (boots included), and
    :class:`GuestError` when QEMU fails or the guest stops without reporting a status (both
    quote the console and QEMU's own messages). ``cmdline`` is added to the kernel's.
    """
    image = image if image is not None else Image()
    image.require()
    for raw in sockets:
        if not is_socket(Path(raw)):
            raise GuestError(f"no vfio-user server's socket at {raw}: start the server first "
                             "(QEMU connects when it starts)")
    with tempfile.TemporaryDirectory(prefix="pcisplit-vm-") as work_dir:
        work = Path(work_dir)
        os.chmod(work, 0o755)
        initrd = work / "initrd"
        with initrd.open("wb") as out, image.initramfs.open("rb") as base:
            shutil.copyfileobj(base, out)
            # A second archive after the first: the kernel unpacks both into one root. It
            # skips zero bytes between them and wants an uncompressed one 4-byte aligned.
            out.write(b"\0" * (-out.tell() % 4))
            out.write(initramfs.cpio([initramfs.directory("pcisplit"),
                                      initramfs.file("pcisplit/script", script.encode(),
                                                     0o755)]))
        ports = ("console", "output", "status")
        for name in ports:
            (work / name).touch()
        binds, inside = _socket_binds(sockets)
        binds = [(image.boot, BOOT_IN_ROOT), (work, WORK_IN_ROOT), *binds]
        argv = qemu_argv(f"{BOOT_IN_ROOT}/vmlinuz", f"{WORK_IN_ROOT}/initrd", sockets=inside,
                         append=f"{cmdline} pcisplit.mode=script pcisplit.boots={boots}",
                         memory_mb=memory_mb, machine=machine, reboot=boots > 1,
                         serial=[f"file:{WORK_IN_ROOT}/{name}" for name in ports])
        started = time.monotonic()
        stderr_path = work / "qemu.stderr"
        with stderr_path.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                chroot_argv(image.root, argv, binds), stdin=subprocess.DEVNULL,
                stdout=stderr, stderr=stderr)
            try:
                with trio.move_on_after(timeout) as scope:
                    await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
        seconds = time.monotonic() - started
        console = _read(work / "console")
        qemu_said = _read(stderr_path).strip()
        context = (f"\n--- QEMU said ---\n{qemu_said}" if qemu_said else "") + \
                  f"\n--- the guest's console (end) ---\n{_tail(console)}"
        if scope.cancelled_caught:
            raise GuestTimeout(f"the guest was still running after {timeout:.0f} s; QEMU was "
                               f"killed{context}")
        status_text = _read(work / "status").strip()
        if process.returncode != 0 or not status_text.isdigit():
            code = process.returncode or 0
            how = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                   else f"exit status {code}")
            raise GuestError(f"the guest stopped without reporting its script's exit status "
                             f"(QEMU: {how}){context}")
        return GuestResult(int(status_text), _read(work / "output"), console, seconds)


def run_script_sync(script: str, **kwargs: object) -> GuestResult:
    """:func:`run_script` for code without a trio loop (same arguments)."""
    result: GuestResult = trio.run(lambda: run_script(script, **kwargs))  # type: ignore[arg-type]
    return result



def shell(sockets: Sequence[str | os.PathLike[str]] = (), *, memory_mb: int = 256,
          image: Image | None = None) -> int:
    """Boot the guest with a shell on this terminal's stdio; returns QEMU's exit status.

    The console is ``-serial mon:stdio`` (Ctrl-A C switches to QEMU's monitor, Ctrl-A X
    quits); the guest powers off when the shell exits.
    """
    image = image if image is not None else Image()
    image.require()
    for raw in sockets:
        if not is_socket(Path(raw)):
            raise GuestError(f"no vfio-user server's socket at {raw}: start the server first")
    binds, inside = _socket_binds(sockets)
    argv = qemu_argv(f"{BOOT_IN_ROOT}/vmlinuz", f"{BOOT_IN_ROOT}/initramfs.gz", sockets=inside,
                     append="quiet pcisplit.mode=interactive", memory_mb=memory_mb,
                     serial=["mon:stdio", "null", "null"])
    return subprocess.run(chroot_argv(image.root, argv, [(image.boot, BOOT_IN_ROOT), *binds]),
                          check=False).returncode
