"""Transport benchmarks: latency and throughput of config reads through the whole stack.

Every number is measured in one run, against the floor measured in the same
run: a raw trio eventfd ping-pong between two processes, with no protocol.
The backend runs as a real ``pciback serve`` process; this process is the guest.

Measures, per transport (unix, shm, tcp, tls):
- QD1 round trip p50/p99 of a 4-byte config read (frontend API -> backend -> edu model);
- QD1 throughput (at most one request in flight, like Xen's single-slot pcifront);
- QD32 pipelined throughput (32 requests in flight).
"""

from __future__ import annotations

import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

import pcifront
from benchmarks._floor import eventfd_floor
from benchmarks._report import percentile_us, print_ratios, write_results
from shared.transport import TransportOptions, available_schemes

TRANSPORTS = ("unix", "shm", "tcp", "tls")
#: Adaptive-polling budgets (µs, both sides) measured against polling off.
POLL_VARIANTS_US = (20, 100)


@dataclass
class Result:
    transport: str
    qd1_p50_us: float
    qd1_p99_us: float
    qd1_ops_per_s: float
    qd32_ops_per_s: float


#: The guest's token for tcp:// (the backend reads it from guest0.token).
BENCH_TOKEN = "pcisplit-benchmark-token-not-secret"

def _write_tls(tmp: Path) -> ssl.SSLContext:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp / "server.key"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    ca.issue_cert("guest0").configure_cert(ctx)
    return ctx


def _start_backend(
    tmp: Path, transports: list[str], *, poll_us: float = 0.0, tag: str = ""
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    listen = []
    for kind in transports:
        if kind in ("unix", "shm"):
            listen.append(f"{kind}:{tmp / (kind + tag + '.sock')}")
        else:
            listen.append(f"{kind}://127.0.0.1:0")
    config = tmp / f"bench{tag}.toml"
    token = tmp / "guest0.token"
    token.write_text(BENCH_TOKEN)
    token.chmod(0o600)
    config.write_text(
        f"listen = {json.dumps(listen)}\n"
        "[tls]\ncert = 'server.pem'\nkey = 'server.key'\nca = 'ca.pem'\n"
        "[limits]\nmax_in_flight = 256\n"
        f"[transport]\nshm_poll_us = {poll_us}\n"
        "[[guest]]\nname = 'guest0'\nallow_plain_tcp = true\ntoken_file = 'guest0.token'\n"
        "[[device]]\nid = 'edu0'\nmodel = 'edu'\nguest = 'guest0'\n"
    )
    exe = Path(sys.executable).parent / "pciback"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pciback.cli"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--config", str(config)], stdout=subprocess.PIPE, text=True, cwd=tmp
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


async def _measure(address: str, options: TransportOptions, qd1: int, qd32_total: int) -> Result:
    async with pcifront.connect(address, guest="guest0", token=BENCH_TOKEN, options=options) as bus:
        dev = bus.devices[0]
        for _ in range(200):  # warm-up
            await dev.config_read(0, 4)
        samples = []
        clock = time.perf_counter_ns
        start_all = clock()
        for _ in range(qd1):
            start = clock()
            await dev.config_read(0, 4)
            samples.append(clock() - start)
        qd1_elapsed = (clock() - start_all) / 1e9
        per_task = qd32_total // 32

        async def worker() -> None:
            for _ in range(per_task):
                await dev.config_read(0, 4)

        start = clock()
        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(worker)
        qd32_elapsed = (clock() - start) / 1e9
    return Result(
        transport=address.split(":", 1)[0],
        qd1_p50_us=percentile_us(samples, 0.50),
        qd1_p99_us=percentile_us(samples, 0.99),
        qd1_ops_per_s=qd1 / qd1_elapsed,
        qd32_ops_per_s=per_task * 32 / qd32_elapsed,
    )


def _ratio_rows(floor_p50: float, by: dict[str, Result]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    shm, unix = by.get("shm"), by.get("unix")
    if shm is not None:
        rows.append(
            dict(
                measure="shm QD1 p50 / eventfd floor p50",
                value=shm.qd1_p50_us / floor_p50,
                target="<= 1.5",
                met=shm.qd1_p50_us / floor_p50 <= 1.5,
            )
        )
        ratio = shm.qd32_ops_per_s / shm.qd1_ops_per_s
        rows.append(
            dict(
                measure="shm QD32 throughput / shm QD1 throughput",
                value=ratio,
                target=">= 4",
                met=ratio >= 4,
            )
        )
    if shm is not None and unix is not None:
        ratio = unix.qd1_p50_us / shm.qd1_p50_us
        rows.append(
            dict(
                measure="unix QD1 p50 / shm QD1 p50",
                value=ratio,
                target=">= 1.25",
                met=ratio >= 1.25,
            )
        )
    for name, res in sorted(by.items()):
        rows.append(
            dict(
                measure=f"{name} QD1 p50 / eventfd floor p50",
                value=res.qd1_p50_us / floor_p50,
                target="(info)",
                met=None,
            )
        )
    return rows


def main(*, quick: bool = False) -> int:
    qd1 = 1000 if quick else 5000
    qd32_total = 3200 if quick else 32000
    floor = eventfd_floor(2000 if quick else 20000)
    floor_p50, floor_p99 = percentile_us(floor, 0.5), percentile_us(floor, 0.99)
    schemes = set(available_schemes())
    wanted = [t for t in TRANSPORTS if t in schemes]
    missing = [t for t in TRANSPORTS if t not in schemes]
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="pcisplit-bench-") as tmpdir:
        tmp = Path(tmpdir)
        client_ctx = _write_tls(tmp)
        proc, addresses = _start_backend(tmp, wanted)
        try:
            for kind in wanted:
                opts = TransportOptions(ssl_context=client_ctx if kind == "tls" else None)
                results[kind] = trio.run(_measure, addresses[kind], opts, qd1, qd32_total)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if "shm" in wanted:
            # Adaptive polling on both sides, measured against the same floor.
            for poll in POLL_VARIANTS_US:
                proc, addresses = _start_backend(tmp, ["shm"], poll_us=poll, tag=f"-poll{poll}")
                try:
                    opts = TransportOptions(poll_us=poll)
                    res = trio.run(_measure, addresses["shm"], opts, qd1, qd32_total)
                    res.transport = f"shm+poll{poll}"
                    results[res.transport] = res
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    print(
        f"\npcisplit transport benchmark ({platform.node()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()})"
    )
    print(
        f"floor: trio eventfd ping-pong between two processes: p50 {floor_p50:.1f} us, "
        f"p99 {floor_p99:.1f} us\n"
    )
    print(
        f"{'transport':<10}{'QD1 p50 us':>12}{'QD1 p99 us':>12}{'QD1 ops/s':>12}{'QD32 ops/s':>12}"
    )
    for res in results.values():
        print(
            f"{res.transport:<10}{res.qd1_p50_us:>12.1f}{res.qd1_p99_us:>12.1f}"
            f"{res.qd1_ops_per_s:>12.0f}{res.qd32_ops_per_s:>12.0f}"
        )
    if missing:
        print(f"(not measured, transport unavailable: {', '.join(missing)})")
    rows = _ratio_rows(floor_p50, results)
    print_ratios(rows)
    write_results(
        "transports",
        {
            "floor": {
                "p50_us": floor_p50,
                "p99_us": floor_p99,
                "median_us": statistics.median(floor) / 1000,
            },
            "results": [asdict(r) for r in results.values()],
            "ratios": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
