"""What every benchmark shares: the floors, percentiles, the ratio table and the JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile_us(samples: list[int], q: float) -> float:
    """The ``q`` quantile of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


@dataclass
class Floors:
    """The three floors of one run (µs): p50 and p99 of each ping-pong."""

    trio_p50: float
    trio_p99: float
    blocking_p50: float
    blocking_p99: float
    ring_p50: float
    ring_p99: float


def measure_floors(*, quick: bool) -> Floors:
    """Measure the trio eventfd, blocking eventfd and busy-poll ring floors, and print them."""
    from benchmarks._floor import blocking_eventfd_floor, eventfd_floor, ring_floor

    count = 2000 if quick else 20000
    trio_ns, blocking_ns, ring_ns = (
        eventfd_floor(count), blocking_eventfd_floor(count), ring_floor(count)
    )
    floors = Floors(
        percentile_us(trio_ns, 0.5), percentile_us(trio_ns, 0.99),
        percentile_us(blocking_ns, 0.5), percentile_us(blocking_ns, 0.99),
        percentile_us(ring_ns, 0.5), percentile_us(ring_ns, 0.99),
    )
    print(
        f"\npcisplit benchmarks ({platform.node()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})"
    )
    print("floors, two processes, no protocol (p50 / p99 us):")
    print(f"  trio eventfd ping-pong      {floors.trio_p50:8.1f} / {floors.trio_p99:.1f}")
    print(f"  blocking eventfd ping-pong  {floors.blocking_p50:8.1f} / {floors.blocking_p99:.1f}")
    print(f"  busy-poll ring ping-pong    {floors.ring_p50:8.1f} / {floors.ring_p99:.1f}")
    return floors


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """The ratio table: measure, value, target and whether it was met (``-``: info only)."""
    print(f"\n{'ratio (same run)':<64}{'value':>8}  {'target':<8} met")
    for row in rows:
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(f"{row['measure']:<64}{row['value']:>8.2f}  {row['target']:<8} {met}")


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (with a UTC timestamp and the machine)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamped = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        **payload,
    }
    path.write_text(json.dumps(stamped, indent=2))
    print(f"\nJSON: {path}")
    return path
