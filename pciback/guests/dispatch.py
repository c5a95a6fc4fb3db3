"""Request dispatch: one table from request type to handler; every request gets exactly one reply.

Each :class:`Handler` entry says whether its request takes file descriptors
from its frame and whether it is answered from a task (see the session). The
:class:`Dispatcher` is given its collaborators - the IRQ router and outbox,
the guest's DMA space, the fd-passing capability - rather than reaching back
into the session.

Handlers run the device access synchronously under the device's lock. A
handler never raises to its caller: typed pcisplit errors become an
``ErrorReply`` with their code, and a bug in a device model becomes an
``OPERATION_FAILED`` reply (logged with its traceback) so that one broken
model cannot take down the connection or the backend.

Every refusal is counted by error code (``refused``, the backend's
``requests_refused``) and logged at info level through the connection's
rate-limited log (``events``, :mod:`pciback._ratelog`), one kind per request
type; a denied config write is logged by the policy's audit log instead. A
model failure is logged there too, at error level with its traceback: a guest
that can trigger a model bug in a loop cannot grow the log either.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pciback._ratelog import RateLimitedLog, ScopedLog
from pciback.plane.registry import DeviceRegistry, DeviceRemovedError, ServedDevice, device_info
from pciback.policy import AccessDeniedError
from shared.errors import ErrorCode, LimitExceededError, PcisplitError
from shared.evtchn import EventfdPort, Port
from shared.protocol import (
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DmaMapRequest,
    DmaUnmapRequest,
    DoneReply,
    ErrorReply,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptMaskRequest,
    PingRequest,
    Reply,
    Request,
    ResetRequest,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
)

if TYPE_CHECKING:
    from pciback.plane.dma import DmaCaller, GuestDma
    from pciback.plane.irq import InterruptOutbox, IrqRouter

__all__ = ["Dispatcher", "FdPassing", "FdPassingError", "Handler"]

log = logging.getLogger("pcisplit.backend")


class FdPassingError(PcisplitError):
    """A request needed file descriptors that did not come (or cannot come) with it."""

    code = ErrorCode.INVALID_STATE


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _eventfd_ports(fds: list[int]) -> list[Port]:
    """Wrap received fds as eventfd ports, refusing anything that is not an eventfd.

    A guest could send a pipe or a socket instead; signalling it would then
    write into something else, so every fd is checked first.
    """
    for fd in fds:
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise FdPassingError(f"a received fd cannot be inspected: {exc.strerror}") from exc
        if kind != "anon_inode:[eventfd]":
            raise FdPassingError(
                f"InterruptEnableRequest(eventfds=True) needs eventfds, but an fd is {kind!r}; "
                "send one os.eventfd() per vector"
            )
    return [EventfdPort(fd) for fd in fds]


@dataclass(frozen=True, slots=True)
class Handler:
    """One entry of the dispatcher's table.

    ``takes_fds``: the request may come with file descriptors (eventfds, a
    memfd), which the caller takes from its frame and hands to
    :meth:`Dispatcher.dispatch`. ``answer_in_task``: the answer may wait on
    the guest itself (an unmap waits for in-flight DMA, which may be a DMA
    call only the receive loop can complete), so the caller answers it from
    a task and checks that the connection is still open before sending.
    """

    run: Callable[..., Awaitable[Reply]]
    takes_fds: bool = False
    answer_in_task: bool = False


@dataclass(frozen=True, slots=True)
class FdPassing:
    """Whether the guest's transport can carry file descriptors, and its name for errors."""

    available: bool
    transport: str


class Dispatcher:
    """Answers one guest's requests against the registry and its collaborators.

    The dispatcher gets what it works with directly: the IRQ ``router`` and
    the guest's interrupt ``outbox``, its ``dma`` space and the ``dma_owner``
    that performs message-based DMA and takes fault reports (the session, seen
    only through the :class:`~pciback.plane.dma.DmaCaller` interface), and the
    transport's ``fd_passing`` capability. Without them it serves
    configuration, BAR and reset requests only (interrupt and DMA requests
    get ``NOT_IMPLEMENTED``). ``events`` is the connection's rate-limited log
    and ``refused`` counts refusals by error code (see the module).

    ``max_fds`` (``limits.max_fds_per_connection``) bounds the fds the
    connection keeps after the hand-over: the eventfds of its interrupt
    vectors and the memfds of its shared DMA windows (:meth:`held_fds`). A
    request whose fds would take it over the limit is refused with ``BUSY``
    naming the limit (its fds closed), and counted in ``limit_events``.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        guest: str,
        *,
        router: IrqRouter | None = None,
        outbox: InterruptOutbox | None = None,
        dma: GuestDma | None = None,
        dma_owner: DmaCaller | None = None,
        fd_passing: FdPassing = FdPassing(False, "this transport"),
        events: ScopedLog | None = None,
        refused: Counter[str] | None = None,
        max_fds: int | None = None,
        limit_events: Counter[str] | None = None,
    ) -> None:
        self.registry = registry
        self.events = events if events is not None else RateLimitedLog(log).scoped(f"guest {guest}")
        self.refused: Counter[str] = Counter() if refused is None else refused
        self.max_fds = max_fds
        self.limit_events: Counter[str] = Counter() if limit_events is None else limit_events
        self.guest = guest
        self.router = router
        self.outbox = outbox
        self.dma = dma
        self.dma_owner = dma_owner
        self.fd_passing = fd_passing
        #: The one handler table: request type -> how it is answered.
        self.table: dict[type[Request], Handler] = {
            PingRequest: Handler(self._ping),
            SnapshotRequest: Handler(self._snapshot),
            ConfigReadRequest: Handler(self._config_read),
            ConfigWriteRequest: Handler(self._config_write),
            BarReadRequest: Handler(self._bar_read),
            BarWriteRequest: Handler(self._bar_write),
            ResetRequest: Handler(self._reset),
            InterruptEnableRequest: Handler(self._irq_enable, takes_fds=True),
            InterruptDisableRequest: Handler(self._irq_disable),
            InterruptEoiRequest: Handler(self._irq_eoi),
            InterruptMaskRequest: Handler(self._irq_mask),
            DmaMapRequest: Handler(self._dma_map, takes_fds=True),
            DmaUnmapRequest: Handler(self._dma_unmap, answer_in_task=True),
        }

    def handler(self, request_type: type[Request]) -> Handler | None:
        """The table entry for ``request_type`` (None: answered ``NOT_IMPLEMENTED``)."""
        return self.table.get(request_type)

    async def dispatch(self, request: Request, fds: Sequence[int] = ()) -> Reply:
        """Exactly one reply for ``request``; never raises (but Cancelled).

        ``fds`` came with the request's frame, and the dispatcher owns them
        from here: a handler that takes fds keeps them or closes them; for
        any other request they are closed at once.
        """
        entry = self.table.get(type(request))
        if entry is None:
            _close_all(fds)
            return ErrorReply(
                request.request_id,
                ErrorCode.NOT_IMPLEMENTED,
                f"operation {type(request).__name__} is not implemented by this backend",
            )
        try:
            if entry.takes_fds:
                if fds:
                    self._check_fd_budget(request, fds)
                return await entry.run(request, list(fds))
            _close_all(fds)
            return await entry.run(request)
        except PcisplitError as exc:
            self._refusal(request, exc)
            return ErrorReply(request.request_id, exc.code, exc.message[:1000])
        except Exception as exc:  # noqa: BLE001 - a model bug must not kill the connection; logged below
            self.refused[ErrorCode.OPERATION_FAILED.name] += 1
            self.events.log(
                "device model failures",
                logging.ERROR,
                "device handler failed on %r for guest %s",
                request,
                self.guest,
                exc_info=True,
            )
            return self._model_failure(request, exc)

    def _refusal(self, request: Request, exc: PcisplitError) -> None:
        """Count a refused request; log it (rate-limited) unless the audit log has it."""
        self.refused[exc.code.name] += 1
        if isinstance(exc, AccessDeniedError):
            return  # the policy's audit log recorded it (rate-limited the same way)
        name = type(request).__name__
        self.events.log(
            f"refused {name}s",
            logging.INFO,
            "guest %s: %s refused (%s): %s",
            self.guest,
            name,
            exc.code.name,
            exc.message,
        )

    def held_fds(self) -> int:
        """Fds this connection keeps: interrupt eventfds and shared DMA windows' memfds."""
        held = 0 if self.outbox is None else self.outbox.held_fds
        if self.dma is not None and self.dma_owner is not None:
            held += self.dma.held_fds(self.dma_owner)
        return held

    def _check_fd_budget(self, request: Request, fds: Sequence[int]) -> None:
        """Refuse (closing ``fds``) a request that would keep more fds than ``max_fds``."""
        if self.max_fds is None:
            return
        held, count = self.held_fds(), len(fds)
        if held + count <= self.max_fds:
            return
        _close_all(fds)
        self.limit_events["max_fds_per_connection"] += 1
        raise LimitExceededError(
            "max_fds_per_connection",
            f"{type(request).__name__} came with {count} fd(s), but this connection already "
            f"holds {held} (eventfds of enabled interrupt vectors, memfds of shared DMA "
            f"windows) and may hold at most {self.max_fds} (limits.max_fds_per_connection); "
            "disable interrupts or unmap shared windows first, use in-band interrupts "
            "(eventfds=False) or message-based DMA (shared=False), or raise the limit in the "
            "backend config",
        )

    @staticmethod
    def _model_failure(request: Request, exc: Exception) -> Reply:
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
            if self.router is not None:
                # A function reset turns MSI/MSI-X off and forgets masks and pending bits.
                self.router.reset_device(access)
        finally:
            self._leave(access)
        return DoneReply(req.request_id)

    # -- interrupts and DMA -----------------------------------------------------------

    def _interrupts(self, what: str) -> tuple[IrqRouter, InterruptOutbox]:
        if self.router is None or self.outbox is None:
            raise PcisplitError(
                f"{what} needs interrupt delivery; this dispatcher serves config access only",
                code=ErrorCode.NOT_IMPLEMENTED,
            )
        return self.router, self.outbox

    def _dma_space(self, what: str) -> tuple[GuestDma, DmaCaller]:
        if self.dma is None or self.dma_owner is None:
            raise PcisplitError(
                f"{what} needs DMA; this dispatcher serves config access only",
                code=ErrorCode.NOT_IMPLEMENTED,
            )
        return self.dma, self.dma_owner

    def _need_fd_passing(self, wanted: str, fallback: str) -> None:
        if not self.fd_passing.available:
            raise FdPassingError(
                f"{wanted} needs file-descriptor passing, which this transport "
                f"({self.fd_passing.transport}) cannot do; use {fallback} instead, or "
                "connect over unix: or shm:",
                code=ErrorCode.NOT_IMPLEMENTED,
            )

    async def _irq_enable(self, req: InterruptEnableRequest, fds: list[int]) -> Reply:
        try:
            router, outbox = self._interrupts("InterruptEnableRequest")
            if req.eventfds:
                self._need_fd_passing("eventfds=True", "in-band interrupts (eventfds=False)")
                if len(fds) != req.vectors:
                    raise FdPassingError(
                        f"InterruptEnableRequest for {req.vectors} vector(s) came with "
                        f"{len(fds)} fd(s); send exactly one eventfd per vector with the request"
                    )
            dev = await self._enter(req.device)
        except BaseException:
            _close_all(fds)
            raise
        try:
            if req.eventfds:
                try:
                    ports = _eventfd_ports(fds)
                except BaseException:
                    _close_all(fds)
                    raise
            else:
                _close_all(fds)
                ports = []
            # The router owns the ports from here (it closes them if it refuses).
            granted = router.enable(dev, outbox, req.mode, req.vectors, ports)
        finally:
            self._leave(dev)
        return ValueReply(req.request_id, granted)

    async def _irq_disable(self, req: InterruptDisableRequest) -> Reply:
        router, _outbox = self._interrupts("InterruptDisableRequest")
        dev = await self._enter(req.device)
        try:
            router.disable(dev, self.guest, req.mode)
        finally:
            self._leave(dev)
        return DoneReply(req.request_id)

    async def _irq_eoi(self, req: InterruptEoiRequest) -> Reply:
        router, _outbox = self._interrupts("InterruptEoiRequest")
        dev = await self._enter(req.device)
        try:
            router.eoi(dev, self.guest, req.vector)
        finally:
            self._leave(dev)
        return DoneReply(req.request_id)

    async def _irq_mask(self, req: InterruptMaskRequest) -> Reply:
        router, _outbox = self._interrupts("InterruptMaskRequest")
        dev = await self._enter(req.device)
        try:
            router.mask(dev, req.vector, req.masked)
        finally:
            self._leave(dev)
        return DoneReply(req.request_id)

    async def _dma_map(self, req: DmaMapRequest, fds: list[int]) -> Reply:
        try:
            dma, owner = self._dma_space("DmaMapRequest")
            fd: int | None = None
            if req.shared:
                self._need_fd_passing("shared=True", "message-based DMA (shared=False)")
                if len(fds) != 1:
                    raise FdPassingError(
                        f"DmaMapRequest(shared=True) came with {len(fds)} fd(s); send exactly "
                        "one sealed memfd with the request"
                    )
                fd = fds.pop()
            elif fds:
                _close_all(fds)
                fds = []
        except BaseException:
            _close_all(fds)
            raise
        address = dma.map(req.size, req.writable, owner, fd)
        return ValueReply(req.request_id, address)

    async def _dma_unmap(self, req: DmaUnmapRequest) -> Reply:
        dma, owner = self._dma_space("DmaUnmapRequest")
        await dma.unmap(req.bus_address, owner)
        return DoneReply(req.request_id)

    async def _enter(self, packed: int) -> ServedDevice:
        """Take the device's lock.

        Accesses are synchronous, so while we hold the lock without awaiting, nothing
        else can touch the device. The lock is a :class:`~shared.sync.FastLock`:
        when it is free taking it costs no scheduler round trip on this hot path;
        when a background task (a model's slow operation) holds it, we wait our turn.
        """
        dev = self._device(packed)
        waited = dev.lock.locked()
        await dev.lock.acquire()
        if waited and (
            dev.guest != self.guest or dev.address is None or dev.address.pack() != packed
        ):
            # Hot-unplugged while we waited: the guest must not touch it any more.
            dev.lock.release()
            raise DeviceRemovedError(
                f"the device at {dev.leaving_address or packed} was hot-unplugged from "
                f"guest {self.guest!r}'s bus while this request waited for it"
            )
        return dev

    @staticmethod
    def _leave(dev: ServedDevice) -> None:
        dev.lock.release()
