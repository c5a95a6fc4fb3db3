"""Many guests on one backend: aggregate throughput, and what a quiet guest sees meanwhile.

One ``pciback serve`` process serves ``MAX_GUESTS`` guests, each with its own edu
device, plus one more guest, ``quiet``. This process runs 1, 8 or 64 guests at
once, each on its own ``shm:`` connection, each pipelining ``DEPTH`` config
reads; the aggregate throughput is reported as a ratio to the single guest's.
Meanwhile the quiet guest, in its own process (``python -m benchmarks.guests
quiet ADDRESS COUNT``), does one config read every millisecond; its p99 under
load is compared with its p99 alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import pcifront
from benchmarks._report import Floors, measure_floors, percentile_us, write_results

GUEST_COUNTS = (1, 8, 64)
MAX_GUESTS = max(GUEST_COUNTS)
#: Config reads in flight per guest.
DEPTH = 8
#: The quiet guest's pause between reads (s).
QUIET_GAP = 0.001


def _start_backend(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    names = [f"g{i}" for i in range(MAX_GUESTS)] + ["quiet"]
    socket_path = tmp / "guests.sock"
    lines = [f"listen = {json.dumps([f'shm:{socket_path}'])}", "[limits]", "max_in_flight = 256"]
    for name in names:
        lines += ["[[guest]]", f"name = '{name}'"]
    for name in names:
        lines += ["[[device]]", f"id = 'edu-{name}'", "model = 'edu'", f"guest = '{name}'"]
    config = tmp / "guests.toml"
    config.write_text("\n".join(lines) + "\n")
    exe = Path(sys.executable).parent / "pciback"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pciback.cli"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--config", str(config)], stdout=subprocess.PIPE, text=True, cwd=tmp
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"pciback did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


async def _load(address: str, guests: int, seconds: float) -> float:
    """``guests`` connections pipelining DEPTH reads each for ``seconds``; returns ops/s."""
    done = 0
    async with trio.open_nursery() as nursery:
        buses: list[pcifront.Bus] = []
        ready = trio.Event()

        async def guest(i: int) -> None:
            nonlocal done
            async with pcifront.connect(address, guest=f"g{i}") as bus:
                buses.append(bus)
                if len(buses) == guests:
                    ready.set()
                await ready.wait()
                dev = bus.devices[0]
                deadline = trio.current_time() + seconds

                async def worker() -> None:
                    nonlocal done
                    while trio.current_time() < deadline:
                        await dev.config_read(0, 4)
                        done += 1

                async with trio.open_nursery() as inner:
                    for _ in range(DEPTH):
                        inner.start_soon(worker)

        for i in range(guests):
            nursery.start_soon(guest, i)
        await ready.wait()
        start, before = time.perf_counter(), done
    return (done - before) / (time.perf_counter() - start)


async def _quiet(address: str, count: int) -> list[int]:
    async with pcifront.connect(address, guest="quiet") as bus:
        dev = bus.devices[0]
        samples = []
        for i in range(count + 50):
            start = time.perf_counter_ns()
            await dev.config_read(0, 4)
            if i >= 50:
                samples.append(time.perf_counter_ns() - start)
            await trio.sleep(QUIET_GAP)
    return samples


def _quiet_process(address: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.guests", "quiet", address, str(count)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )


def _quiet_result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=300)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def run(floors: Floors, *, quick: bool = False) -> dict[str, Any]:
    """Aggregate throughput by guest count and the quiet guest's p99, for the summary."""
    seconds = 1.5 if quick else 5.0
    quiet_count = 300 if quick else 2000
    out: dict[str, Any] = {"depth": DEPTH, "throughput": {}, "quiet": {}}
    with tempfile.TemporaryDirectory(prefix="pcisplit-guests-") as tmpdir:
        proc, address = _start_backend(Path(tmpdir))
        try:
            out["quiet"]["alone"] = _quiet_result(_quiet_process(address, quiet_count))
            for guests in GUEST_COUNTS:
                out["throughput"][guests] = trio.run(_load, address, guests, seconds)
            quiet = _quiet_process(address, quiet_count)
            # The load runs until the quiet guest is done (its pace is fixed by QUIET_GAP).
            loaded = trio.run(
                _load, address, MAX_GUESTS, quiet_count * (QUIET_GAP + 0.0002) + 3.0
            )
            out["quiet"]["loaded"] = _quiet_result(quiet)
            out["quiet"]["load_ops_per_s"] = loaded
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    single = out["throughput"][1]
    print(f"\n{'guests on one backend (shm, QD' + str(DEPTH) + ' each)':<40}{'ops/s':>10}"
          f"{'/ 1 guest':>11}")
    for guests, ops in out["throughput"].items():
        print(f"{guests:<40}{ops:>10.0f}{ops / single:>11.2f}")
    alone, loaded_q = out["quiet"]["alone"], out["quiet"]["loaded"]
    print(
        f"quiet guest (1 read/ms, own process): p50/p99 alone {alone['p50_us']:.1f}/"
        f"{alone['p99_us']:.1f} us, with {MAX_GUESTS} busy guests {loaded_q['p50_us']:.1f}/"
        f"{loaded_q['p99_us']:.1f} us"
    )
    return out


def main(*, quick: bool = False) -> int:
    floors = measure_floors(quick=quick)
    write_results("guests", {"floors": floors.__dict__, **run(floors, quick=quick)})
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "quiet":
        got = trio.run(_quiet, sys.argv[2], int(sys.argv[3]))
        print(json.dumps({"p50_us": percentile_us(got, 0.5), "p99_us": percentile_us(got, 0.99)}))
    else:
        sys.exit(main(quick="--quick" in sys.argv))
