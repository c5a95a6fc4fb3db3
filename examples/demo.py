#!/usr/bin/env python3
"""`make demo`: start pciback on the embedded default, list the bus, drive the edu device.

1. starts `pciback serve` (one edu device for guest0 from the embedded default
   config, listening on unix:./pciback.sock and shm:./pciback-shm.sock);
2. runs `pcifront lspci -nn` against it, then mounts guest0's bus with
   `pcifront mount` and shows the real `lspci -vvv` through the mount (with the
   Region lines of the addresses firmware-like assignment gave the BARs);
3. runs examples/edu_driver.py over unix: and then over shm: (identification,
   liveness, factorial(10) = 3628800 polled and interrupt-driven, and a DMA round
   trip of 100 bytes through the edu buffer, each transfer ending in an interrupt);
4. stops the backend with SIGTERM and checks that it shut down cleanly.

The sockets live in a scratch directory. Where FUSE cannot be used (no
/dev/fuse, no permission on it, no pyfuse3 or fusermount3) step 2's mount is
skipped with one line saying why, and the rest runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ADDRESS = "unix:./pciback.sock"
SHM_ADDRESS = "shm:./pciback-shm.sock"


def tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"{name}.cli"]


#: The FUSE device the mount step needs (PCISPLIT_DEMO_FUSE_DEVICE names another,
#: e.g. a missing one, to see the demo without its mount step).
FUSE_DEVICE = os.environ.get("PCISPLIT_DEMO_FUSE_DEVICE", "/dev/fuse")


def fuse_problem(device: str = FUSE_DEVICE) -> str | None:
    """Why this process cannot mount a FUSE file system here, or None if it can."""
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (make install installs it)"
    if not os.path.exists(device):
        return f"{device} is absent (load the fuse module, or run where FUSE is available)"
    if not os.access(device, os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat(device).st_mode)
        return (
            f"{device} (mode {mode:04o}) is not readable and writable by uid {os.geteuid()}; "
            "run as root or as a user allowed to use FUSE"
        )
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (the fuse3 package)"
    return None


def show_mounted_bus() -> None:
    """Mount guest0's bus as a sysfs-shaped tree and run the real lspci -vvv on it."""
    lspci = shutil.which("lspci")
    why = "pciutils is not installed" if lspci is None else fuse_problem()
    if lspci is None or why is not None:
        print(f"\n(skipping the sysfs mount: {why})", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="pcisplit-demo-") as tmp:
        mnt = os.path.join(tmp, "guest0")
        os.mkdir(mnt)
        print(f"\n$ pcifront mount {mnt} --connect {ADDRESS} --guest guest0 &", flush=True)
        with open(os.path.join(tmp, "mount.err"), "w+") as errors:
            mount = subprocess.Popen(
                [*tool("pcifront"), "mount", mnt, "--connect", ADDRESS, "--guest", "guest0"],
                stdout=subprocess.PIPE, stderr=errors, text=True,
            )
            assert mount.stdout is not None
            first = mount.stdout.readline()
            if not first.startswith("mounted "):
                # The mount failed after all (FUSE refused us): say why, skip this step.
                mount.wait(timeout=30)
                errors.seek(0)
                why = errors.read().strip() or f"pcifront mount exited with {mount.returncode}"
                print(f"(skipping the sysfs mount: {why})", flush=True)
                return
            print(first, end="", flush=True)
            try:
                print(f"$ lspci -A linux-sysfs -O sysfs.path={mnt} -vvv", flush=True)
                listing = subprocess.run(
                    [lspci, "-A", "linux-sysfs", "-O", f"sysfs.path={mnt}", "-vvv"],
                    capture_output=True, text=True, check=True,
                )
                print(listing.stdout, end="", flush=True)
                if "Region 0:" not in listing.stdout:
                    raise subprocess.CalledProcessError(1, "lspci", "no Region line")
            finally:
                print("$ kill %1", flush=True)
                mount.send_signal(signal.SIGTERM)
                mount.wait(timeout=30)
                if os.path.ismount(mnt):
                    subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def main() -> int:
    print(f"$ pciback serve --listen {ADDRESS} --listen {SHM_ADDRESS}", flush=True)
    backend = subprocess.Popen(
        [*tool("pciback"), "serve", "--listen", ADDRESS, "--listen", SHM_ADDRESS],
        stdout=subprocess.PIPE, text=True, bufsize=1,
    )
    try:
        assert backend.stdout is not None
        for _ in range(2):  # one line per listen address
            line = backend.stdout.readline()
            print(line, end="", flush=True)
            if "listening on" not in line:
                print("pciback did not start", file=sys.stderr)
                return 1
        print(f"\n$ pcifront lspci --connect {ADDRESS} --guest guest0 -nn", flush=True)
        subprocess.run(
            [*tool("pcifront"), "lspci", "--connect", ADDRESS, "--guest", "guest0", "-nn"],
            check=True,
        )
        show_mounted_bus()
        for address in (ADDRESS, SHM_ADDRESS):
            print(f"\n$ python examples/edu_driver.py --connect {address}", flush=True)
            subprocess.run(
                [sys.executable, str(HERE / "edu_driver.py"), "--connect", address], check=True
            )
    except subprocess.CalledProcessError as exc:
        print(f"demo step failed: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.send_signal(signal.SIGTERM)
        out, _ = backend.communicate(timeout=20)
        print("\n" + out, end="", flush=True)
    if backend.returncode != 0:
        print(f"pciback exited with {backend.returncode}", file=sys.stderr)
        return 1
    print("demo finished: backend stopped cleanly")
    return 0


if __name__ == "__main__":
    # The sockets live in a scratch directory: nothing is left in the checkout, and a
    # user who may not write to it can still run the demo.
    with tempfile.TemporaryDirectory(prefix="pcisplit-demo-") as work:
        os.chdir(work)
        status = main()
        os.chdir("/")
    sys.exit(status)
