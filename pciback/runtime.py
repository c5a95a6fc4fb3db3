"""The backend's side of a device model's context: background tasks and the device lock."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from pciback.devices import DeviceContext

__all__ = ["DeviceRuntime"]

log = logging.getLogger("pcisplit.backend")


class DeviceRuntime(DeviceContext):
    """Runs one device's background work in the backend's nursery.

    Tasks run under a per-device cancel scope, so a reset (or the device
    leaving) cancels them without touching other devices. A task that fails
    is logged with its traceback and does not take the backend down.
    """

    def __init__(self, device_id: str, lock: trio.Lock, nursery: trio.Nursery) -> None:
        self.device_id = device_id
        self._lock = lock
        self._nursery = nursery
        self._scope = trio.CancelScope()
        self.tasks_started = 0
        self.tasks_failed = 0

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        scope = self._scope
        self.tasks_started += 1

        async def run() -> None:
            with scope:
                try:
                    await fn()
                except Exception:  # a model bug must not kill the backend
                    self.tasks_failed += 1
                    log.exception("device %s: background task %s failed", self.device_id, name)

        self._nursery.start_soon(run, name=f"{self.device_id}:{name}")

    def locked(self) -> AbstractAsyncContextManager[None]:
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def cancel_background(self) -> None:
        """Cancel every background task of this device (on reset or removal)."""
        self._scope.cancel()
        self._scope = trio.CancelScope()
