"""Run the real backend in its own process for the hostile-guest suite and the fault loop.

``python _backend_proc.py CONFIG.toml`` serves ``CONFIG.toml`` with
:class:`pciback.service.Backend` (the real service, unchanged), prints one JSON
line ``{"addresses": [...]}`` once every address is bound, then answers each
``stats`` line on stdin with one JSON line of the backend's counters (sessions,
requests, protocol errors, interrupt bindings, DMA windows). EOF on stdin stops
it. A separate process is the point: the suite measures this process's RSS and
fds through ``/proc`` and sees it die if an attack kills it.

It also registers ``sec-msix``, an emulated device with a 16-entry MSI-X table,
so the suite can attack MSI-X table indexes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

import trio

from pciback.config import load_config
from pciback.devices import EmulatedDevice
from pciback.plane.registry import MODELS
from pciback.service import Backend
from shared.pci import CapId

MSIX_TABLE = 16


class SecMsixDevice(EmulatedDevice):
    """A device with a 16-entry MSI-X table (table at BAR0 0, PBA at BAR0 0x8000)."""

    def __init__(self) -> None:
        super().__init__(vendor_id=0x1234, device_id=0x5EC0, class_code=0xFF0000, interrupt_pin=1)
        self.add_bar(0, 0x10000)
        body = (MSIX_TABLE - 1).to_bytes(2, "little") + (0).to_bytes(4, "little")
        body += (0x8000).to_bytes(4, "little")
        control_mask = (0xC000).to_bytes(2, "little")  # enable and function mask
        self.add_capability(CapId.MSIX, body, writable_mask=control_mask + bytes(8))


MODELS.setdefault("sec-msix", SecMsixDevice)


def _plain(value: Any) -> Any:
    """JSON-safe: dict keys become strings (some counters are keyed by tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def snapshot(backend: Backend) -> dict[str, Any]:
    """Every counter the suite checks, as plain JSON values."""
    irq = backend.irq
    bindings = {}
    for dev in backend.registry:
        state = irq.device(dev)
        bindings[dev.id] = {
            "guest": state.bound_guest,
            "owner": dev.guest,
            # The device's own Command register, under the policy (XSA-120 checks).
            "device_command": dev.provider.config_read(0x04, 2),
        }
    dma = {}
    for guest in backend.config.guests:
        space = backend.dma.get(guest)
        if space is not None:
            dma[guest] = {
                "windows": len(space.windows),
                **dataclasses.asdict(space.statistics()),
            }
    logs = backend.log_statistics()
    return {
        "backend": {
            k: v for k, v in backend.statistics().as_dict().items() if k != "per_guest_requests"
        },
        # Guest-triggered log events by kind: logged, and suppressed by the rate limit.
        "log": {
            "logged": dict(logs.logged),
            "suppressed": dict(logs.suppressed),
            "summaries": logs.summaries,
        },
        "sessions": [
            {"guest": s.guest, "fds_held": s.held_fds(), **dataclasses.asdict(s.statistics())}
            for s in backend.sessions
        ],
        "irq": {**dataclasses.asdict(irq.statistics()), "bindings": bindings},
        "dma": dma,
    }


async def _commands(backend: Backend) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    async with stdin:
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip() == b"stats":
                    answer = json.dumps(_plain(snapshot(backend))) + "\n"
                else:
                    answer = json.dumps({"error": f"unknown command {line!r}"}) + "\n"
                os.write(1, answer.encode())


async def main(config_path: str) -> None:
    backend = Backend(load_config(config_path))
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(backend.serve)
        os.write(1, (json.dumps({"addresses": addresses}) + "\n").encode())
        await _commands(backend)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    trio.run(main, sys.argv[1])
