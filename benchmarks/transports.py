"""Transport benchmarks: latency and throughput of config reads through the whole stack.

Every number is divided by floors measured in the same run (``_floor``). The
backend runs as a real ``pciback serve`` process; this process is the guest.

Measures, per transport (unix, shm, tcp, tls), with the trio client:
- QD1 round trip p50/p99 of a 4-byte config read (frontend API -> backend -> edu model);
- QD1 throughput (at most one request in flight, like Xen's single-slot pcifront);
- QD32 pipelined throughput (32 requests in flight);
and with the blocking client (``pcifront.blocking``) QD1 on every transport;
and over ``shm:`` both clients again with polling on both sides.
"""

from __future__ import annotations

import json
import ssl
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
from pcifront import blocking
from shared.transport import TransportOptions, available_schemes

TRANSPORTS = ("unix", "shm", "tcp", "tls")
#: Polling budget (µs, both sides) of the "poll" variants, measured against polling off.
POLL_US = 50.0


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


def _measure_blocking(address: str, options: TransportOptions, poll_us: float, qd1: int) -> Result:
    """QD1 of the blocking client (no pipelining: it has one caller at a time)."""
    with blocking.connect(
        address, guest="guest0", options=options, poll_us=poll_us, token=BENCH_TOKEN
    ) as bus:
        dev = bus.devices[0]
        for _ in range(200):  # warm-up
            dev.config_read(0, 4)
        samples = []
        clock = time.perf_counter_ns
        start_all = clock()
        for _ in range(qd1):
            start = clock()
            dev.config_read(0, 4)
            samples.append(clock() - start)
        elapsed = (clock() - start_all) / 1e9
    return Result(
        transport=address.split(":", 1)[0],
        qd1_p50_us=percentile_us(samples, 0.50),
        qd1_p99_us=percentile_us(samples, 0.99),
        qd1_ops_per_s=qd1 / elapsed,
        qd32_ops_per_s=0.0,
    )


def run(floors: Floors, *, quick: bool = False) -> dict[str, Any]:
    """Every transport figure, as a dict (``results`` by variant name) for the summary."""
    qd1 = 1000 if quick else 5000
    qd32_total = 3200 if quick else 32000
    schemes = set(available_schemes())
    wanted = [t for t in TRANSPORTS if t in schemes]
    missing = [t for t in TRANSPORTS if t not in schemes]
    results: dict[str, Result] = {}

    def keep(name: str, res: Result) -> None:
        res.transport = name
        results[name] = res

    with tempfile.TemporaryDirectory(prefix="pcisplit-bench-") as tmpdir:
        tmp = Path(tmpdir)
        client_ctx = _write_tls(tmp)
        proc, addresses = _start_backend(tmp, wanted)
        try:
            for kind in wanted:
                opts = TransportOptions(ssl_context=client_ctx if kind == "tls" else None)
                keep(kind, trio.run(_measure, addresses[kind], opts, qd1, qd32_total))
            for kind in wanted:
                opts = TransportOptions(ssl_context=client_ctx if kind == "tls" else None)
                keep(f"{kind} blocking", _measure_blocking(addresses[kind], opts, 0.0, qd1))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if "shm" in wanted:
            # Polling on both sides (the backend's [transport] shm_poll_us, the client's
            # poll_us=), measured against the same floors.
            proc, addresses = _start_backend(tmp, ["shm"], poll_us=POLL_US, tag="-poll")
            try:
                address = addresses["shm"]
                opts = TransportOptions(poll_us=POLL_US)
                keep("shm poll", trio.run(_measure, address, opts, qd1, qd32_total))
                keep(
                    "shm blocking poll",
                    _measure_blocking(address, TransportOptions(), POLL_US, qd1),
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\n{'transport (4-byte config reads)':<22}{'QD1 p50 us':>11}{'QD1 p99 us':>11}"
          f"{'QD1 ops/s':>11}{'QD32 ops/s':>11}{'p50/trio floor':>15}")
    for res in results.values():
        qd32 = f"{res.qd32_ops_per_s:>11.0f}" if res.qd32_ops_per_s else f"{'-':>11}"
        print(
            f"{res.transport:<22}{res.qd1_p50_us:>11.1f}{res.qd1_p99_us:>11.1f}"
            f"{res.qd1_ops_per_s:>11.0f}{qd32}{res.qd1_p50_us / floors.trio_p50:>15.2f}"
        )
    if missing:
        print(f"(not measured, transport unavailable: {', '.join(missing)})")
    print(f"(polling variants: {POLL_US:g} us budget on both sides)")
    return {"poll_us": POLL_US, "results": {name: asdict(r) for name, r in results.items()}}


def main(*, quick: bool = False) -> int:
    floors = measure_floors(quick=quick)
    out = run(floors, quick=quick)
    write_results("transports", {"floors": asdict(floors), **out})
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
