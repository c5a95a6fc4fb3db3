"""What every benchmark shares: percentiles, the ratio table and the JSON results file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile_us(samples: list[int], q: float) -> float:
    """The ``q`` quantile of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """The ratio table: measure, value, target and whether it was met (``-``: info only)."""
    print(f"\n{'ratio (same run)':<46}{'value':>8}  {'target':<8} met")
    for row in rows:
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(f"{row['measure']:<46}{row['value']:>8.2f}  {row['target']:<8} {met}")


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (with a UTC timestamp) and say where."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamped = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    path.write_text(json.dumps(stamped, indent=2))
    print(f"\nJSON: {path}")
    return path
