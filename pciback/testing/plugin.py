"""pytest plugin ``pcisplit`` (entry point ``pytest11``): fixtures for integration tests.

Fixtures (they need pytest-trio):

``pcisplit_start_backend``
    A factory: ``rb = await pcisplit_start_backend(config_toml, transports=("unix", "tcp"))``
    starts a backend for the rest of the test and returns a :class:`RunningBackend`
    (``rb.address("unix")`` is where it listens).
``pcisplit_backend``
    The embedded default backend (one edu device for guest0), listening on an
    in-memory and a UNIX-socket address.
``pcisplit_bus``
    A :class:`pcifront.Bus` connected to ``pcisplit_backend`` as guest0.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from pciback.config import DEFAULT_CONFIG_TEXT, BackendConfig
from pciback.testing._kit import RunningBackend, make_test_config, start_backend
from pcifront import Bus, connect

StartBackend = Callable[..., Awaitable[RunningBackend]]


@pytest.fixture
def pcisplit_start_backend(nursery: trio.Nursery, tmp_path: Path) -> StartBackend:
    async def start(
        config: BackendConfig | str = DEFAULT_CONFIG_TEXT,
        transports: Sequence[str] = ("memory",),
    ) -> RunningBackend:
        cfg = make_test_config(config, transports=transports, tmp=tmp_path)
        return await start_backend(nursery, cfg)

    return start


@pytest.fixture
async def pcisplit_backend(pcisplit_start_backend: StartBackend) -> RunningBackend:
    return await pcisplit_start_backend(DEFAULT_CONFIG_TEXT, ("memory", "unix"))


@pytest.fixture
async def pcisplit_bus(pcisplit_backend: RunningBackend) -> AsyncIterator[Bus]:
    async with connect(pcisplit_backend.address("memory"), guest="guest0") as bus:
        yield bus
