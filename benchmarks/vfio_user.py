"""The vfio-user row: the raw vfio-user client against pcisplit's front door and libvfio-user.

Both servers run as real processes in the same run: ``pciback serve`` serving
edu on a vfio-user socket (``vfio_user = "PATH"``), and libvfio-user's C
sample ``gpio-pci-idio-16`` (``make peers`` builds it; built here on first
use). The client is :class:`pciback.devices.VfioUserClient` (blocking). Per
server: QD1 latency (p50/p99) of a 4-byte config-space REGION_READ, and
pipelined throughput (batches of 32 reads in flight). The summary shows
pcisplit's figures as ratios to the sample's and to the run's trio floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import percentile_us, write_results
from pciback.devices import VfioUserClient
from shared.protocol import vfio_user as vu

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PEERS_CACHE", REPO / ".cache" / "peers"))
SAMPLE = CACHE / "libvfio-user-efd091b" / "build" / "samples" / "gpio-pci-idio-16"
BATCH = 32

SERVED = """
listen = ["unix:{tmp}/pciback.sock"]
[[guest]]
name = "bench"
[[device]]
id = "edu0"
model = "edu"
guest = "bench"
vfio_user = "{tmp}/edu0.sock"
"""


def _listening(path: Path) -> bool:
    """Whether a UNIX socket listens at ``path`` (``/proc/net/unix``; the sample creates the
    file before it listens, and exits if probed with a connection)."""
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False


def _wait_listening(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not _listening(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {path}")
        time.sleep(0.01)


def _sample() -> Path:
    if not SAMPLE.exists():
        subprocess.run([str(REPO / "tools" / "build_peers.sh")], check=True, timeout=900)
    return SAMPLE


def _measure(path: Path, count: int) -> dict[str, float]:
    with VfioUserClient.connect(path, timeout=30.0) as client:
        read = vu.RegionAccess(vu.PCI_CONFIG_REGION, 0, 4)
        for _ in range(200):  # warm up
            client.call(read)
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            client.call(read)
            samples.append(time.perf_counter_ns() - start)
        batches = max(1, count // BATCH)
        start = time.perf_counter_ns()
        for _ in range(batches):
            client.pipeline([read] * BATCH)
        elapsed = (time.perf_counter_ns() - start) / 1e9
    return {
        "qd1_p50_us": percentile_us(samples, 0.5),
        "qd1_p99_us": percentile_us(samples, 0.99),
        "pipelined_ops_per_s": batches * BATCH / elapsed,
    }


def run(*, quick: bool) -> dict[str, Any]:
    """Measure both servers; print and return the figures."""
    count = 2000 if quick else 20000
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pcisplit-bench-vfio-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "backend.toml"
        config.write_text(SERVED.format(tmp=tmp))
        servers = {
            "pcisplit": ([sys.executable, "-m", "pciback.cli", "serve", "--config", str(config)],
                         tmp / "edu0.sock"),
            "libvfio-user": ([str(_sample()), str(tmp / "gpio.sock")], tmp / "gpio.sock"),
        }
        for name, (argv, sock) in servers.items():
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_listening(sock, proc, name)
                results[name] = _measure(sock, count)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print("vfio-user, raw client, 4-byte config read (p50 / p99 us, pipelined ops/s):")
    for name, row in results.items():
        print(f"  {name:14s} {row['qd1_p50_us']:8.1f} / {row['qd1_p99_us']:.1f}   "
              f"{row['pipelined_ops_per_s']:10.0f}")
    write_results("vfio_user", results)
    return results
