"""A guest that cannot boot, or does not finish, fails with a typed error that says why, and
QEMU is always killed and reaped (no child process of the test is left behind)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vm.errors import GuestError, GuestTimeout
from vm.guest import run_script

pytestmark = pytest.mark.slow


def _children() -> list[int]:
    """The pids of this process's children (zombies included)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            found.append(int(entry.name))
    return found


async def test_a_guest_past_its_time_is_killed_and_reaped() -> None:
    before = _children()
    with pytest.raises(GuestTimeout, match=r"still running after 2 s; QEMU was killed"):
        await run_script("sleep 1000", timeout=2)
    assert _children() == before


async def test_a_missing_server_is_named_before_qemu_starts(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match=r"no vfio-user server's socket at .*absent\.sock"):
        await run_script("true", sockets=[tmp_path / "absent.sock"])


async def test_qemu_failing_to_connect_is_reported_with_its_message(tmp_path: Path) -> None:
    # A socket that is bound but not listening: QEMU's connect is refused and QEMU exits.
    path = tmp_path / "deaf.sock"
    with socket.socket(socket.AF_UNIX) as deaf:
        deaf.bind(str(path))
        before = _children()
        with pytest.raises(GuestError, match=r"(?s)without reporting its script's exit "
                                             r"status \(QEMU: exit status 1\).*QEMU said.*"
                                             r"vfio-user"):
            await run_script("true", sockets=[path], timeout=120)
        assert _children() == before
