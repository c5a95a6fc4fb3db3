#!/usr/bin/env python3
"""`make demo`: start pciback on the embedded default, list the bus, drive the edu device.

1. starts `pciback serve` (one edu device for guest0 on unix:./pciback.sock);
2. runs `pcifront lspci -nn` against it;
3. runs examples/edu_driver.py (identification, liveness, factorial(10) = 3628800);
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


def tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"{name}.cli"]


def main() -> int:
    print("$ pciback serve", flush=True)
    backend = subprocess.Popen(
        [*tool("pciback"), "serve"], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert backend.stdout is not None
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
        print(f"\n$ python examples/edu_driver.py --connect {ADDRESS}", flush=True)
        subprocess.run(
            [sys.executable, str(HERE / "edu_driver.py"), "--connect", ADDRESS], check=True
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
