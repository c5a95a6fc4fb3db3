"""Run every benchmark: ``python -m benchmarks [--quick]``."""

from __future__ import annotations

import argparse
import sys

from benchmarks import interrupts, transports


def main() -> int:
    parser = argparse.ArgumentParser(description="pcisplit benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    status = transports.main(quick=args.quick)
    return status or interrupts.main(quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
