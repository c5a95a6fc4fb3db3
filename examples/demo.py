#!/usr/bin/env python3
"""`make demo`: start pciback on the embedded default, list the bus, drive the edu device.

1. starts `pciback serve` (one edu device for guest0 on unix:./pciback.sock from
   the embedded default config, plus `--listen shm:./pciback-shm.sock`);
2. runs `pcifront lspci -nn` against it;
3. runs examples/edu_driver.py over unix: and then over shm: (identification,
   liveness, factorial(10) = 3628800 polled and interrupt-driven, and a DMA round
   trip of 100 bytes through the edu buffer, each transfer ending in an interrupt);
4. stops the backend with SIGTERM and checks that it shut down cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ADDRESS = "unix:./pciback.sock"
SHM_ADDRESS = "shm:./pciback-shm.sock"


def tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"{name}.cli"]


def main() -> int:
    print(f"$ pciback serve --listen {SHM_ADDRESS}", flush=True)
    backend = subprocess.Popen(
        [*tool("pciback"), "serve", "--listen", SHM_ADDRESS],
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
    os.chdir(HERE.parent)
    sys.exit(main())
