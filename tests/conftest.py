"""Fixtures every test directory shares. The code behind them is in ``tests/support/``
(and, for what users need too, in the public kit ``pciback.testing``).

``fake_host``
    A :class:`pciback.testing.FakeHost` (public: ``docs/testing.md``): a fake
    sysfs PCI tree at ``tmp_path / "sysfs"`` (point ``sysfs_root`` at ``fake_host.root``).
``serve_pciback``
    A factory for real ``pciback serve`` processes in ``tmp_path``:
    ``backend = serve_pciback(config=CONFIG)`` returns once the backend serves
    (:class:`~tests.support.serve.ServeProcess`); whatever is still running when
    the test ends is stopped with ``SIGTERM`` (``SIGKILL`` if it hangs). Trio
    tests use ``async with ServeProcess(...)`` instead, which waits in a thread.
``tls_files``
    :class:`~tests.support.tls.TlsFiles` in ``tmp_path``: a new CA, the
    backend's certificate files and ``tls_files.section`` to put in a config.

Configurations are plain text from ``tests.support.configs`` (``ONE_GUEST``,
``TWO_GUESTS``, ``edu_config``), imported where a test uses them, so that the
config a test depends on stays visible in its module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pciback.testing import FakeHost
from tests.support.serve import ServeFactory, ServeProcess
from tests.support.tls import TlsFiles


@pytest.fixture
def fake_host(tmp_path: Path) -> FakeHost:
    """An empty fake host at ``tmp_path / "sysfs"``; add functions with ``fake_host.add``."""
    return FakeHost(tmp_path / "sysfs")


@pytest.fixture
def serve_pciback(tmp_path: Path) -> Iterator[ServeFactory]:
    """Start real ``pciback serve`` processes: ``serve_pciback(*args, config=..., env=...)``."""
    started: list[ServeProcess] = []

    def start(
        *args: str, config: str | Path | None = None, env: dict[str, str] | None = None
    ) -> ServeProcess:
        process = ServeProcess(tmp_path, *args, config=config, env=env)
        started.append(process)
        return process.ready()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A new CA and the backend's ``server.pem``, ``server.key`` and ``ca.pem`` in tmp_path."""
    return TlsFiles(tmp_path)
