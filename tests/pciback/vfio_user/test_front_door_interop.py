"""pcisplit serving itself through vfio-user: one ``pciback serve`` process serves edu on a
vfio-user socket, and a second backend imports it with ``kind = "vfio-user"`` and serves it
to a pcifront guest (ids, BAR registers, MSI through both backends)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from _vfio_user_peer import _listening

import pcifront
from pciback.devices._edu import (
    EDU_DEVICE_ID,
    EDU_IDENTIFICATION,
    EDU_VENDOR_ID,
    REG_ID,
    REG_IRQ_ACK,
    REG_IRQ_RAISE,
    REG_LIVENESS,
)
from pciback.testing import TEST_TOKEN, running_backend

SERVED = """
listen = ["unix:{tmp}/served.sock"]
[[guest]]
name = "vm1"
[[device]]
id = "edu0"
model = "edu"
guest = "vm1"
vfio_user = "{tmp}/edu0.sock"
"""
IMPORTING = """
[[guest]]
name = "guest0"
[[device]]
id = "imported"
kind = "vfio-user"
socket = "{tmp}/edu0.sock"
guest = "guest0"
"""


async def test_a_backend_imports_another_backends_front_door(tmp_path: Path) -> None:
    config = tmp_path / "served.toml"
    config.write_text(SERVED.format(tmp=tmp_path))
    log = tmp_path / "served.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pciback.cli", "serve", "--config", str(config)],
            stdout=out, stderr=out,
        )
    try:
        deadline = time.monotonic() + 30  # a real process: wait (bounded) until it listens
        while not _listening(tmp_path / "edu0.sock"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pciback serve did not start: {log.read_text(errors='replace')}")
            await trio.sleep(0.01)
        async with (
            running_backend(IMPORTING.format(tmp=tmp_path), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (edu,) = bus.devices
            assert await edu.config_read(0, 4) == EDU_DEVICE_ID << 16 | EDU_VENDOR_ID
            assert await edu.bar_read(0, REG_ID, 4) == EDU_IDENTIFICATION
            await edu.bar_write(0, REG_LIVENESS, 4, 0x1234)
            assert await edu.bar_read(0, REG_LIVENESS, 4) == 0x1234 ^ 0xFFFFFFFF
            async with edu.interrupts(mode="msi") as irqs:
                for _ in range(3):
                    await edu.bar_write(0, REG_IRQ_RAISE, 4, 1)
                    with trio.fail_after(10):
                        irq = await irqs.receive()
                    assert irq.vector == 0
                    await edu.bar_write(0, REG_IRQ_ACK, 4, 1)
        assert proc.poll() is None, log.read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
