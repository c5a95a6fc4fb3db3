"""``python -m vm build`` (``make vm-image``) and ``python -m vm shell`` (``make vm``)."""

from __future__ import annotations

import argparse
import sys

from vm.errors import VmError


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m vm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build or refresh the image under .vm/")
    build.add_argument("--force", action="store_true", help="rebuild even when current")
    commands.add_parser("status", help="show what .vm/ holds")
    shell = commands.add_parser("shell", help="boot the guest with a shell on this terminal")
    shell.add_argument("--socket", action="append", default=[], metavar="PATH",
                       help="a vfio-user server's socket: one vfio-user-pci device (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from vm import image

            image.build(force=args.force)
        elif args.command == "status":
            from vm import image

            built = image.Image()
            for part in (built.root, built.boot):
                print(f"{part}: {built.stamp(part) or 'missing'}")
        elif args.command == "shell":
            from vm import guest

            return guest.shell(args.socket)
    except VmError as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
