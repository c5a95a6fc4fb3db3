"""Run the atheris fuzz targets: ``python fuzz/run.py --seconds 60 [target ...]``.

``make fuzz`` calls this with ``FUZZ_SECONDS`` (per target). Each target runs
under libFuzzer with its checked-in seed corpus (``fuzz/corpus/<target>``,
read only) and a work corpus in ``.fuzz-work/<target>`` that grows across
runs. A crash writes its input to ``fuzz/regressions/<target>/``, where pytest
replays it from then on (commit it with the fix). Prints executions per target
and writes them to ``.fuzz-work/results.json``; exits 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

from _common import FUZZ_DIR, REPO, TARGETS, corpus_dir, regressions_dir

WORK = REPO / ".fuzz-work"
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def run_target(name: str, seconds: int, extra: list[str]) -> dict[str, object]:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    crashes = regressions_dir(name)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(crashes))
    cmd = [
        sys.executable,
        str(FUZZ_DIR / f"fuzz_{name}.py"),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
        *extra,
        str(work),
        str(corpus_dir(name)),
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, check=False)
    took = time.monotonic() - started
    log = proc.stdout + proc.stderr
    (WORK / f"{name}.log").write_bytes(log)
    match = _DONE.search(log)
    runs = int(match.group(1)) if match else None
    new = sorted(set(os.listdir(crashes)) - before)
    return {
        "target": name,
        "seconds": round(took, 1),
        "executions": runs,
        "exit_code": proc.returncode,
        "crashes": new,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("targets", nargs="*", choices=[*TARGETS, []], help="default: all")
    args, extra = parser.parse_known_args()
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        print(f"fuzz: atheris is not installed ({exc}); run `make install` (extra 'fuzz')")
        return 2
    WORK.mkdir(exist_ok=True)
    results = []
    for name in args.targets or TARGETS:
        result = run_target(name, args.seconds, extra)
        results.append(result)
        seconds = float(str(result["seconds"]))
        rate = int(str(result["executions"] or 0)) / max(seconds, 1e-9)
        crashed = f"  CRASH -> fuzz/regressions/{name}/" if result["crashes"] else ""
        print(
            f"{name:8} {result['executions']!s:>10} executions in {seconds:>6} s "
            f"({rate:,.0f}/s)  exit {result['exit_code']}{crashed}",
            flush=True,
        )
    summary = {
        "machine": (
            f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
        ),
        "results": results,
    }
    (WORK / "results.json").write_text(json.dumps(summary, indent=2))
    return 1 if any(r["crashes"] or r["exit_code"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
