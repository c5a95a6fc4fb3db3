"""Run every benchmark in one run: ``python -m benchmarks [--quick]`` (``make bench [QUICK=1]``).

The floors are measured once, first; every figure of the summary is a ratio
to a floor (or to another figure) from this same run. Results go to
``benchmarks/results/summary.json`` (plus one JSON per part).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from benchmarks import guests, interrupts, passes, transports, vfio_user
from benchmarks._report import Floors, measure_floors, print_ratios, write_results


def _row(measure: str, value: float, target: str, ok: bool | None) -> dict[str, Any]:
    return {"measure": measure, "value": value, "target": target, "met": ok}


def summary(
    floors: Floors,
    tr: dict[str, Any],
    irq: dict[str, Any],
    gs: dict[str, Any],
    ps: dict[str, Any],
    vf: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The issue's target table, each row a ratio from this run."""
    res = tr["results"]
    trio_rt_s = floors.trio_p50 / 1e6
    rows = []
    if "shm" in res:
        shm = res["shm"]
        value = shm["qd1_p50_us"] / floors.trio_p50
        rows.append(_row("shm QD1 p50, trio client, no polling / trio floor", value, "<= 1.5",
                         value <= 1.5))
        value = shm["qd32_ops_per_s"] * trio_rt_s
        rows.append(_row("shm QD32 throughput, requests per trio-floor round trip", value,
                         ">= 6", value >= 6))
    if "shm blocking poll" in res:
        value = res["shm blocking poll"]["qd1_p50_us"] / floors.trio_p50
        rows.append(_row("shm QD1 p50, blocking client, polling on / trio floor", value,
                         "<= 0.75", value <= 0.75))
    msi = irq["round_trips"].get("shm msi")
    if msi is not None:
        value = msi["p50_us"] / floors.trio_p50
        rows.append(_row("MSI round trip over shm, trio / trio floor", value, "<= 1.25",
                         value <= 1.25))
    thr = gs["throughput"]
    many = max(thr)
    value = thr[many] / thr[1]
    rows.append(_row(f"{many} guests aggregate throughput / 1 guest", value, ">= 0.8",
                     value >= 0.8))
    quiet = gs["quiet"]
    value = quiet["loaded"]["p99_us"] / quiet["alone"]["p99_us"]
    rows.append(_row(f"quiet guest p99 with {many} busy guests / alone", value, "<= 2",
                     value <= 2))
    # Information: the other variants against the floor that matches them.
    for name in ("shm blocking", "shm poll", "unix", "tcp", "tls", "unix blocking"):
        if name in res:
            rows.append(_row(f"{name} QD1 p50 / trio floor",
                             res[name]["qd1_p50_us"] / floors.trio_p50, "(info)", None))
    if "shm blocking poll" in res:
        rows.append(_row("shm QD1 p50, blocking client, polling on / busy-poll ring floor",
                         res["shm blocking poll"]["qd1_p50_us"] / floors.ring_p50, "(info)",
                         None))
    if "shm blocking" in res:
        rows.append(_row("shm QD1 p50, blocking client, no polling / blocking eventfd floor",
                         res["shm blocking"]["qd1_p50_us"] / floors.blocking_p50, "(info)",
                         None))
    for name in ("shm blocking msi", "shm blocking poll msi", "unix msi", "tcp msi"):
        rt = irq["round_trips"].get(name)
        if rt is not None:
            rows.append(_row(f"MSI round trip {name.removesuffix(' msi')} / trio floor",
                             rt["p50_us"] / floors.trio_p50, "(info)", None))
    if "shm" in res and "unix" in res:
        rows.append(_row("shm QD32 / unix QD32 throughput",
                         res["shm"]["qd32_ops_per_s"] / res["unix"]["qd32_ops_per_s"],
                         "(info)", None))
    if 8 in thr:
        rows.append(_row("8 guests aggregate throughput / 1 guest", thr[8] / thr[1], "(info)",
                         None))
    if vf and "pcisplit" in vf and "libvfio-user" in vf:
        ours, theirs = vf["pcisplit"], vf["libvfio-user"]
        rows.append(_row("vfio-user QD1 p50 config read, pcisplit front door / libvfio-user "
                         "sample", ours["qd1_p50_us"] / theirs["qd1_p50_us"], "(info)", None))
        rows.append(_row("vfio-user pipelined throughput, pcisplit front door / libvfio-user "
                         "sample", ours["pipelined_ops_per_s"] / theirs["pipelined_ops_per_s"],
                         "(info)", None))
        rows.append(_row("vfio-user QD1 p50 config read, pcisplit front door / trio floor",
                         ours["qd1_p50_us"] / floors.trio_p50, "(info)", None))
    for kind, row in ps.items():
        rows.append(_row(f"run-loop passes per QD1 read over {kind}, both ends, one process",
                         row["passes"], "(info)", None))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="pcisplit benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    floors = measure_floors(quick=args.quick)
    tr = transports.run(floors, quick=args.quick)
    irq = interrupts.run(floors, quick=args.quick)
    gs = guests.run(floors, quick=args.quick)
    ps = passes.run(quick=args.quick)
    vf = vfio_user.run(quick=args.quick)
    rows = summary(floors, tr, irq, gs, ps, vf)
    print_ratios(rows)
    write_results(
        "summary",
        {"quick": args.quick, "floors": asdict(floors), "transports": tr, "interrupts": irq,
         "guests": gs, "passes": ps, "vfio_user": vf, "ratios": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
