"""The IRQ router: the guest's interrupt operations, the XSA-157 rules, ownership on every delivery.

:class:`DeviceInterrupts` (one per served device) is the device model's
interrupt sink and the binding to the session that receives the device's
interrupts. The interrupt state itself (mode, vectors, masks, pending bits,
the INTx line and in-service latch) is the device's one
:class:`~pciback.devices.InterruptState`, which the router changes only
through its operations. :class:`IrqRouter` (one per backend) carries out the
guest's interrupt operations and owns the per-guest rate limits. Everything
on the device side is synchronous and never blocks: the sink is called from
register handlers under the device lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from pciback._ratelog import RateLimitedLog
from pciback.devices import InterruptState, Signal
from shared.errors import ErrorCode, PcisplitError
from shared.evtchn import Port
from shared.pci import (
    CapId,
    Command,
    MsiControl,
    MsixControl,
    Reg,
    msi_vectors_capable,
    walk_capabilities,
)
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
)

from ._delivery import InterruptLimits, InterruptOutbox, TokenBucket

if TYPE_CHECKING:
    from pciback.plane.registry import ServedDevice

__all__ = [
    "MODE_NAMES",
    "InterruptError",
    "DeviceInterrupts",
    "InterruptStatistics",
    "IrqRouter",
    "RouterStatistics",
]

log = logging.getLogger("pcisplit.backend.irq")

MODE_NAMES = {IRQ_MODE_INTX: "INTx", IRQ_MODE_MSI: "MSI", IRQ_MODE_MSIX: "MSI-X"}


class InterruptError(PcisplitError):
    """A guest interrupt operation that is not allowed in the device's current state."""

    code = ErrorCode.INVALID_STATE


# --------------------------------------------------------------------------- per device


@dataclass
class InterruptStatistics:
    intx_asserts: int = 0
    msi_signals: int = 0
    msix_signals: int = 0
    delivered: int = 0  # posted to the owner's outbox
    dropped_disabled: int = 0  # the mode was off or the vector not enabled
    dropped_not_owner: int = 0  # the device left the guest that bound it
    pending_set: int = 0  # fired while masked: pending bit set instead
    spurious_eoi: int = 0


@dataclass
class _Binding:
    guest: str
    device: int  # packed virtual address on that guest's bus
    outbox: InterruptOutbox


@dataclass
class _CapInfo:
    offset: int
    control: int


class DeviceInterrupts:
    """One device's interrupt sink and binding, over the device's :class:`InterruptState`.

    The state (mode, vectors, masks, pending bits, INTx line and latch) is the
    device's own (``provider.interrupt_state``); this object applies it to what
    the model signals, delivers to the bound session, and counts. The binding
    says which session receives the device's interrupts.
    """

    def __init__(self, served: ServedDevice) -> None:
        self._served = served
        self.state: InterruptState = served.provider.interrupt_state
        # From now on only the router's operations enable modes and change masks.
        self.state.managed = True
        self._binding: _Binding | None = None
        self.stats = InterruptStatistics()

    def statistics(self) -> InterruptStatistics:
        return self.stats

    # -- the device model's side (InterruptSink) ------------------------------------------

    def assert_intx(self) -> None:
        """Level-triggered: one event per assertion until the guest EOIs (late EOI)."""
        self.stats.intx_asserts += 1
        if self.state.set_intx_level(True):
            self._deliver(0)

    def deassert_intx(self) -> None:
        self.state.set_intx_level(False)

    def signal_msi(self, vector: int) -> None:
        self.stats.msi_signals += 1
        self._signalled(IRQ_MODE_MSI, vector)

    def signal_msix(self, vector: int) -> None:
        """Signal MSI-X table entry ``vector``; it must lie inside the table (XSA-164)."""
        self.stats.msix_signals += 1
        self._signalled(IRQ_MODE_MSIX, vector)

    def _signalled(self, mode: int, vector: int) -> None:
        result = self.state.signal(mode, vector)
        if result is Signal.DELIVER:
            self._deliver(vector)
        elif result is Signal.PENDING:
            self.stats.pending_set += 1
        elif result is Signal.OFF:
            self.stats.dropped_disabled += 1
        else:
            raise InterruptError(
                f"MSI-X vector {vector} is outside the device's table of "
                f"{self.state.table_size} entries; the model signalled an entry that does not "
                "exist",
                code=ErrorCode.INVALID_OFFSET,
            )

    def _deliver(self, vector: int) -> None:
        binding = self._binding
        if binding is None:
            self.stats.dropped_disabled += 1
            return
        served = self._served
        # Checked on every delivery, not only at enable time: if the device left the
        # guest (or moved to another guest), the old guest must never see it again.
        if (
            served.guest != binding.guest
            or served.address is None
            or served.address.pack() != binding.device
        ):
            self.stats.dropped_not_owner += 1
            self.clear()
            return
        self.stats.delivered += 1
        binding.outbox.post(binding.device, vector)

    def _deliver_all(self, vectors: int) -> None:
        """Deliver every vector of the bit set ``vectors``, lowest first."""
        while vectors:
            low = vectors & -vectors
            self._deliver(low.bit_length() - 1)
            vectors ^= low

    # -- state (read through; ``mode`` and ``vectors`` are settable for tests) -----------

    @property
    def mode(self) -> int | None:
        """The enabled mode (IRQ_MODE_INTX/MSI/MSIX), or None."""
        return self.state.mode

    @mode.setter
    def mode(self, mode: int | None) -> None:
        self.state.mode = mode

    @property
    def vectors(self) -> int:
        """Vectors of the enabled mode."""
        return self.state.vectors

    @vectors.setter
    def vectors(self, vectors: int) -> None:
        self.state.vectors = vectors

    @property
    def table_size(self) -> int:
        """MSI-X: entries in the device's table (0 unless MSI-X is on)."""
        return self.state.table_size

    @property
    def bound_guest(self) -> str | None:
        """The guest whose session receives this device's interrupts, if any."""
        return self._binding.guest if self._binding is not None else None

    @property
    def level(self) -> bool:
        """The INTx line level the model last drove."""
        return self.state.intx_level

    @property
    def in_service(self) -> bool:
        """INTx: an event was delivered and the guest has not EOI'd it yet."""
        return self.state.intx_in_service

    def pending_bits(self) -> int:
        """The PBA: a bit per vector that fired while masked."""
        return self.state.pending

    def masked_bits(self) -> int:
        return self.state.masked

    @property
    def function_masked(self) -> bool:
        return self.state.function_masked

    # -- the router's side ----------------------------------------------------------------

    def bind(self, outbox: InterruptOutbox, device: int, ports: Sequence[Port] = ()) -> None:
        """Deliver to ``outbox`` as ``device`` (packed guest address), eventfds ``ports``."""
        self._unbind()
        self._binding = _Binding(outbox.guest, device, outbox)
        if ports:
            outbox.bind_ports(device, ports)

    def bound_to(self, outbox: InterruptOutbox) -> bool:
        """Whether ``outbox`` receives this device's interrupts."""
        return self._binding is not None and self._binding.outbox is outbox

    def enable(self, mode: int, vectors: int, table_size: int) -> None:
        """Turn ``mode`` on in the state; a line already asserted interrupts at once (INTx)."""
        if self.state.enable(mode, vectors, table_size=table_size):
            self._deliver(0)

    def eoi_intx(self) -> None:
        """INTx EOI of the line in service: a line still asserted fires again."""
        if self.state.eoi_intx():
            self._deliver(0)

    def mask(self, vector: int, masked: bool) -> None:
        """Mask or unmask one vector; unmasking delivers it if it was pending."""
        self._deliver_all(self.state.set_mask(vector, masked))

    def mask_function(self, masked: bool) -> None:
        """MSI-X function mask; unmasking delivers every pending, unmasked vector."""
        self._deliver_all(self.state.set_function_mask(masked))

    def clear(self) -> None:
        """Unbind and turn the mode off (masks, pending bits and the latch clear)."""
        self._unbind()
        self.state.disable()

    def _unbind(self) -> None:
        binding, self._binding = self._binding, None
        if binding is not None:
            binding.outbox.unbind(binding.device)


# --------------------------------------------------------------------------- the router


@dataclass
class RouterStatistics:
    enables: int = 0
    disables: int = 0
    refused: int = 0
    warnings_logged: int = 0
    warnings_suppressed: int = 0


class IrqRouter:
    """The backend-wide interrupt router.

    ``clock`` drives the rate limits (``trio.current_time`` by default, so
    ``trio.testing.MockClock`` controls it in tests).
    """

    def __init__(
        self,
        limits: InterruptLimits | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.limits = limits or InterruptLimits()
        self._clock = clock
        self._devices: dict[int, DeviceInterrupts] = {}
        self._delivery: dict[str, TokenBucket] = {}
        #: Guest-triggered warnings: counted, rate-limited per (guest, kind), summarised.
        self.guest_log = RateLimitedLog(
            log,
            rate=self.limits.warnings_per_second,
            burst=self.limits.warning_burst,
            clock=clock,
        )
        self.stats = RouterStatistics()

    def statistics(self) -> RouterStatistics:
        return self.stats

    def device(self, served: ServedDevice) -> DeviceInterrupts:
        """The interrupt state (and model sink) of ``served``, created on first use."""
        state = self._devices.get(id(served))
        if state is None:
            state = self._devices[id(served)] = DeviceInterrupts(served)
        return state

    def outbox(self, guest: str) -> InterruptOutbox:
        """A new outbox for one session of ``guest`` (sharing the guest's delivery budget)."""
        bucket = self._delivery.get(guest)
        if bucket is None:
            limits = self.limits
            bucket = TokenBucket(limits.max_events_per_second, limits.burst, self._clock)
            self._delivery[guest] = bucket
        return InterruptOutbox(guest, bucket)

    def warn(self, guest: str, kind: str, message: str, *args: object) -> None:
        """Log a guest-triggered warning through the rate-limited log (per guest and kind).

        At most ``warning_burst`` lines at once and ``warnings_per_second`` after
        that per (guest, ``kind``); the rest are counted and summarised
        (:mod:`pciback._ratelog`).
        """
        scope = f"guest {guest}"
        if self.guest_log.log(scope, kind, logging.WARNING, "guest %s: " + message, guest, *args):
            self.stats.warnings_logged += 1
        else:
            self.stats.warnings_suppressed += 1

    # -- guest operations (the dispatcher checked ownership: the device is on the bus) ----

    def enable(
        self,
        served: ServedDevice,
        outbox: InterruptOutbox,
        mode: int,
        vectors: int,
        ports: Sequence[Port] = (),
    ) -> int:
        """Enable ``mode`` with ``vectors`` vectors; returns the vectors granted.

        On failure nothing changes and the ports are closed (they were the
        guest's; keeping them would leak fds).
        """
        try:
            granted, cap = self._check_enable(served, mode, vectors, ports)
        except InterruptError as exc:
            for port in ports:
                port.close()
            self.stats.refused += 1
            self.warn(
                outbox.guest,
                "refused interrupt enables",
                "interrupt enable on %s refused: %s",
                served.id,
                exc.message,
            )
            raise
        device = self.device(served)
        device.clear()
        assert served.address is not None
        device.bind(outbox, served.address.pack(), ports)
        table = 0
        if mode == IRQ_MODE_MSIX:
            assert cap is not None
            table = (cap.control & MsixControl.TABLE_SIZE_MASK) + 1
        self.stats.enables += 1
        device.enable(mode, granted, table)
        return granted

    def _check_enable(
        self, served: ServedDevice, mode: int, vectors: int, ports: Sequence[Port]
    ) -> tuple[int, _CapInfo | None]:
        state = self.device(served)
        name = MODE_NAMES[mode]
        if state.mode == mode:
            raise InterruptError(
                f"{name} is already enabled on {served.address}; disable it before enabling "
                "it again"
            )
        if state.mode is not None:
            raise InterruptError(
                f"cannot enable {name} on {served.address}: {MODE_NAMES[state.mode]} is enabled, "
                "and INTx, MSI and MSI-X are mutually exclusive; disable it first"
            )
        if ports and len(ports) != vectors:
            raise InterruptError(
                f"{len(ports)} eventfds came with a request for {vectors} vector(s); send "
                "exactly one eventfd per vector"
            )
        access = served.access
        cap: _CapInfo | None = None
        if mode == IRQ_MODE_INTX:
            if not access.config_read(Reg.INTERRUPT_PIN, 1):
                raise InterruptError(f"{served.address} has no interrupt pin, so no INTx")
            if vectors != 1:
                raise InterruptError(f"INTx has exactly one vector, not {vectors}")
        elif mode == IRQ_MODE_MSI:
            cap = self._capability(served, CapId.MSI)
            if cap is None:
                raise InterruptError(f"{served.address} has no MSI capability; use INTx")
            capable = msi_vectors_capable(cap.control)
            if vectors & (vectors - 1) or vectors > capable:
                raise InterruptError(
                    f"MSI vectors must be a power of two up to the {capable} the device can "
                    f"use (multiple message capable); {vectors} is not"
                )
        else:
            cap = self._capability(served, CapId.MSIX)
            if cap is None:
                raise InterruptError(f"{served.address} has no MSI-X capability; use MSI or INTx")
            if not access.config_read(Reg.COMMAND, 2) & Command.MEMORY:
                raise InterruptError(
                    f"MSI-X on {served.address} needs memory decode: set Command.MEMORY "
                    "(bit 1) in the command register first (the MSI-X table lives in a BAR)"
                )
            table = (cap.control & MsixControl.TABLE_SIZE_MASK) + 1
            if vectors > table:
                raise InterruptError(
                    f"{vectors} MSI-X vectors asked, but the device's table has {table} entries"
                )
        return vectors, cap

    def disable(self, served: ServedDevice, guest: str, mode: int) -> bool:
        """Disable ``mode``. Disabling a mode that is off does nothing (returns False)."""
        state = self.device(served)
        if state.mode != mode:
            self.warn(
                guest,
                "disables of modes not enabled",
                "disable of %s on %s, which is not enabled: nothing to do",
                MODE_NAMES[mode],
                served.id,
            )
            return False
        state.clear()
        self.stats.disables += 1
        return True

    def eoi(self, served: ServedDevice, guest: str, vector: int) -> None:
        """End of interrupt. INTx: unmask the line; if still asserted it fires again."""
        state = self.device(served)
        if state.mode == IRQ_MODE_INTX:
            if vector != 0:
                raise InterruptError(f"INTx has only vector 0; EOI of vector {vector} refused")
            if not state.in_service:
                state.stats.spurious_eoi += 1
                self.warn(
                    guest,
                    "spurious EOIs",
                    "spurious INTx EOI on %s (nothing in service)",
                    served.id,
                )
                return
            state.eoi_intx()
            return
        if state.mode is None:
            state.stats.spurious_eoi += 1
            self.warn(
                guest, "spurious EOIs", "EOI on %s, which has no interrupt mode enabled", served.id
            )
            return
        if not 0 <= vector < state.vectors:
            raise InterruptError(
                f"EOI of vector {vector}, but {state.vectors} {MODE_NAMES[state.mode]} vector(s) "
                "are enabled",
                code=ErrorCode.INVALID_OFFSET,
            )
        # MSI and MSI-X are edge-triggered: nothing to unmask.

    def mask(self, served: ServedDevice, vector: int, masked: bool) -> None:
        """Mask/unmask one vector (or the MSI-X function); unmasking delivers pending bits."""
        state = self.device(served)
        if state.mode == IRQ_MODE_MSIX:
            if vector == FUNCTION_MASK_VECTOR:
                state.mask_function(masked)
            else:
                if not 0 <= vector < state.table_size:
                    raise InterruptError(
                        f"MSI-X vector {vector} is outside the device's table of "
                        f"{state.table_size} entries",
                        code=ErrorCode.INVALID_OFFSET,
                    )
                state.mask(vector, masked)
        elif state.mode == IRQ_MODE_MSI:
            cap = self._capability(served, CapId.MSI)
            if cap is None or not cap.control & MsiControl.PER_VECTOR_MASK:
                raise InterruptError(f"{served.address}'s MSI capability has no per-vector masking")
            if vector == FUNCTION_MASK_VECTOR or not 0 <= vector < state.vectors:
                raise InterruptError(
                    f"MSI vector {vector} is outside the {state.vectors} enabled vector(s)",
                    code=ErrorCode.INVALID_OFFSET,
                )
            state.mask(vector, masked)
        else:
            name = "INTx" if state.mode == IRQ_MODE_INTX else "no interrupt mode"
            raise InterruptError(
                f"masking needs MSI-X (or maskable MSI) enabled on {served.address}; it has "
                f"{name} (INTx is masked by not sending its EOI)"
            )

    def reset_device(self, served: ServedDevice) -> None:
        """Forget all interrupt state (the device was reset or left its guest)."""
        state = self._devices.get(id(served))
        if state is not None:
            state.clear()

    def forget_device(self, served: ServedDevice) -> None:
        """The backend stopped serving ``served`` (a reload removed it): drop its state."""
        state = self._devices.pop(id(served), None)
        if state is not None:
            state.clear()

    def release_outbox(self, outbox: InterruptOutbox) -> None:
        """A session ended: every device bound to it stops delivering and is disabled."""
        for state in self._devices.values():
            if state.bound_to(outbox):
                state.clear()
        outbox.close()

    # -- capability state ----------------------------------------------------------------

    @staticmethod
    def _capability(served: ServedDevice, cap_id: int) -> _CapInfo | None:
        """The capability as the guest sees it (hidden capabilities do not exist)."""
        policed = getattr(served.access, "policed", None)
        offset: int | None = None
        if policed is not None:
            st = policed.msi_state() if cap_id == CapId.MSI else policed.msix_state()
            offset = st.offset if st is not None else None
        else:
            found = walk_capabilities(served.access.config_image()).find(cap_id)
            offset = found.offset if found is not None else None
        if offset is None:
            return None
        return _CapInfo(offset, served.access.config_read(offset + 2, 2))
