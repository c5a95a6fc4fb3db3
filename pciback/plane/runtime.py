"""The backend's side of a device model's context: background tasks, the lock, IRQs and DMA."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from pciback.devices import DeviceContext, InterruptSink
from shared.sync import FastLock

__all__ = ["DeviceRuntime", "DeviceDmaPort"]

log = logging.getLogger("pcisplit.backend")


class DeviceDmaPort(Protocol):
    """The device's DMA path (``pciback.plane.dma.DeviceDma``): the owning guest's windows."""

    async def read(self, address: int, length: int) -> bytes: ...

    async def write(self, address: int, data: bytes) -> None: ...


class DeviceRuntime(DeviceContext):
    """Runs one device's background work in the backend's nursery.

    Tasks run under a per-device cancel scope, so a reset (or the device
    leaving) cancels them without touching other devices. A task that fails
    is logged with its traceback and does not take the backend down.

    ``interrupts`` is the device's sink in the IRQ router and ``dma`` its
    path to the owning guest's DMA windows; without them the context
    delivers no interrupts and offers no DMA (the :class:`DeviceContext`
    defaults).
    """

    def __init__(
        self,
        device_id: str,
        lock: FastLock,
        nursery: trio.Nursery,
        *,
        interrupts: InterruptSink | None = None,
        dma: DeviceDmaPort | None = None,
    ) -> None:
        self.device_id = device_id
        self._lock = lock
        self._nursery = nursery
        self._scopes: set[trio.CancelScope] = set()
        self._interrupts = interrupts
        self._dma = dma
        self.tasks_started = 0
        self.tasks_failed = 0

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        # A CancelScope can be entered only once, so every task gets its own; the set
        # lets cancel_background reach all of them.
        scope = trio.CancelScope()
        scopes = self._scopes
        scopes.add(scope)
        self.tasks_started += 1

        async def run() -> None:
            try:
                with scope:
                    await fn()
            except Exception:  # a model bug must not kill the backend
                self.tasks_failed += 1
                log.exception("device %s: background task %s failed", self.device_id, name)
            finally:
                scopes.discard(scope)

        self._nursery.start_soon(run, name=f"{self.device_id}:{name}")

    def locked(self) -> AbstractAsyncContextManager[None]:
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def cancel_background(self) -> None:
        """Cancel every background task of this device (on reset or removal)."""
        for scope in self._scopes:
            scope.cancel()
        self._scopes = set()

    @property
    def interrupts(self) -> InterruptSink:
        if self._interrupts is None:
            return super().interrupts
        return self._interrupts

    @property
    def dma_available(self) -> bool:
        return self._dma is not None

    async def dma_read(self, address: int, length: int) -> bytes:
        if self._dma is None:
            return await super().dma_read(address, length)
        return await self._dma.read(address, length)

    async def dma_write(self, address: int, data: bytes) -> None:
        if self._dma is None:
            await super().dma_write(address, data)
            return
        await self._dma.write(address, data)
