"""Scheduler work per request: run-loop passes and task steps per QD1 config read.

Also, 32 deep, the run-loop passes per read and the backend's task steps per
read: answering a burst costs the backend one step, not one per request.

Both ends run in this one process (the backend in-process through
``pciback.testing``), and a trio instrument counts every pass through the run
loop (``before_io_wait``) and every task step, on both sides together. Unlike
the timings these counts do not depend on the machine's load: they show the
structure of the hot path (issue 11, section 1).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trio

import pcifront
from pciback.testing import running_backend

CONFIG = '[[guest]]\nname = "guest0"\n[[device]]\nid = "edu0"\nmodel = "edu"\nguest = "guest0"\n'
KINDS = ("memory", "unix", "shm")


class _Count(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.backend_steps = 0
        self.passes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        code = getattr(task.coro, "cr_code", None)
        if code is not None and "pciback" in code.co_filename:
            self.backend_steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


async def _count(kind: str, tmp: Path, reads: int) -> dict[str, float]:
    async with running_backend(CONFIG, transports=(kind,), tmp=tmp) as rb:
        async with pcifront.connect(rb.address(kind), guest="guest0") as bus:
            dev = bus.devices[0]
            for _ in range(100):
                await dev.config_read(0, 4)
            count = _Count()
            trio.lowlevel.add_instrument(count)
            try:
                for _ in range(reads):
                    await dev.config_read(0, 4)
            finally:
                trio.lowlevel.remove_instrument(count)
            # 32 deep: the backend should answer each burst in one task step (issue 11,
            # section 1: no scheduler pass per request in a burst).
            per_task = reads // 32

            async def worker() -> None:
                for _ in range(per_task):
                    await dev.config_read(0, 4)

            deep = _Count()
            trio.lowlevel.add_instrument(deep)
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(32):
                        nursery.start_soon(worker)
            finally:
                trio.lowlevel.remove_instrument(deep)
    done = per_task * 32
    return {
        "passes": count.passes / reads,
        "task_steps": count.steps / reads,
        "qd32_passes": deep.passes / done,
        "qd32_backend_steps": deep.backend_steps / done,
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    reads = 500 if quick else 3000
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pcisplit-passes-") as tmpdir:
        for kind in KINDS:
            out[kind] = trio.run(_count, kind, Path(tmpdir), reads)
    print(f"\n{'scheduler work per read (both ends)':<36}{'QD1 passes':>11}{'QD1 steps':>10}"
          f"{'QD32 passes':>12}{'QD32 backend steps':>20}")
    for kind, row in out.items():
        print(f"{kind:<36}{row['passes']:>11.2f}{row['task_steps']:>10.2f}"
              f"{row['qd32_passes']:>12.2f}{row['qd32_backend_steps']:>20.2f}")
    return out
