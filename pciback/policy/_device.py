"""One device as one guest sees it: a provider behind its compiled policy.

:class:`PolicedDevice` answers a guest's config reads and writes. Reads
compose device bits, virtual bits and zeros per the field table; writes are
checked against it and either refused (:class:`~shared.pci.AccessDeniedError`,
code ``ACCESS_DENIED``, plus an audit-log entry) or carried out: device-bound
bits go to the provider, virtual bits to this object's state. BARs, the ROM,
the interrupt line and capability links live only here. The MSI and MSI-X
enable bits, MSI's vector count, message and mask register are the device's
one :class:`~pciback.devices.InterruptState`: reads show it and writes change
it (while no IRQ router manages the device; then only the router's interrupt
operations change the enable and mask bits, and such writes are ignored).

Not thread- or task-safe by itself: the service serialises accesses to one
device (its per-device lock), as it does for the provider.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pciback.devices import BarKind, DeviceProvider, MsiRegisters, MsixRegisters
from shared.pci import (
    AccessDeniedError,
    CapId,
    Field,
    FieldTable,
    apply_read,
    apply_write,
    check_access,
    msi_layout,
)
from shared.protocol import IRQ_MODE_MSI, IRQ_MODE_MSIX

from ._audit import AuditLog
from ._capregs import CapInstance
from ._compile import CompiledPolicy, compile_policy
from ._config import PolicyConfig, QuirkConfig
from ._rules import Register

__all__ = ["PolicedDevice", "MsiState", "MsixState"]

_log = logging.getLogger("pcisplit.policy")


@dataclass(frozen=True, slots=True)
class MsiState:
    """The guest's view of MSI: where the capability is, and the device's interrupt state."""

    offset: int
    enabled: bool
    vectors_enabled: int
    address: int
    data: int
    mask: int | None


@dataclass(frozen=True, slots=True)
class MsixState:
    """The guest's view of MSI-X: where the capability is, and the device's interrupt state."""

    offset: int
    enabled: bool
    function_masked: bool
    table_size: int


class PolicedDevice:
    """A :class:`DeviceProvider` seen through one guest's policy.

    ``guest`` and ``device`` are the names the audit log records (e.g. the
    guest identity and the device's virtual address). ``quirks`` are the
    global quirks; those matching the device's vendor:device apply.
    """

    def __init__(
        self,
        provider: DeviceProvider,
        config: PolicyConfig | None = None,
        *,
        guest: str,
        device: str,
        quirks: Sequence[QuirkConfig] = (),
        audit: AuditLog | None = None,
    ) -> None:
        self._provider = provider
        self._config = config if config is not None else PolicyConfig()
        self._quirks = tuple(quirks)
        self.guest = guest
        self.device = device
        self._audit = audit if audit is not None else AuditLog()
        self._compiled = self._compile()
        self._virtual = bytearray(self._compiled.virtual)
        self._interrupt_registers()

    def _compile(self) -> CompiledPolicy:
        compiled = compile_policy(
            self._provider.config_image(),
            self._provider.bars(),
            self._provider.rom_size(),
            self._config,
            self._quirks,
        )
        for name in compiled.unmatched:
            _log.warning(
                "%s: policy entry %r matches nothing on device %s (guest %s); ignored",
                self._config.where,
                name,
                self.device,
                self.guest,
            )
        return compiled

    # ------------------------------------------------------------------ introspection
    @property
    def provider(self) -> DeviceProvider:
        return self._provider

    @property
    def config(self) -> PolicyConfig:
        return self._config

    @property
    def config_size(self) -> int:
        return self._compiled.table.size

    @property
    def table(self) -> FieldTable:
        """The compiled field table (what the guest may do to each register)."""
        return self._compiled.table

    @property
    def compiled(self) -> CompiledPolicy:
        return self._compiled

    def describe(self) -> list[Field]:
        """Every register of this device as the guest's policy sees it, in offset order."""
        return list(self._compiled.table.fields)

    # ------------------------------------------------------------------ guest accesses
    def config_read(self, offset: int, size: int) -> int:
        """A guest config read (aligned 1/2/4 bytes)."""
        table = self._compiled.table
        check_access(offset, size, table.size)
        if offset < self._irq_end and offset + size > self._irq_start:
            self._show_interrupt_state(offset, offset + size)
        device_value = (
            self._provider.config_read(offset, size) if table.device_read_mask(offset, size) else 0
        )
        return apply_read(table, offset, size, device_value, self._virtual)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest config write. Raises :class:`AccessDeniedError` when the policy refuses it."""
        table = self._compiled.table
        check_access(offset, size, table.size)
        irq = offset < self._irq_end and offset + size > self._irq_start
        if irq:
            self._show_interrupt_state(offset, offset + size)
        device_value = self._provider.config_read(offset, size)
        try:
            plan = apply_write(table, offset, size, value, device_value, self._virtual)
        except AccessDeniedError as exc:
            self._audit.denied(
                guest=self.guest,
                device=self.device,
                offset=offset,
                size=size,
                value=value,
                rule=exc.rule,
            )
            raise
        for write in plan.device_writes:
            self._provider.config_write(write.offset, write.size, write.value)
        plan.apply_virtual(self._virtual)
        if irq:
            self._store_interrupt_state(offset, size)

    def program_firmware(
        self,
        addresses: dict[int, int],
        *,
        interrupt_line: int | None = None,
    ) -> None:
        """Set what firmware sets before the guest runs (not a guest access: no policy check).

        ``addresses`` maps a BAR index (0-5) or 6 (the expansion ROM, left
        disabled as firmware leaves it) to its guest-physical address. The
        address bits go into the guest's virtual BAR registers; the flag bits
        stay. ``interrupt_line`` sets the virtual Interrupt Line. The decode
        bits of Command are the device's own, so the caller sets them on the
        provider.
        """
        for index, address in addresses.items():
            register = self._register("rom" if index == 6 else f"bar{index}")
            if register is None:
                continue
            mask = 0
            for rule in register.rules:
                if rule.name.endswith(".address"):
                    mask |= rule.mask
            self._set_virtual(register.offset, mask, address & 0xFFFF_FFFF)
            if index < 6 and (address >> 32 or self._is_mem64(index)):
                upper = self._register(f"bar{index + 1}")
                if upper is not None and upper.rules[0].name == f"bar{index + 1}.address":
                    self._set_virtual(upper.offset, upper.rules[0].mask, address >> 32)
        if interrupt_line is not None:
            self._set_virtual(0x3C, 0xFF, interrupt_line, size=1)

    def _register(self, name: str) -> Register | None:
        for register in self._compiled.registers:
            if register.name == name:
                return register
        return None

    def _is_mem64(self, index: int) -> bool:
        return any(
            spec.index == index and spec.kind is BarKind.MEM64 for spec in self._provider.bars()
        )

    def _set_virtual(self, offset: int, mask: int, value: int, size: int = 4) -> None:
        old = self._virtual_int(offset, size)
        new = (old & ~mask) | (value & mask)
        self._virtual[offset : offset + size] = new.to_bytes(size, "little")

    def guest_config_image(self) -> bytes:
        """The whole config space exactly as the guest reads it (for snapshots and lspci)."""
        return b"".join(
            self.config_read(off, 4).to_bytes(4, "little")
            for off in range(0, self._compiled.table.size, 4)
        )

    def reset(self) -> None:
        """Forget the guest's virtual state (call after the provider was reset or reassigned)."""
        self._compiled = self._compile()
        self._virtual = bytearray(self._compiled.virtual)
        self._interrupt_registers()

    # ------------------------------------------------------------------ interrupt state
    def _interrupt_registers(self) -> None:
        """Find the visible MSI and MSI-X capabilities whose registers show the state."""
        self._msi_regs: MsiRegisters | None = None
        self._msix_regs: MsixRegisters | None = None
        spans: list[tuple[int, int]] = []
        prefixes: list[str] = []
        inst = self._cap_instance(CapId.MSI)
        if inst is not None:
            off = inst.cap.offset
            self._msi_regs = MsiRegisters(off, self._provider.config_read(off + 2, 2))
            spans.append((self._msi_regs.start, self._msi_regs.end))
            prefixes.append(inst.prefix + ".")
        inst = self._cap_instance(CapId.MSIX)
        if inst is not None:
            off = inst.cap.offset
            self._msix_regs = MsixRegisters(off, self._provider.config_read(off + 2, 2))
            spans.append((self._msix_regs.start, self._msix_regs.end))
            prefixes.append(inst.prefix + ".")
        # Accesses to bytes [_irq_start, _irq_end) involve the interrupt state.
        self._irq_start = min((s for s, _ in spans), default=0)
        self._irq_end = max((e for _, e in spans), default=0)
        # The (offset, width) of the capabilities' own registers: a malformed list can
        # clip a capability, and the bytes it lost belong to someone else.
        self._irq_own = frozenset(
            (f.offset, f.width)
            for f in self._compiled.table.fields
            if f.name.startswith(tuple(prefixes))
        )

    def _interrupt_overlays(self) -> list[tuple[int, int, int, int]]:
        state = self._provider.interrupt_state
        overlays = []
        if self._msi_regs is not None:
            overlays += self._msi_regs.overlays(state, pending=False)
        if self._msix_regs is not None:
            overlays += self._msix_regs.overlays(state)
        return overlays

    def _show_interrupt_state(self, lo: int = 0, hi: int = 0x1000) -> None:
        """Lay the device's interrupt state over the virtual registers in ``[lo, hi)``."""
        own = self._irq_own
        for offset, width, bits, value in self._interrupt_overlays():
            if offset < hi and offset + width > lo and (offset, width) in own:
                self._set_virtual(offset, bits, value, size=width)

    def _store_interrupt_state(self, offset: int, size: int) -> None:
        """A guest write touched the interrupt registers: the state takes what changed."""
        state = self._provider.interrupt_state
        own = self._irq_own
        # A register the capability lost to a malformed list reads as the state has it.
        current = {(o, w): v for o, w, _, v in self._interrupt_overlays()}

        def read(off: int, width: int) -> int:
            if (off, width) in own:
                return self._virtual_int(off, width)
            return current.get((off, width), 0)

        if self._msi_regs is not None:
            ready = self._msi_regs.store(state, read, offset, size)
            if ready:
                self._provider.signal_unmasked(IRQ_MODE_MSI, ready)
        if self._msix_regs is not None:
            ready = self._msix_regs.store(state, read, offset, size)
            if ready:
                self._provider.signal_unmasked(IRQ_MODE_MSIX, ready)
        self._show_interrupt_state()

    # ------------------------------------------------------------------ virtual state
    def _virtual_int(self, offset: int, size: int) -> int:
        return int.from_bytes(self._virtual[offset : offset + size], "little")

    def bar_address(self, index: int) -> int | None:
        """The address the guest programmed into BAR ``index`` (None when not implemented)."""
        for spec in self._provider.bars():
            if spec.index != index:
                continue
            flag_bits = 0x3 if spec.kind is BarKind.IO else 0xF
            low = self._virtual_int(0x10 + 4 * index, 4) & ~flag_bits
            if spec.kind is BarKind.MEM64:
                return low | (self._virtual_int(0x14 + 4 * index, 4) << 32)
            return low
        return None

    def _cap_instance(self, cap_id: int) -> CapInstance | None:
        for inst in self._compiled.capabilities:
            if not inst.cap.extended and inst.cap.id == cap_id:
                if inst in self._compiled.hidden:
                    return None
                return inst
        return None

    def msi_state(self) -> MsiState | None:
        """MSI as the guest sees it, or None without a (visible) MSI capability.

        A read-only view of the device's :class:`~pciback.devices.InterruptState`.
        """
        regs = self._msi_regs
        if regs is None:
            return None
        off = regs.offset
        state = self._provider.interrupt_state
        layout = msi_layout(self._provider.config_read(off + 2, 2))
        on = state.mode == IRQ_MODE_MSI
        return MsiState(
            off,
            on,
            1 << min(state.msi_mme, 5),
            state.msi_address,
            state.msi_data,
            state.masked & 0xFFFF_FFFF if layout.mask is not None else None,
        )

    def msix_state(self) -> MsixState | None:
        """MSI-X as the guest sees it, or None without a (visible) MSI-X capability.

        A read-only view of the device's :class:`~pciback.devices.InterruptState`.
        """
        regs = self._msix_regs
        if regs is None:
            return None
        state = self._provider.interrupt_state
        on = state.mode == IRQ_MODE_MSIX
        return MsixState(regs.offset, on, state.function_masked, regs.table_size)
