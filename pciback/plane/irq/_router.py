"""The IRQ router: device interrupt state, the XSA-157 rules, ownership on every delivery.

:class:`DeviceInterrupts` (one per served device) is the device model's
interrupt sink and holds what the guest set: mode, vectors, masks, pending
bits and the INTx in-service latch. :class:`IrqRouter` (one per backend)
carries out the guest's interrupt operations and owns the per-guest rate
limits. Everything on the device side is synchronous and never blocks: the
sink is called from register handlers under the device lock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from pciback._ratelog import RateLimitedLog
from pciback.devices import EmulatedDevice
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
    """One device's interrupt state; the device model's :class:`InterruptSink`.

    Mode, vectors, masks and pending bits are what the guest set through the
    interrupt operations; the binding says which session receives them.
    """

    def __init__(self, served: ServedDevice) -> None:
        self._served = served
        self.mode: int | None = None
        self.vectors = 0
        self.table_size = 0
        self._binding: _Binding | None = None
        self._level = False
        self._in_service = False
        self._masked = 0  # bit per vector (MSI-X / maskable MSI)
        self._pending = 0
        self._function_masked = False
        self.stats = InterruptStatistics()

    def statistics(self) -> InterruptStatistics:
        return self.stats

    # -- the device model's side (InterruptSink) ------------------------------------------

    def assert_intx(self) -> None:
        """Level-triggered: one event per assertion until the guest EOIs (late EOI)."""
        self.stats.intx_asserts += 1
        self._level = True
        if self.mode == IRQ_MODE_INTX and not self._in_service:
            self._in_service = True
            self._deliver(0)

    def deassert_intx(self) -> None:
        self._level = False

    def signal_msi(self, vector: int) -> None:
        self.stats.msi_signals += 1
        if self.mode != IRQ_MODE_MSI or not 0 <= vector < self.vectors:
            self.stats.dropped_disabled += 1
            return
        self._fire(vector)

    def signal_msix(self, vector: int) -> None:
        """Signal MSI-X table entry ``vector``; it must lie inside the table (XSA-164)."""
        self.stats.msix_signals += 1
        if self.mode != IRQ_MODE_MSIX:
            self.stats.dropped_disabled += 1
            return
        if not 0 <= vector < self.table_size:
            raise InterruptError(
                f"MSI-X vector {vector} is outside the device's table of {self.table_size} "
                "entries; the model signalled an entry that does not exist",
                code=ErrorCode.INVALID_OFFSET,
            )
        if vector >= self.vectors:
            self.stats.dropped_disabled += 1
            return
        self._fire(vector)

    def _fire(self, vector: int) -> None:
        bit = 1 << vector
        if self._function_masked or self._masked & bit:
            self._pending |= bit
            self.stats.pending_set += 1
            return
        self._deliver(vector)

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
            self._clear()
            return
        self.stats.delivered += 1
        binding.outbox.post(binding.device, vector)

    # -- state --------------------------------------------------------------------------

    @property
    def bound_guest(self) -> str | None:
        """The guest whose session receives this device's interrupts, if any."""
        return self._binding.guest if self._binding is not None else None

    @property
    def level(self) -> bool:
        """The INTx line level the model last drove."""
        return self._level

    @property
    def in_service(self) -> bool:
        """INTx: an event was delivered and the guest has not EOI'd it yet."""
        return self._in_service

    def pending_bits(self) -> int:
        """The PBA: a bit per vector that fired while masked."""
        return self._pending

    def masked_bits(self) -> int:
        return self._masked

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def _unbind(self) -> None:
        binding, self._binding = self._binding, None
        if binding is not None:
            binding.outbox.unbind(binding.device)

    def _clear(self) -> None:
        self._unbind()
        self.mode = None
        self.vectors = 0
        self.table_size = 0
        self._in_service = False
        self._masked = 0
        self._pending = 0
        self._function_masked = False


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
        state = self.device(served)
        state._clear()
        assert served.address is not None
        packed = served.address.pack()
        state._binding = _Binding(outbox.guest, packed, outbox)
        if ports:
            outbox.bind_ports(packed, ports)
        state.mode = mode
        state.vectors = granted
        if mode == IRQ_MODE_MSIX:
            assert cap is not None
            state.table_size = (cap.control & MsixControl.TABLE_SIZE_MASK) + 1
        self._write_control(served, mode, cap, enable=True, vectors=granted)
        self.stats.enables += 1
        if mode == IRQ_MODE_INTX and state._level:
            # Level-triggered: a line that is already asserted interrupts at once.
            state._in_service = True
            state._deliver(0)
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
        cap = None
        if mode != IRQ_MODE_INTX:
            cap = self._capability(served, CapId.MSI if mode == IRQ_MODE_MSI else CapId.MSIX)
        state._clear()
        self._write_control(served, mode, cap, enable=False, vectors=1)
        self.stats.disables += 1
        return True

    def eoi(self, served: ServedDevice, guest: str, vector: int) -> None:
        """End of interrupt. INTx: unmask the line; if still asserted it fires again."""
        state = self.device(served)
        if state.mode == IRQ_MODE_INTX:
            if vector != 0:
                raise InterruptError(f"INTx has only vector 0; EOI of vector {vector} refused")
            if not state._in_service:
                state.stats.spurious_eoi += 1
                self.warn(
                    guest,
                    "spurious EOIs",
                    "spurious INTx EOI on %s (nothing in service)",
                    served.id,
                )
                return
            state._in_service = False
            if state._level:
                state._in_service = True
                state._deliver(0)
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
                state._function_masked = masked
                cap = self._capability(served, CapId.MSIX)
                self._write_control(served, IRQ_MODE_MSIX, cap, enable=True, vectors=state.vectors)
            else:
                if not 0 <= vector < state.table_size:
                    raise InterruptError(
                        f"MSI-X vector {vector} is outside the device's table of "
                        f"{state.table_size} entries",
                        code=ErrorCode.INVALID_OFFSET,
                    )
                state._masked = (
                    state._masked | (1 << vector) if masked else state._masked & ~(1 << vector)
                )
        elif state.mode == IRQ_MODE_MSI:
            cap = self._capability(served, CapId.MSI)
            if cap is None or not cap.control & MsiControl.PER_VECTOR_MASK:
                raise InterruptError(f"{served.address}'s MSI capability has no per-vector masking")
            if vector == FUNCTION_MASK_VECTOR or not 0 <= vector < state.vectors:
                raise InterruptError(
                    f"MSI vector {vector} is outside the {state.vectors} enabled vector(s)",
                    code=ErrorCode.INVALID_OFFSET,
                )
            state._masked = (
                state._masked | (1 << vector) if masked else state._masked & ~(1 << vector)
            )
        else:
            name = "INTx" if state.mode == IRQ_MODE_INTX else "no interrupt mode"
            raise InterruptError(
                f"masking needs MSI-X (or maskable MSI) enabled on {served.address}; it has "
                f"{name} (INTx is masked by not sending its EOI)"
            )
        if not masked:
            self._deliver_unmasked(state)

    @staticmethod
    def _deliver_unmasked(state: DeviceInterrupts) -> None:
        if state._function_masked:
            return
        ready = state._pending & ~state._masked
        if not ready:
            return
        state._pending &= ~ready
        while ready:
            low = ready & -ready
            state._deliver(low.bit_length() - 1)
            ready ^= low

    def reset_device(self, served: ServedDevice) -> None:
        """Forget all interrupt state (the device was reset or left its guest)."""
        state = self._devices.get(id(served))
        if state is not None:
            state._clear()

    def forget_device(self, served: ServedDevice) -> None:
        """The backend stopped serving ``served`` (a reload removed it): drop its state."""
        state = self._devices.pop(id(served), None)
        if state is not None:
            state._clear()

    def release_outbox(self, outbox: InterruptOutbox) -> None:
        """A session ended: every device bound to it stops delivering and is disabled."""
        for state in self._devices.values():
            binding = state._binding
            if binding is not None and binding.outbox is outbox:
                served = state._served
                mode = state.mode
                state._clear()
                if mode is not None and served.guest == outbox.guest:
                    self._restore_control(served, mode)
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

    def _restore_control(self, served: ServedDevice, mode: int) -> None:
        if mode == IRQ_MODE_INTX:
            return
        cap = self._capability(served, CapId.MSI if mode == IRQ_MODE_MSI else CapId.MSIX)
        self._write_control(served, mode, cap, enable=False, vectors=1)

    def _write_control(
        self, served: ServedDevice, mode: int, cap: _CapInfo | None, *, enable: bool, vectors: int
    ) -> None:
        """Mirror the mode into the capability's control register.

        The guest's view (the policy's virtual MSI/MSI-X control) is written
        through the access path so config reads of the capability show it, and
        an emulated model's own register so its ``msi_enabled`` sees it. Real
        host devices are never written.
        """
        if cap is None or mode == IRQ_MODE_INTX:
            return
        state = self.device(served)
        current = served.access.config_read(cap.offset + 2, 2)
        if mode == IRQ_MODE_MSI:
            bits = int(MsiControl.ENABLE | MsiControl.MULTIPLE_ENABLE_MASK)
            value = (int(math.log2(vectors)) << 4) | MsiControl.ENABLE if enable else 0
        else:
            bits = int(MsixControl.ENABLE | MsixControl.FUNCTION_MASK)
            value = MsixControl.ENABLE if enable else 0
            if enable and state._function_masked:
                value |= MsixControl.FUNCTION_MASK
        new = (current & ~bits) | int(value)
        try:
            served.access.config_write(cap.offset + 2, 2, new)
        except PcisplitError as exc:
            # A read-only policy preset refuses guest writes to the control register;
            # the router's state is authoritative, so only the mirror is missing.
            log.debug("%s: control register mirror refused: %s", served.id, exc)
        provider = served.provider
        if isinstance(provider, EmulatedDevice) and served.access is not provider:
            raw = provider.config_read(cap.offset + 2, 2)
            provider.config_write(cap.offset + 2, 2, (raw & ~bits) | int(value))
