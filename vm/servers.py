"""vfio-user servers for the guest to use: libvfio-user's C sample, and waiting for a socket.

:func:`gpio_sample` starts libvfio-user's ``samples/gpio-pci-idio-16`` (built by
``make peers`` from the pinned source in ``../shared/peers``; a server nobody here wrote) and
returns once it listens. :func:`wait_for_socket` is the event-driven wait for any server's
listening socket (inotify on its directory and a pidfd on the server: no polling).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from vm.errors import VmError

__all__ = ["PEER", "is_socket", "gpio_sample_path", "ensure_gpio_sample", "wait_for_socket",
           "gpio_sample"]

#: The pinned libvfio-user source (``../shared/peers/PEER.tar.gz``) and where ``make peers``
#: builds it.
PEER = "libvfio-user-efd091b"
CHECKOUT = Path(__file__).resolve().parent.parent

_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


def gpio_sample_path() -> Path:
    """Where ``make peers`` puts ``gpio-pci-idio-16`` (``PEERS_CACHE`` moves it)."""
    cache = os.environ.get("PEERS_CACHE")
    base = Path(cache) if cache else CHECKOUT / ".cache" / "peers"
    return base / PEER / "build" / "samples" / "gpio-pci-idio-16"


def ensure_gpio_sample() -> Path:
    """The sample server's path, building it with ``tools/build_peers.sh`` when missing."""
    sample = gpio_sample_path()
    script = CHECKOUT / "tools" / "build_peers.sh"
    if not os.access(sample, os.X_OK) and script.is_file():
        result = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise VmError(f"building libvfio-user's samples failed ({script}):\n"
                          f"{result.stdout}{result.stderr}".rstrip())
    if not os.access(sample, os.X_OK):
        raise VmError(f"libvfio-user's sample server {sample} is missing: build it with "
                      "`make peers` (from ../shared/peers/" + PEER + ".tar.gz)")
    return sample


def is_socket(path: Path) -> bool:
    """Whether ``path`` exists and is a UNIX socket."""
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once ``path`` is a socket; raise :class:`VmError` if ``process`` exits first or
    ``timeout`` seconds pass. Wakes only on the directory's inotify events and the process's
    exit (a pidfd), never on a timer."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    inotify = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if inotify < 0:
        raise VmError(f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}")
    pidfd = os.pidfd_open(process.pid)
    try:
        if libc.inotify_add_watch(inotify, str(path.parent).encode(),
                                  _IN_CREATE | _IN_MOVED_TO) < 0:
            raise VmError(f"cannot watch {path.parent}: {os.strerror(ctypes.get_errno())}")
        deadline = time.monotonic() + timeout
        while not is_socket(path):
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmError(f"no socket at {path} after {timeout:.0f} s (server pid "
                              f"{process.pid} still running)")
            ready, _, _ = select.select([inotify, pidfd], [], [], left)
            if pidfd in ready and not is_socket(path):
                raise VmError(f"the server exited (status {process.wait()}) before "
                              f"listening on {path}")
            if inotify in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(inotify, 65536)
    finally:
        os.close(pidfd)
        os.close(inotify)


@contextlib.contextmanager
def gpio_sample(socket_path: Path, *, timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run libvfio-user's ``gpio-pci-idio-16`` on ``socket_path`` for the ``with`` block.

    Yields once the server listens; kills and reaps it at the end. Its stderr (its log)
    goes to ``socket_path`` + ``.log``.
    """
    sample = ensure_gpio_sample()
    log = Path(f"{socket_path}.log")
    with log.open("wb") as out:
        process = subprocess.Popen([str(sample), "-v", str(socket_path)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for_socket(socket_path, process, timeout)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
