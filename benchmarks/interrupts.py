"""Interrupt and DMA benchmarks, against the raw eventfd floor measured in the same run.

The backend is a real ``pciback serve`` child process serving the benchmark
device of :mod:`benchmarks._irq_model`; this process is the guest. Measured:

- interrupt round trip: the *device* raises (MSI, or INTx), the guest's
  handler runs (``irqs.receive()``), writes the device's ack register (and
  for INTx sends the EOI), and the device timestamps the ack's arrival.
  p50/p99 from the device's own clock, per transport and mode;
- sustained rate with coalescing: the device raises a burst of 10,000 MSIs
  as fast as it can; how many interrupts the guest handles for them (the
  counts add up to 10,000) and how long until all arrived;
- DMA throughput of 4 KiB and 1 MiB copies, device-side: over ``shm:`` the
  buffer is a shared memfd (zero copy), over ``tcp:`` every copy is a
  DmaReadCall/DmaWriteCall message exchange with the guest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

import pcifront
from benchmarks._report import Floors, measure_floors, percentile_us, write_results
from benchmarks.transports import POLL_US
from pcifront import blocking
from shared.protocol import Limits

MAX_MESSAGE = (1 << 20) + (64 << 10)  # a 1 MiB DMA chunk fits in one message
BURST = 10_000
REG_LATENCY, REG_ACK, REG_BURST, REG_COUNT, REG_SAMPLES = 0x00, 0x08, 0x10, 0x18, 0x20
REG_DMA_ADDR, REG_DMA_LEN, REG_DMA_ITERS, REG_DMA_RUN, REG_DMA_NS = 0x40, 0x48, 0x50, 0x58, 0x60


@dataclass
class RoundTrip:
    transport: str
    mode: str
    delivery: str
    samples: int
    p50_us: float
    p99_us: float


@dataclass
class Burst:
    transport: str
    raises: int
    interrupts_handled: int
    counted: int
    elapsed_ms: float
    raises_per_s: float


@dataclass
class DmaResult:
    transport: str
    direction: str
    size: int
    iterations: int
    mib_per_s: float
    us_per_copy: float


#: The guest's token for tcp:// (the backend reads it from guest0.token).
BENCH_TOKEN = "pcisplit-benchmark-token-not-secret"


def _start_backend(
    tmp: Path, *, poll_us: float = 0.0, tag: str = ""
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    listen = [
        f"unix:{tmp / f'unix{tag}.sock'}", f"shm:{tmp / f'shm{tag}.sock'}", "tcp://127.0.0.1:0"
    ]
    config = tmp / f"bench-irq{tag}.toml"
    token = tmp / "guest0.token"
    token.write_text(BENCH_TOKEN)
    token.chmod(0o600)
    config.write_text(
        f"listen = {json.dumps(listen)}\n"
        f"[limits]\nmax_message_size = {MAX_MESSAGE}\n"
        # A whole 1 MiB DMA message must fit in what one connection may buffer.
        f"max_buffered_per_connection = {2 * MAX_MESSAGE}\n"
        f"[transport]\nshm_poll_us = {poll_us}\n"
        # Coalescing stays on; the rate limit is raised so the burst measures the path.
        "[interrupts]\nmax_events_per_second = 1000000.0\nburst = 4096\n"
        "[[guest]]\nname = 'guest0'\nallow_plain_tcp = true\ntoken_file = 'guest0.token'\n"
        "[[device]]\nid = 'bench0'\nmodel = 'bench-irq'\nguest = 'guest0'\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._irq_model", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    addresses: dict[str, str] = {}
    for _ in listen:
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"pciback did not start: {line!r}")
        address = line.split("listening on ", 1)[1].strip()
        addresses[address.split(":", 1)[0]] = address
    return proc, addresses


async def _round_trip(
    bus: pcifront.Bus, dev: pcifront.Device, kind: str, mode: str, count: int
) -> RoundTrip:
    async with dev.interrupts(mode=mode) as irqs:
        async with trio.open_nursery() as nursery:

            async def handler(irq: pcifront.Interrupt) -> None:
                await dev.bar_write(0, REG_ACK, 8, 1)

            nursery.start_soon(irqs.serve, handler)
            await dev.bar_write(0, REG_LATENCY, 8, count)
            while await dev.bar_read(0, REG_COUNT, 8) < count:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        samples = [await dev.bar_read(0, REG_SAMPLES + 8 * i, 8) for i in range(count)]
        delivery = irqs.delivery
    warm = samples[min(50, count // 10) :]
    return RoundTrip(
        kind, mode, delivery, len(warm), percentile_us(warm, 0.5), percentile_us(warm, 0.99)
    )


async def _burst(dev: pcifront.Device, kind: str) -> Burst:
    async with dev.interrupts(mode="msi") as irqs:
        start = time.perf_counter()
        await dev.bar_write(0, REG_BURST, 8, BURST)
        counted = handled = 0
        with trio.fail_after(60):
            while counted < BURST:
                irq = await irqs.receive()
                counted += irq.count
                handled += 1
        elapsed = time.perf_counter() - start
    return Burst(kind, BURST, handled, counted, elapsed * 1000, BURST / elapsed)


async def _dma(bus: pcifront.Bus, dev: pcifront.Device, kind: str, quick: bool) -> list[DmaResult]:
    results = []
    async with dev.interrupts(mode="msi") as irqs, await bus.dma_map(1 << 20) as buf:
        for size, iterations in ((4096, 500 if quick else 3000), (1 << 20, 10 if quick else 60)):
            for direction, command in (("device reads guest", 1), ("device writes guest", 2)):
                await dev.bar_write(0, REG_DMA_ADDR, 8, buf.bus_address)
                await dev.bar_write(0, REG_DMA_LEN, 8, size)
                await dev.bar_write(0, REG_DMA_ITERS, 8, iterations)
                await dev.bar_write(0, REG_DMA_RUN, 8, command)
                with trio.fail_after(120):
                    await irqs.receive()
                elapsed = await dev.bar_read(0, REG_DMA_NS, 8) / 1e9
                results.append(
                    DmaResult(
                        kind,
                        direction,
                        size,
                        iterations,
                        size * iterations / elapsed / (1 << 20),
                        elapsed / iterations * 1e6,
                    )
                )
    return results


async def _measure(address: str, kind: str, quick: bool, parts: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"round_trips": [], "bursts": [], "dma": []}
    limits = Limits(max_message_size=MAX_MESSAGE)
    async with pcifront.connect(address, guest="guest0", token=BENCH_TOKEN, limits=limits) as bus:
        dev = bus.devices[0]
        await dev.config_write(0x04, 2, 0x6)  # memory decode + bus master
        count = 500 if quick else 5000
        if "rt" in parts:
            for mode in ("msi", "intx"):
                out["round_trips"].append(await _round_trip(bus, dev, kind, mode, count))
        if "burst" in parts:
            out["bursts"].append(await _burst(dev, kind))
        if "dma" in parts:
            out["dma"].extend(await _dma(bus, dev, kind, quick))
    return out


def _round_trip_blocking(address: str, count: int, poll_us: float, name: str) -> RoundTrip:
    """The same MSI round trip with the blocking client (interrupts travel in band)."""
    limits = Limits(max_message_size=MAX_MESSAGE)
    with blocking.connect(address, guest="guest0", limits=limits, poll_us=poll_us) as bus:
        dev = bus.devices[0]
        dev.config_write(0x04, 2, 0x6)
        with dev.interrupts(mode="msi") as irqs:
            dev.bar_write(0, REG_LATENCY, 8, count)
            for _ in range(count):  # the device raises again only after our ack
                irqs.receive(timeout=30)
                dev.bar_write(0, REG_ACK, 8, 1)
            samples = [dev.bar_read(0, REG_SAMPLES + 8 * i, 8) for i in range(count)]
            delivery = irqs.delivery
    warm = samples[min(50, count // 10) :]
    return RoundTrip(
        name, "msi", delivery, len(warm), percentile_us(warm, 0.5), percentile_us(warm, 0.99)
    )


def run(floors: Floors, *, quick: bool = False) -> dict[str, Any]:
    """Interrupt round trips (trio and blocking), bursts and DMA, for the summary."""
    plan = {"shm": {"rt", "burst", "dma"}, "unix": {"rt", "burst"}, "tcp": {"rt", "burst", "dma"}}
    collected: dict[str, list[Any]] = {"round_trips": [], "bursts": [], "dma": []}
    count = 500 if quick else 5000
    with tempfile.TemporaryDirectory(prefix="pcisplit-irq-bench-") as tmpdir:
        proc, addresses = _start_backend(Path(tmpdir))
        try:
            for kind, parts in plan.items():
                result = trio.run(_measure, addresses[kind], kind, quick, parts)
                for key, values in result.items():
                    collected[key].extend(values)
            collected["round_trips"].append(
                _round_trip_blocking(addresses["shm"], count, 0.0, "shm blocking")
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, addresses = _start_backend(Path(tmpdir), poll_us=POLL_US, tag="-poll")
        try:
            collected["round_trips"].append(
                _round_trip_blocking(addresses["shm"], count, POLL_US, "shm blocking poll")
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    header = f"\n{'interrupt round trip':<26}{'delivery':<10}{'p50 us':>9}{'p99 us':>9}"
    print(f"{header}{'p50/trio floor':>15}")
    for rt in collected["round_trips"]:
        print(
            f"{rt.transport + ' ' + rt.mode:<26}{rt.delivery:<10}{rt.p50_us:>9.1f}"
            f"{rt.p99_us:>9.1f}{rt.p50_us / floors.trio_p50:>15.2f}"
        )
    print(
        f"\n{'burst of ' + str(BURST) + ' MSIs':<24}{'handled':>9}{'counted':>9}{'ms':>9}"
        f"{'raises/s':>11}"
    )
    for b in collected["bursts"]:
        print(
            f"{b.transport:<24}{b.interrupts_handled:>9}{b.counted:>9}{b.elapsed_ms:>9.1f}"
            f"{b.raises_per_s:>11.0f}"
        )
    print(f"\n{'DMA (device side)':<36}{'size':>9}{'MiB/s':>10}{'us/copy':>10}")
    for d in collected["dma"]:
        print(
            f"{d.transport + ' ' + d.direction:<36}{d.size:>9}{d.mib_per_s:>10.1f}"
            f"{d.us_per_copy:>10.1f}"
        )
    dma_ratios = {}
    for size in (4096, 1 << 20):
        shm = [d for d in collected["dma"] if d.transport == "shm" and d.size == size]
        tcp = [d for d in collected["dma"] if d.transport == "tcp" and d.size == size]
        if shm and tcp:
            dma_ratios[size] = min(d.mib_per_s for d in shm) / max(d.mib_per_s for d in tcp)
    return {
        "round_trips": {f"{r.transport} {r.mode}": asdict(r) for r in collected["round_trips"]},
        "bursts": [asdict(b) for b in collected["bursts"]],
        "dma": [asdict(d) for d in collected["dma"]],
        "dma_shm_over_tcp": dma_ratios,
    }


def main(*, quick: bool = False) -> int:
    floors = measure_floors(quick=quick)
    out = run(floors, quick=quick)
    write_results("interrupts", {"floors": asdict(floors), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
