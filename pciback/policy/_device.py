"""One device as one guest sees it: a provider behind its compiled policy.

:class:`PolicedDevice` answers a guest's config reads and writes. Reads
compose device bits, virtual bits and zeros per the field table; writes are
checked against it and either refused (:class:`~shared.pci.AccessDeniedError`,
code ``ACCESS_DENIED``, plus an audit-log entry) or carried out: device-bound
bits go to the provider, virtual bits to this object's state. BARs, the ROM,
the interrupt line, MSI/MSI-X and capability links live only here.

Not thread- or task-safe by itself: the service serialises accesses to one
device (its per-device lock), as it does for the provider.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pciback.devices import BarKind, DeviceProvider
from shared.pci import (
    AccessDeniedError,
    CapId,
    Field,
    FieldTable,
    MsiControl,
    apply_read,
    apply_write,
    check_access,
    msi_layout,
)

from ._audit import AuditLog
from ._compile import CompiledPolicy, compile_policy
from ._config import PolicyConfig, QuirkConfig
from ._rules import Register

__all__ = ["PolicedDevice", "MsiState", "MsixState"]

_log = logging.getLogger("pcisplit.policy")


@dataclass(frozen=True, slots=True)
class MsiState:
    """The guest's virtual MSI programming (acted on by the interrupt operations)."""

    offset: int
    enabled: bool
    vectors_enabled: int
    address: int
    data: int
    mask: int | None


@dataclass(frozen=True, slots=True)
class MsixState:
    """The guest's virtual MSI-X control bits."""

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
        device_value = (
            self._provider.config_read(offset, size) if table.device_read_mask(offset, size) else 0
        )
        return apply_read(table, offset, size, device_value, self._virtual)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest config write. Raises :class:`AccessDeniedError` when the policy refuses it."""
        table = self._compiled.table
        check_access(offset, size, table.size)
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

    def _cap_offset(self, cap_id: int) -> int | None:
        for inst in self._compiled.capabilities:
            if not inst.cap.extended and inst.cap.id == cap_id:
                if inst in self._compiled.hidden:
                    return None
                return inst.cap.offset
        return None

    def msi_state(self) -> MsiState | None:
        """The guest's MSI programming, or None without a (visible) MSI capability."""
        off = self._cap_offset(CapId.MSI)
        if off is None:
            return None
        control = self._virtual_int(off + 2, 2)
        layout = msi_layout(control)
        address = self._virtual_int(off + 4, 4)
        if layout.address_hi is not None:
            address |= self._virtual_int(off + layout.address_hi, 4) << 32
        mask = self._virtual_int(off + layout.mask, 4) if layout.mask is not None else None
        return MsiState(
            off,
            bool(control & MsiControl.ENABLE),
            1 << min((control & MsiControl.MULTIPLE_ENABLE_MASK) >> 4, 5),
            address,
            self._virtual_int(off + layout.data, 2),
            mask,
        )

    def msix_state(self) -> MsixState | None:
        """The guest's MSI-X control bits, or None without a (visible) MSI-X capability."""
        off = self._cap_offset(CapId.MSIX)
        if off is None:
            return None
        control = self._virtual_int(off + 2, 2)
        return MsixState(off, bool(control & 0x8000), bool(control & 0x4000), (control & 0x7FF) + 1)
