"""The real vfio-user peer: libvfio-user's ``gpio-pci-idio-16`` sample, built and started.

The sample is built once (``tools/build_peers.sh``, what ``make peers`` runs)
from the pinned source beside the checkout. If it cannot be built the tests
that need it *fail* and say why: skipping would hide the one thing they test.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("PEERS_CACHE", REPO / ".cache" / "peers"))
SAMPLE = CACHE / "libvfio-user-efd091b" / "build" / "samples" / "gpio-pci-idio-16"

#: What the sample's source defines (samples/gpio-pci-idio-16.c).
GPIO_VENDOR = 0x494F
GPIO_DEVICE = 0x0DC8
GPIO_BAR = 2
GPIO_BAR_SIZE = 0x100


@functools.cache
def gpio_sample() -> Path:
    """The built sample; builds it on first use (about 30 s), or fails the test saying why."""
    if not SAMPLE.exists():
        proc = subprocess.run(
            [str(REPO / "tools" / "build_peers.sh")], capture_output=True, text=True,
            timeout=900, check=False,
        )
        if proc.returncode != 0 or not SAMPLE.exists():
            pytest.fail(
                "the vfio-user peer (libvfio-user's gpio-pci-idio-16 sample) could not be built "
                f"by tools/build_peers.sh (`make peers`):\n{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
    return SAMPLE


def _listening(path: Path) -> bool:
    """Whether a UNIX socket is bound at ``path`` and listening (``/proc/net/unix``)."""
    target = str(path)
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000: listening.
            if len(fields) >= 8 and fields[7] == target and int(fields[3], 16) & 0x10000:
                return True
    return False


@dataclass
class GpioServer:
    """A running sample: its socket and process."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def gpio_server(tmp: Path, name: str = "gpio.sock") -> Iterator[GpioServer]:
    """Run the sample on ``tmp/name`` until the block ends (its log is removed then)."""
    sample = gpio_sample()
    sock = tmp / name
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(sample), str(sock)], stdout=out, stderr=out)
    try:
        # A real process: wait (bounded) until its socket listens. Probing with a
        # connection is no option: the sample exits when a client leaves before
        # its handshake.
        deadline = time.monotonic() + 10
        while not _listening(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the gpio sample did not start: {log.read_text(errors='replace')}")
            time.sleep(0.005)
        yield GpioServer(sock, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log.unlink(missing_ok=True)
