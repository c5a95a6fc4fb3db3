"""``connect(..., reconnect=True)``: a bus that outlives its connections.

When the connection to the backend is lost (the backend restarted, was
killed, the network broke), a :class:`Reconnector` reconnects with
exponential back-off (:class:`ReconnectPolicy`), re-handshakes, and
re-enumerates: the new bus snapshot is compared with ``bus.devices`` and the
differences are reported as device changes (``bus.changes()``), while
devices that are still there keep their :class:`~pcifront.Device` objects.

What happens to requests across a reconnect:

* a request that never left this process waits for the new connection and
  is sent there (bounded by ``connect``'s ``timeout``);
* a **read** (config and BAR reads, snapshots, pings) whose reply was lost
  is sent again: reading twice has no effect a guest can see;
* a **write** (config and BAR writes, resets, interrupt and DMA control)
  whose reply was lost fails with :class:`~pcifront.OutcomeUnknownError`:
  the backend may or may not have applied it, and replaying it blindly could
  apply it twice. It is never reported as a success.

State that lived in the old backend session does not survive, and is not
re-established behind the guest's back: the backend reset the device when
the old connection ended (or restarted), so the device has forgotten its MSI
set-up and the DMA bus addresses it was programmed with. At the moment the
connection is lost, active ``interrupts()`` blocks end, every task waiting
in their ``receive()`` gets :class:`~pcifront.ResourceLostError`, and DMA
buffers are unmapped (using one raises the same error). Re-initialise the
device, then enter ``interrupts()`` again and map new buffers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from pcifront.client.pump import Pump
from pcifront.core.errors import ConnectionLostError, HandshakeError, OutcomeUnknownError
from pcifront.core.session import ClientCore
from shared.errors import ErrorCode, RemoteProtocolError
from shared.protocol import Reply, Request
from shared.transport import FrameTransport, TransportConnectError

__all__ = ["ReconnectPolicy", "Reconnector", "LinkEvent", "dial_with_backoff"]

log = logging.getLogger("pcisplit.frontend")


@dataclass(frozen=True)
class LinkEvent:
    """The connection went ``"down"`` or came back ``"up"`` (``pcifront agent`` prints these).

    ``attempt`` counts connection attempts since the link went down (0 for
    ``"down"``); ``detail`` says why it went down, or where it came back.
    """

    state: str
    detail: str
    attempt: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"event": self.state, "detail": self.detail, "attempt": self.attempt}


@dataclass(frozen=True)
class ReconnectPolicy:
    """How ``connect(..., reconnect=...)`` retries after the connection is lost.

    The first attempt is made at once, then after ``initial_delay`` seconds,
    each delay ``factor`` times the last, at most ``max_delay``. A backend
    that refuses the handshake (e.g. the guest is no longer configured) ends
    the retries (requests then fail with :class:`~pcifront.ConnectionLostError`
naming the refusal), except a ``BUSY`` refusal, which is retried. ``on_link`` is
    called (from the reconnecting task; it must not block) with a
    :class:`LinkEvent` each time the link goes down or comes back up.
    """

    initial_delay: float = 0.1
    max_delay: float = 10.0
    factor: float = 2.0
    on_link: Callable[[LinkEvent], None] | None = None

    def __post_init__(self) -> None:
        if not (0 < self.initial_delay <= self.max_delay < math.inf) or not self.factor >= 1:
            raise ValueError(
                "ReconnectPolicy needs 0 < initial_delay <= max_delay < inf and factor >= 1, got "
                f"initial_delay={self.initial_delay}, max_delay={self.max_delay}, "
                f"factor={self.factor}"
            )

    def delays(self) -> list[float]:
        """The first few delays (for documentation and tests)."""
        out, delay = [0.0], self.initial_delay
        while len(out) < 8:
            out.append(delay)
            delay = min(delay * self.factor, self.max_delay)
        return out


Dial = Callable[[], Awaitable[tuple[FrameTransport, ClientCore]]]


class Reconnector:
    """Keeps one bus's :class:`~pcifront.client.pump.Pump` connected; retries its requests
    by the rules above.

    ``dial()`` makes a new connection (transport and core, handshake done);
    ``on_final(reason)`` is called once when reconnecting has failed for good.
    """

    def __init__(
        self, pump: Pump, dial: Dial, policy: ReconnectPolicy, on_final: Callable[[str], None]
    ) -> None:
        self._pump = pump
        self._dial = dial
        self._on_final = on_final
        self.policy = policy
        self._up = trio.Event()
        self._up.set()  # connect() hands over a connected bus
        self._final: BaseException | None = None
        self.closing = False
        #: Successful reconnects so far.
        self.reconnects = 0

    # ------------------------------------------------------------------ requests

    async def call(
        self,
        make: Callable[[int], Request],
        *,
        idempotent: bool,
        check: Callable[[], None] | None = None,
    ) -> Reply:
        """``pump.call(make)``, carried across reconnects (see the module docstring).

        ``check()``, called before each attempt, raises when the request must
        not go out any more (its device left the bus).
        """
        pump = self._pump
        timeout = pump.timeout
        deadline = trio.current_time() + (math.inf if timeout is None else timeout)
        while True:
            await self._wait_up(deadline)
            if check is not None:
                check()
            try:
                return await pump.call(make)
            except ConnectionLostError as exc:
                if self.closing or self._final is not None:
                    raise
                if exc.request_sent is False or idempotent:
                    continue  # wait for the new connection and send it (again)
                raise OutcomeUnknownError(
                    f"the connection to the backend was lost before it answered this write "
                    f"({exc}); it may or may not have been applied, and it is not replayed: "
                    "read the device back, then decide whether to write again"
                ) from exc

    def _mark_down(self) -> None:
        # A new event only if the current one is set: tasks may already wait on it.
        if self._up.is_set():
            self._up = trio.Event()

    async def _wait_up(self, deadline: float) -> None:
        if self._pump.lost is not None and self._final is None and not self.closing:
            self._mark_down()  # lost, and run() has not noticed yet
        while not self._up.is_set():
            if self._final is not None or self.closing:
                break
            with trio.move_on_at(deadline):
                await self._up.wait()
            if not self._up.is_set() and trio.current_time() >= deadline:
                raise ConnectionLostError(
                    f"the backend has been unreachable for longer than the {self._pump.timeout} "
                    "s timeout; still reconnecting (raise timeout= in connect() to wait longer)",
                    request_sent=False,
                )
        if self._final is not None:
            raise ConnectionLostError(str(self._final), request_sent=False)

    # ------------------------------------------------------------------ the link

    def _link(self, event: LinkEvent) -> None:
        if self.policy.on_link is not None:
            self.policy.on_link(event)

    def mark_up(self) -> None:
        """The new connection is attached and re-enumerated: let requests through."""
        self._up.set()

    async def run(self, serve: Callable[[bool], Awaitable[None]]) -> None:
        """Serve the current connection; on loss, reconnect and serve again, until closed.

        ``serve(reenumerate)`` runs the bus's per-connection tasks and returns
        when the connection is gone; after a reconnect (``reenumerate`` True)
        it re-enumerates the bus first and then calls :meth:`mark_up`.
        """
        pump = self._pump
        reenumerate = False
        while True:
            await serve(reenumerate)
            if self.closing:
                return
            reason = pump.lost or "the connection ended"
            self._mark_down()
            log.warning("connection to the backend lost (%s); reconnecting", reason)
            self._link(LinkEvent("down", reason))
            await pump.detach()
            try:
                attempt = await self._reconnect()
            except HandshakeError as exc:
                # The backend is back but refuses this guest: retrying cannot help.
                log.error("reconnecting failed for good: %s", exc)
                self._final = exc
                self._link(LinkEvent("failed", str(exc)))
                self._on_final(str(exc))
                self._up.set()
                return
            self.reconnects += 1
            self._link(LinkEvent("up", pump.transport.describe(), attempt))
            reenumerate = True

    async def _reconnect(self) -> int:
        transport, core, attempt = await dial_with_backoff(self._dial, self.policy)
        self._pump.attach(transport, core)
        return attempt


async def dial_with_backoff(
    dial: Dial, policy: ReconnectPolicy
) -> tuple[FrameTransport, ClientCore, int]:
    """Call ``dial()`` until it connects, sleeping ``policy``'s back-off between attempts.

    Returns the transport, the connection and the number of attempts. A
    refused handshake ends it (:class:`~pcifront.HandshakeError`), except a
    ``BUSY`` refusal.
    """
    delay = 0.0
    attempt = 0
    while True:
        if delay:
            await trio.sleep(delay)
        attempt += 1
        try:
            transport, core = await dial()
        except HandshakeError as exc:
            if exc.code is not ErrorCode.BUSY:
                raise
            log.info("connection attempt %d: the backend is busy: %s", attempt, exc)
        except (
            ConnectionLostError,
            TransportConnectError,
            RemoteProtocolError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            log.info("connection attempt %d failed: %s", attempt, exc)
        else:
            return transport, core, attempt
        delay = policy.initial_delay if not delay else min(delay * policy.factor, policy.max_delay)
