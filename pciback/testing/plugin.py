"""pytest plugin ``pcisplit`` (entry point ``pytest11``): fixtures for integration tests.

Install pcisplit with its ``testing`` extra (which brings pytest and
pytest-trio): ``pip install '/path/to/pcisplit[testing]'`` from a checkout, or
``pip install "$(ls dist/pcisplit-*.whl)[testing]"`` from the wheel ``make dist``
builds (``docs/testing.md``). An ``async def`` test that uses one of these
fixtures, and every check of a ``TransportConformance`` (or
``BlockingTransportConformance``) subclass, runs under trio without any
configuration: the plugin marks it ``@pytest.mark.trio`` (projects with
``trio_mode = true`` get the same).

Fixtures:

``pcisplit_start_backend``
    A factory: ``rb = await pcisplit_start_backend(config, transports=("unix", "tcp"))``
    starts a backend for the rest of the test and returns a :class:`RunningBackend`
    (``rb.address("unix")`` is where it listens). ``config`` is TOML text, a
    ``pathlib.Path`` to a TOML file, or a parsed ``BackendConfig``. Relative paths
    in TOML text (``dump = "nic.txt"``) resolve against the test file's directory;
    relative paths in a file, against that file's directory; a relative
    ``Path`` itself, against the test file's directory.
``pcisplit_backend``
    The embedded default backend (one edu device for guest0), listening on an
    in-memory and a UNIX-socket address.
``pcisplit_bus``
    A :class:`pcifront.Bus` connected to ``pcisplit_backend`` as guest0.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from pciback.config import DEFAULT_CONFIG_TEXT, BackendConfig
from pciback.testing._kit import RunningBackend, make_test_config, start_backend
from pcifront import Bus, connect
from shared.transport.blocking_conformance import BlockingTransportConformance
from shared.transport.conformance import TransportConformance

StartBackend = Callable[..., Awaitable[RunningBackend]]

#: The fixtures that need the test to run under trio.
TRIO_FIXTURES = frozenset({"pcisplit_start_backend", "pcisplit_backend", "pcisplit_bus"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark our ``async def`` tests as trio tests (pytest-trio runs them).

    Ours: tests that use the fixtures below, and the checks of a transport
    conformance suite (a subclass of ``TransportConformance`` or
    ``BlockingTransportConformance``).
    """
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("trio"):
            continue
        if not inspect.iscoroutinefunction(item.obj):
            continue
        conformance = item.cls is not None and issubclass(
            item.cls, (TransportConformance, BlockingTransportConformance)
        )
        if conformance or TRIO_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.trio)


@pytest.fixture
def pcisplit_start_backend(
    nursery: trio.Nursery, tmp_path: Path, request: pytest.FixtureRequest
) -> StartBackend:
    test_dir = Path(request.path).parent

    async def start(
        config: BackendConfig | str | Path = DEFAULT_CONFIG_TEXT,
        transports: Sequence[str] = ("memory",),
    ) -> RunningBackend:
        cfg = make_test_config(config, transports=transports, tmp=tmp_path, base=test_dir)
        return await start_backend(nursery, cfg)

    return start


@pytest.fixture
async def pcisplit_backend(pcisplit_start_backend: StartBackend) -> RunningBackend:
    return await pcisplit_start_backend(DEFAULT_CONFIG_TEXT, ("memory", "unix"))


@pytest.fixture
async def pcisplit_bus(pcisplit_backend: RunningBackend) -> AsyncIterator[Bus]:
    async with connect(pcisplit_backend.address("memory"), guest="guest0") as bus:
        yield bus
