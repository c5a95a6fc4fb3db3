#!/usr/bin/env python3
"""A tiny guest "driver" for QEMU's edu device, run through pcifront.

It finds the edu device (1234:11e8) on the guest's virtual bus, checks the
identification and liveness registers, and computes factorial(10) in the
device through BAR0.

    python examples/edu_driver.py --connect unix:./pciback.sock --guest guest0
"""

from __future__ import annotations

import argparse
import sys

import trio

import pcifront

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
REG_ID, REG_LIVENESS, REG_FACTORIAL, REG_STATUS = 0x00, 0x04, 0x08, 0x20
STATUS_COMPUTING = 0x01


async def drive(address: str, guest: str, n: int) -> int:
    async with pcifront.connect(address, guest=guest) as bus:
        edu = next(
            (d for d in bus.devices if (d.vendor_id, d.device_id) == (EDU_VENDOR, EDU_DEVICE)),
            None,
        )
        if edu is None:
            raise SystemExit(f"no edu device (1234:11e8) on guest {guest}'s bus: {bus.devices}")
        print(f"edu device at {edu.address}")

        ident = await edu.bar_read(0, REG_ID, 4)
        major, minor = ident >> 24, (ident >> 16) & 0xFF
        if ident & 0xFF != 0xED:
            raise SystemExit(f"identification register reads {ident:#010x}, not an edu device")
        print(f"identification {ident:#010x} (version {major}.{minor})")

        probe = 0x12345678
        await edu.bar_write(0, REG_LIVENESS, 4, probe)
        alive = await edu.bar_read(0, REG_LIVENESS, 4)
        if alive != (~probe & 0xFFFFFFFF):
            raise SystemExit(f"liveness check failed: wrote {probe:#x}, read {alive:#x}")
        print(f"liveness: wrote {probe:#010x}, read back {alive:#010x} (inverted)")

        await edu.bar_write(0, REG_FACTORIAL, 4, n)
        polls = 0
        while await edu.bar_read(0, REG_STATUS, 4) & STATUS_COMPUTING:
            polls += 1
            await trio.sleep(0.001)
        result = await edu.bar_read(0, REG_FACTORIAL, 4)
        print(f"factorial({n}) = {result} (status polled {polls} times while computing)")
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", default="unix:./pciback.sock")
    parser.add_argument("--guest", default="guest0")
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    result = trio.run(drive, args.connect, args.guest, args.n)
    if args.n == 10 and result != 3628800:
        print(f"expected 3628800, got {result}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
