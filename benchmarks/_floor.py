"""The floor: a raw trio eventfd ping-pong between two processes, no protocol at all.

Run as a child process: ``python -m benchmarks._floor CHILD RX_FD TX_FD COUNT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import trio


async def _pong(rx: int, tx: int, count: int) -> None:
    for _ in range(count):
        await trio.lowlevel.wait_readable(rx)
        os.eventfd_read(rx)
        os.eventfd_write(tx, 1)


async def _ping(rx: int, tx: int, count: int) -> list[int]:
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        os.eventfd_write(tx, 1)
        await trio.lowlevel.wait_readable(rx)
        os.eventfd_read(rx)
        samples.append(time.perf_counter_ns() - start)
    return samples


def eventfd_floor(count: int) -> list[int]:
    """Round-trip times (ns) of ``count`` eventfd ping-pongs with a child process."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._floor", "child", str(a), str(b), str(count)],
        pass_fds=(a, b),
    )
    try:
        return trio.run(_ping, b, a, count)
    finally:
        child.wait(timeout=60)
        os.close(a)
        os.close(b)


if __name__ == "__main__" and sys.argv[1] == "child":
    trio.run(_pong, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
