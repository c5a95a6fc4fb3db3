"""An in-process backend with its control socket, and ``pciback ctl`` run against it.

``pciback.testing.running_backend`` serves a config for a guest; the tests of
operations also need the control socket, the ``Backend`` object and a config
whose source is a file name (the messages name it)::

    async with serving(CONFIG, tmp_path) as (backend, address):
        listing = await ctl_json(tmp_path, "list")
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from pciback.cli import main
from pciback.config import parse_config
from pciback.service import Backend
from pciback.testing import listen_address
from tests.support.configs import listen_line

__all__ = ["ctl", "ctl_json", "serving"]


@asynccontextmanager
async def serving(
    text: str, tmp: Path, *, kind: str = "memory", control: bool = True
) -> AsyncIterator[tuple[Backend, str]]:
    """Serve config ``text`` on a fresh ``kind`` address until the block ends.

    The config is parsed as if it were ``tmp/backend.toml`` (relative paths
    resolve against ``tmp``); with ``control`` the control socket is
    ``tmp/pciback.ctl``. Yields the backend and its one bound address.
    """
    config = parse_config(
        listen_line(listen_address(kind, tmp)) + text, source=str(tmp / "backend.toml"), base=tmp
    )
    backend = Backend(config, control=tmp / "pciback.ctl" if control else None)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(backend.serve)
        try:
            yield backend, addresses[0]
        finally:
            nursery.cancel_scope.cancel()


async def ctl(tmp: Path, *argv: str) -> tuple[int, str, str]:
    """``pciback ctl --control tmp/pciback.ctl ARGV`` (a blocking client) in a thread.

    Returns the exit status (2 for a usage error), stdout and stderr.
    """
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                return main(["ctl", "--control", str(tmp / "pciback.ctl"), *argv])
            except SystemExit as exc:  # argparse: usage errors
                return int(exc.code or 0)

    code = await trio.to_thread.run_sync(run)
    return code, out.getvalue(), err.getvalue()


async def ctl_json(tmp: Path, *argv: str) -> Any:
    """:func:`ctl` with ``--json``: the parsed answer, whose ``ok`` agrees with the status."""
    code, out, err = await ctl(tmp, *argv, "--json")
    answer = json.loads(out)
    assert (code == 0) == answer["ok"], (code, out, err)
    return answer
