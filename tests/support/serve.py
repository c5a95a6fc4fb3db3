"""A real ``pciback serve`` process: started until it serves, read line by line, stopped cleanly.

For the tests where the process is the point (signals, exit codes, what the
command prints, a backend killed with ``SIGKILL``). Everything else runs the
backend in-process (``pciback.testing.running_backend``).

Plain tests use it as a context manager, trio tests as an async one (the
waits run in a thread, so the trio loop keeps running)::

    with ServeProcess(tmp_path, config=CONFIG) as backend:    # CONFIG: TOML text
        ... backend.address("unix") ...
    async with ServeProcess(tmp_path, "--listen", f"unix:{sock}") as backend:
        ...

Leaving the block stops the process with ``SIGTERM`` (and ``SIGKILL`` if it
does not stop in time) unless the test already stopped it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import trio

__all__ = ["TIMEOUT", "Lines", "ServeFactory", "ServeProcess", "pciback_command"]

#: A stall guard for real processes, not a speed target.
TIMEOUT = 30.0


def pciback_command() -> list[str]:
    """The installed ``pciback`` command of this interpreter's environment, else ``-m``."""
    script = Path(sys.executable).parent / "pciback"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pciback.cli"]


class Lines:
    """The lines of a child's stream, pumped by a thread, taken with a time-out.

    Nothing blocks the child: every line is read as it comes, kept in ``seen``
    once taken and in :attr:`text` at once.
    """

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.name = name
        self.seen: list[str] = []
        self._all: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._all.append(line)
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = TIMEOUT) -> str:
        """The next line, without its newline; fails if none comes within ``timeout``."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no line on the backend's {self.name} within {timeout} s; so far: {self.seen}"
            ) from None
        if line is None:
            self._queue.put(None)  # stays ended
            raise AssertionError(f"the backend's {self.name} ended; so far: {self.seen}")
        self.seen.append(line)
        return line

    def until(self, needle: str, timeout: float = TIMEOUT) -> str:
        """Skip lines up to the first that contains ``needle``; that line."""
        while True:
            line = self.next(timeout)
            if needle in line:
                return line

    async def anext(self, timeout: float = TIMEOUT) -> str:
        """:meth:`next` for trio tests."""
        return await trio.to_thread.run_sync(self.next, timeout)

    @property
    def text(self) -> str:
        """Everything the stream carried so far, taken or not."""
        return "".join(self._all)

    def join(self, timeout: float = TIMEOUT) -> None:
        """Wait until the stream has ended and every line is in :attr:`text`."""
        self._thread.join(timeout)


class ServeProcess:
    """``pciback serve [--config FILE] ARGS`` in ``tmp`` (its working directory).

    ``config`` is TOML text (written to ``tmp/backend.toml``) or the path of a
    config file; without it the backend serves its embedded default. ``env``
    adds environment variables; ``command`` is the ``pciback`` to run (default:
    :func:`pciback_command`). Its stdout is read as :attr:`out`; its stderr
    (the log) is appended to ``tmp/backend.log`` (:meth:`log_text`), so that
    what it logged before a line on stdout is in the file once the line is read.
    The process starts at once; entering the block (or :meth:`ready` /
    :meth:`aready`) waits for the startup lines.
    """

    def __init__(
        self,
        tmp: Path,
        *args: str,
        config: str | Path | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.tmp = tmp
        if isinstance(config, str):
            path = tmp / "backend.toml"
            path.write_text(config)
            config = path
        self.config = config
        self.log_path = tmp / "backend.log"
        argv = [*(command or pciback_command()), "serve"]
        if config is not None:
            argv += ["--config", str(config)]
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [*argv, *args],
                cwd=tmp,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout, "stdout")
        #: The addresses of the ``listening on ADDRESS`` lines, in order.
        self.addresses: list[str] = []
        self._serving = False

    # ------------------------------------------------------------------ starting

    def ready(self, timeout: float = TIMEOUT) -> ServeProcess:
        """Wait for the ``listening on`` lines and the ``serving ...`` summary line."""
        while not self._serving:
            try:
                line = self.out.next(timeout)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nthe backend's log:\n{self.log_text()}") from None
            said = self.message(line)
            if said.startswith("listening on "):
                self.addresses.append(said.removeprefix("listening on "))
            elif said.startswith("serving "):
                self._serving = True
        return self

    @staticmethod
    def message(line: str) -> str:
        """What a line of ``serve``'s stdout says: ``pciback: TEXT``, or a JSON object's
        ``message`` (``--log-format json``)."""
        if line.startswith("{"):
            return str(json.loads(line)["message"])
        return line.removeprefix("pciback: ")

    async def aready(self, timeout: float = TIMEOUT) -> ServeProcess:
        """:meth:`ready` for trio tests."""
        return await trio.to_thread.run_sync(self.ready, timeout)

    def address(self, kind: str) -> str:
        """The first address the backend listens on with transport ``kind`` (``"unix"``).

        A relative socket path (the default config's ``unix:./pciback.sock``) is
        made absolute against the backend's working directory, for clients elsewhere.
        """
        for address in self.addresses:
            if address.startswith(kind + ":"):
                scheme, _, rest = address.partition(":")
                if scheme in ("unix", "shm") and not rest.startswith("/"):
                    return f"{scheme}:{self.tmp / rest}"
                return address
        raise LookupError(f"the backend listens on {self.addresses}, not on {kind}")

    # ------------------------------------------------------------------ stopping

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait until the process has exited, and the rest of its output is read; its status."""
        code = self.proc.wait(timeout)
        self.out.join(timeout)
        return code

    async def await_exit(self, timeout: float = TIMEOUT) -> int:
        """:meth:`wait` for trio tests."""
        return await trio.to_thread.run_sync(self.wait, timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``signum`` (unless it has exited) and wait; ``SIGKILL`` after ``timeout`` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(timeout)

    async def astop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """:meth:`stop` for trio tests."""
        return await trio.to_thread.run_sync(self.stop, signum, timeout)

    def log_text(self) -> str:
        """``tmp/backend.log``: what this backend (and earlier ones in ``tmp``) logged so far."""
        return self.log_path.read_text(errors="replace")

    # ------------------------------------------------------------------ as a block

    def __enter__(self) -> ServeProcess:
        try:
            return self.ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> ServeProcess:
        try:
            return await self.aready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()


#: The type of the ``serve_pciback`` fixture: ``(*args, config=..., env=...) -> ServeProcess``.
ServeFactory = Callable[..., ServeProcess]
