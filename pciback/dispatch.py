"""Request dispatch: a dict from request type to handler; every request gets exactly one reply.

Handlers run the device access synchronously under the device's lock. A
handler never raises to its caller: typed pcisplit errors become an
``ErrorReply`` with their code, and a bug in a device model becomes an
``OPERATION_FAILED`` reply (logged with its traceback) so that one broken
model cannot take down the connection or the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pciback.registry import DeviceRegistry, ServedDevice
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import (
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DeviceInfo,
    DoneReply,
    ErrorReply,
    PingRequest,
    Reply,
    Request,
    ResetRequest,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)

__all__ = ["Dispatcher"]

log = logging.getLogger("pcisplit.backend")

Handler = Callable[[Any], Awaitable[Reply]]


def device_info(dev: ServedDevice, include_config: bool) -> DeviceInfo:
    """Describe a device as its guest sees it (through the policy)."""
    image = dev.access.config_image()
    assert dev.address is not None
    word = int.from_bytes
    return DeviceInfo(
        address=dev.address.pack(),
        vendor_id=word(image[0:2], "little"),
        device_id=word(image[2:4], "little"),
        class_code=word(image[9:12], "little"),
        revision=image[8],
        header_type=image[0x0E],
        subsystem_vendor_id=word(image[0x2C:0x2E], "little"),
        subsystem_id=word(image[0x2E:0x30], "little"),
        config=image if include_config else None,
    )


class Dispatcher:
    """Answers one guest's requests against the registry."""

    def __init__(self, registry: DeviceRegistry, guest: str) -> None:
        self.registry = registry
        self.guest = guest
        self.handlers: dict[type[Request], Handler] = {
            PingRequest: self._ping,
            SnapshotRequest: self._snapshot,
            ConfigReadRequest: self._config_read,
            ConfigWriteRequest: self._config_write,
            BarReadRequest: self._bar_read,
            BarWriteRequest: self._bar_write,
            ResetRequest: self._reset,
        }

    async def dispatch(self, request: Request) -> Reply:
        """Exactly one reply for ``request``."""
        handler = self.handlers.get(type(request))
        if handler is None:
            return ErrorReply(
                request.request_id,
                ErrorCode.NOT_IMPLEMENTED,
                f"operation {type(request).__name__} is not implemented by this backend",
            )
        try:
            return await handler(request)
        except PcisplitError as exc:
            return ErrorReply(request.request_id, exc.code, exc.message[:1000])
        except Exception as exc:  # a model bug must not kill the connection
            log.exception("device handler failed on %r for guest %s", request, self.guest)
            return ErrorReply(
                request.request_id,
                ErrorCode.OPERATION_FAILED,
                f"the device model failed: {type(exc).__name__}: {exc}"[:1000],
            )

    def _device(self, packed: int) -> ServedDevice:
        return self.registry.lookup(self.guest, packed)

    async def _ping(self, req: PingRequest) -> Reply:
        return DoneReply(req.request_id)

    async def _snapshot(self, req: SnapshotRequest) -> Reply:
        infos = []
        for dev in self.registry.devices_of(self.guest):
            async with dev.lock:
                infos.append(device_info(dev, req.include_config))
        return SnapshotReply(req.request_id, tuple(infos))

    async def _config_read(self, req: ConfigReadRequest) -> Reply:
        access = await self._enter(req.device)
        try:
            return ValueReply(req.request_id, access.access.config_read(req.offset, req.size))
        finally:
            self._leave(access)

    async def _config_write(self, req: ConfigWriteRequest) -> Reply:
        access = await self._enter(req.device)
        try:
            access.access.config_write(req.offset, req.size, req.value)
        finally:
            self._leave(access)
        return DoneReply(req.request_id)

    async def _bar_read(self, req: BarReadRequest) -> Reply:
        access = await self._enter(req.device)
        try:
            return ValueReply(req.request_id, access.access.bar_read(req.bar, req.offset, req.size))
        finally:
            self._leave(access)

    async def _bar_write(self, req: BarWriteRequest) -> Reply:
        access = await self._enter(req.device)
        try:
            access.access.bar_write(req.bar, req.offset, req.size, req.value)
        finally:
            self._leave(access)
        return DoneReply(req.request_id)

    async def _reset(self, req: ResetRequest) -> Reply:
        access = await self._enter(req.device)
        try:
            access.reset()
        finally:
            self._leave(access)
        return DoneReply(req.request_id)

    async def _enter(self, packed: int) -> ServedDevice:
        """Take the device's lock.

        Accesses are synchronous, so while we hold the lock without awaiting, nothing
        else can touch the device. When the lock is free we take it with
        ``acquire_nowait`` and skip a scheduler round trip on this hot path; when a
        background task (a model's slow operation) holds it, we wait our turn.
        """
        dev = self._device(packed)
        if dev.lock.locked():
            await dev.lock.acquire()
        else:
            dev.lock.acquire_nowait()
        return dev

    @staticmethod
    def _leave(dev: ServedDevice) -> None:
        dev.lock.release()
