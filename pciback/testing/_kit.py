"""In-process backend helpers shared by the pytest plugin and users' own tests."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from pciback.config import BackendConfig, load_config, parse_config
from pciback.service import Backend

__all__ = [
    "TEST_TOKEN",
    "RunningBackend",
    "running_backend",
    "listen_address",
    "start_backend",
    "make_test_config",
]

_counter = itertools.count()

#: The token every guest of a test config gets when it listens on tcp
#: (pass it as ``pcifront.connect(..., token=TEST_TOKEN)``).
TEST_TOKEN = b"pcisplit-test-token-not-a-secret"


def listen_address(kind: str, tmp: Path) -> str:
    """A fresh listen address of transport ``kind`` (memory, unix, shm, tcp, tls)."""
    n = next(_counter)
    if kind == "memory":
        return f"memory:pcisplit-test-{n}"
    if kind in ("unix", "shm"):
        return f"{kind}:{tmp / f'pciback-{n}.sock'}"
    if kind in ("tcp", "tls"):
        return f"{kind}://127.0.0.1:0"
    raise ValueError(f"no test address for transport {kind!r}; use memory, unix, shm, tcp or tls")


@dataclass
class RunningBackend:
    """A backend serving in the background, and the addresses it is bound to."""

    backend: Backend
    addresses: list[str] = field(default_factory=list)

    def address(self, kind: str) -> str:
        """The bound address of transport ``kind`` (e.g. ``"unix"``)."""
        for address in self.addresses:
            if address.startswith(kind + ":"):
                return address
        raise LookupError(f"the backend does not listen on {kind}; it has {self.addresses}")


def make_test_config(
    config: BackendConfig | str | Path,
    *,
    transports: Sequence[str],
    tmp: Path | None,
    allow_plain_tcp: bool = True,
    base: Path | None = None,
) -> BackendConfig:
    """``config`` with fresh listen addresses for ``transports`` (its own list is ignored).

    ``config`` is a parsed config, TOML text, or the path of a TOML file. Relative
    paths in TOML text (``dump = "nic.txt"``) resolve against ``base`` (default:
    ``tmp``, else the current directory); in a file, against the file's directory;
    a relative file path itself resolves against ``base`` too.
    For ``tcp`` every guest is allowed plain TCP unless ``allow_plain_tcp`` is False,
    and a guest without a token gets :data:`TEST_TOKEN`.
    """
    base = base if base is not None else tmp
    if isinstance(config, Path):
        config = load_config(config if base is None else base / config)
    elif isinstance(config, str):
        config = parse_config(config, source="<test config>", base=base)
    if allow_plain_tcp and "tcp" in transports:
        guests = {
            name: replace(g, allow_plain_tcp=True, token=g.token or TEST_TOKEN)
            for name, g in config.guests.items()
        }
        config = replace(config, guests=guests)
    if tmp is None and any(k in ("unix", "shm") for k in transports):
        raise ValueError("unix and shm test addresses need tmp= (a temporary directory)")
    listen = tuple(listen_address(kind, tmp or Path(".")) for kind in transports)
    return replace(config, listen=listen)


async def start_backend(nursery: trio.Nursery, config: BackendConfig) -> RunningBackend:
    """Start ``config``'s backend in ``nursery``; returns once every address is bound."""
    backend = Backend(config)
    addresses = await nursery.start(backend.serve)
    return RunningBackend(backend, addresses)


@asynccontextmanager
async def running_backend(
    config: BackendConfig | str | Path,
    *,
    transports: Sequence[str] = ("memory",),
    tmp: Path | None = None,
    allow_plain_tcp: bool = True,
    base: Path | None = None,
) -> AsyncIterator[RunningBackend]:
    """Run a backend for ``config`` until the block ends (see :func:`make_test_config`)."""
    config = make_test_config(
        config, transports=transports, tmp=tmp, allow_plain_tcp=allow_plain_tcp, base=base
    )
    async with trio.open_nursery() as nursery:
        running = await start_backend(nursery, config)
        try:
            yield running
        finally:
            nursery.cancel_scope.cancel()
