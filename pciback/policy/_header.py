"""The configuration header's registers (types 0, 1 and 2), as policy rules.

A CardBus bridge (type 2) has one BAR (its socket registers), its capability
pointer at 0x14 and no expansion ROM; its bus numbers, memory and I/O windows,
bridge control and legacy-mode base are read-only to a guest, like a type 1
bridge's windows.

This table is the single place that says what a guest may do to each header
register; ``docs/policy.md`` shows it as a table. The choices, and why:

* IDs, class, revision and header type are read-only: they identify the
  device and drivers trust them.
* Command is shadowed (XSA-120): the guest drives I/O and memory decode and
  bus mastering; INTx-disable is virtual unless a policy allows it; every
  other bit (SERR, parity, MWI, ...) lives only in the guest's virtual copy.
* Status error bits are RW1C on the device; the capability-list bit is
  virtual because capability filtering may empty the list.
* BARs and the expansion ROM are entirely virtual: sizing answers from the
  provider's :class:`~pciback.devices.BarSpec` and no write reaches the device.
  They start unassigned (address 0, flag bits kept) so the host's physical
  addresses never leak.
* The interrupt line is virtual and starts at 0xff ("unknown / not connected"
  in the PCI spec), never the host's IRQ number.
"""

from __future__ import annotations

from pciback.devices import BarKind, BarSpec
from shared.errors import PciError
from shared.pci import (
    ROM_ENABLE,
    Access,
    Command,
    Status,
    bar_size_mask,
    rom_size_mask,
)

from ._rules import (
    Register,
    fixed,
    follows,
    passthrough,
    register,
    ro,
    ro_optional,
    rw1c,
    shadow,
)

__all__ = ["header_registers", "INTERRUPT_LINE_INIT", "HEADER_NAMES"]

#: Initial virtual interrupt line: 0xff means "unknown / not connected" (PCI 3.0 6.2.4).
INTERRUPT_LINE_INIT = 0xFF

_COMMAND_GUEST = int(Command.IO | Command.MEMORY | Command.MASTER | Command.INTX_DISABLE)
_STATUS_RW1C = int(
    Status.PARITY
    | Status.SIG_TARGET_ABORT
    | Status.REC_TARGET_ABORT
    | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)
_STATUS_OTHER = 0xFFFF & ~_STATUS_RW1C & ~int(Status.CAP_LIST)
_FULL32 = 0xFFFF_FFFF


def _common_top() -> list[Register]:
    """0x00-0x0f: identical in every header type."""
    return [
        register("vendor_id", 0x00, 2, doc="vendor ID"),
        register("device_id", 0x02, 2, doc="device ID"),
        register(
            "command",
            0x04,
            2,
            passthrough("command.io", Command.IO, "I/O space decode"),
            passthrough("command.memory", Command.MEMORY, "memory space decode"),
            passthrough("command.bus_master", Command.MASTER, "bus mastering (DMA)"),
            shadow(
                "command.intx_disable",
                Command.INTX_DISABLE,
                allow=Access.RW,
                doc="INTx disable: virtual unless allowed",
            ),
            shadow(
                "command.other",
                0xFFFF & ~_COMMAND_GUEST,
                doc="every other Command bit (XSA-120): virtual only",
            ),
            doc="Command (shadowed, XSA-120)",
        ),
        register(
            "status",
            0x06,
            2,
            rw1c("status.errors", _STATUS_RW1C, "error bits, write 1 to clear"),
            follows(
                "status.cap_list",
                Status.CAP_LIST,
                Access.EMULATED_RO,
                virtual=True,
                doc="capability list present (virtual: filtering may empty the list)",
            ),
            follows("status.other", _STATUS_OTHER, doc="read-only status bits"),
            doc="Status",
        ),
        register("revision_id", 0x08, 1, doc="revision ID"),
        register("class_code", 0x09, 3, doc="programming interface, subclass, class"),
        register(
            "cache_line_size",
            0x0C,
            1,
            passthrough("cache_line_size", 0xFF, "cache line size"),
        ),
        register("latency_timer", 0x0D, 1, ro_optional("latency_timer", 0xFF, doc="latency timer")),
        register("header_type", 0x0E, 1, doc="header type and multi-function bit"),
        register(
            "bist",
            0x0F,
            1,
            ro_optional("bist.start", 0x40, doc="start BIST: refused unless allowed"),
            follows("bist.other", 0xBF, doc="BIST capable and completion code"),
            doc="BIST",
        ),
    ]


def _bar_registers(specs: dict[int, BarSpec], count: int) -> list[Register]:
    regs: list[Register] = []
    index = 0
    while index < count:
        name = f"bar{index}"
        offset = 0x10 + 4 * index
        spec = specs.get(index)
        if spec is None:
            # Unimplemented: hardwired zero. Writes are accepted and ignored, as
            # hardware does, so that sizing every BAR works.
            regs.append(
                Register(
                    name,
                    offset,
                    4,
                    (fixed(name, _FULL32, init=0).with_policy(Access.EMULATED_RO, True),),
                    f"BAR{index} (not implemented: reads 0)",
                )
            )
            index += 1
            continue
        try:
            low = bar_size_mask(spec.size, spec.flags) & ~spec.flags & _FULL32
            high = (
                bar_size_mask(spec.size, spec.flags, is_64_upper=True)
                if spec.kind is BarKind.MEM64
                else None
            )
        except PciError as exc:
            raise PciError(f"BAR{index}: {exc.message}") from exc
        regs.append(_bar_dword(name, offset, low, spec.flags, f"BAR{index} ({spec.kind.value})"))
        if high is not None and index + 1 < count:
            upper = f"bar{index + 1}"
            regs.append(_bar_dword(upper, offset + 4, high, 0, f"BAR{index} upper 32 bits"))
            index += 1
        index += 1
    return regs


def _bar_dword(name: str, offset: int, address_mask: int, flags: int, doc: str) -> Register:
    rules = [shadow(f"{name}.address", address_mask, init=0, virtual=True, doc="guest address")]
    rest = _FULL32 & ~address_mask
    if rest:
        rules.append(
            follows(
                f"{name}.flags",
                rest,
                Access.EMULATED_RO,
                init=flags,
                virtual=True,
                doc="type/prefetch flags and size bits (read-only)",
            )
        )
    return register(name, offset, 4, *rules, doc=doc)


def _rom_register(offset: int, size: int) -> Register:
    if size == 0:
        return Register(
            "rom",
            offset,
            4,
            (fixed("rom", _FULL32, init=0).with_policy(Access.EMULATED_RO, True),),
            "expansion ROM (none: reads 0)",
        )
    address = rom_size_mask(size)
    return register(
        "rom",
        offset,
        4,
        shadow("rom.enable", ROM_ENABLE, init=0, virtual=True, doc="ROM decode enable"),
        shadow("rom.address", address, init=0, virtual=True, doc="guest ROM address"),
        follows(
            "rom.flags",
            _FULL32 & ~address & ~ROM_ENABLE,
            Access.EMULATED_RO,
            init=0,
            virtual=True,
            doc="reserved and size bits",
        ),
        doc="expansion ROM base address (virtual)",
    )


def _interrupt_registers() -> list[Register]:
    return [
        register(
            "interrupt_line",
            0x3C,
            1,
            shadow(
                "interrupt_line",
                0xFF,
                init=INTERRUPT_LINE_INIT,
                virtual=True,
                doc="the guest's own value, never the host IRQ",
            ),
        ),
        register("interrupt_pin", 0x3D, 1, doc="interrupt pin"),
    ]


def _cap_pointer(offset: int) -> Register:
    return register(
        "capabilities_pointer",
        offset,
        1,
        fixed("capabilities_pointer", 0xFF, doc="first capability (virtual: filtering)"),
    )


def header_registers(header_type: int, bars: list[BarSpec], rom_size: int) -> list[Register]:
    """The header registers of a device with this header-type byte, BARs and ROM size."""
    layout = header_type & 0x7F
    specs = {spec.index: spec for spec in bars}
    regs = _common_top()
    if layout == 1:
        regs += _bar_registers(specs, 2)
        regs += [
            register("primary_bus", 0x18, 1, doc="primary bus number"),
            register("secondary_bus", 0x19, 1, doc="secondary bus number"),
            register("subordinate_bus", 0x1A, 1, doc="subordinate bus number"),
            register(
                "secondary_latency_timer",
                0x1B,
                1,
                ro_optional("secondary_latency_timer", 0xFF),
            ),
            register("io_base", 0x1C, 1, doc="I/O window base"),
            register("io_limit", 0x1D, 1, doc="I/O window limit"),
            register(
                "secondary_status",
                0x1E,
                2,
                ro_optional("secondary_status.errors", _STATUS_RW1C, Access.RW1C),
                follows("secondary_status.other", 0xFFFF & ~_STATUS_RW1C),
                doc="secondary status",
            ),
            register("memory_base", 0x20, 2),
            register("memory_limit", 0x22, 2),
            register("pref_memory_base", 0x24, 2),
            register("pref_memory_limit", 0x26, 2),
            register("pref_base_upper32", 0x28, 4),
            register("pref_limit_upper32", 0x2C, 4),
            register("io_base_upper16", 0x30, 2),
            register("io_limit_upper16", 0x32, 2),
            _cap_pointer(0x34),
            _rom_register(0x38, rom_size),
            *_interrupt_registers(),
            register(
                "bridge_control",
                0x3E,
                2,
                ro("bridge_control", 0xFFFF, "bridge control (secondary bus reset!)"),
            ),
        ]
    elif layout == 2:
        regs += _bar_registers(specs, 1)
        regs += [
            _cap_pointer(0x14),
            register(
                "secondary_status",
                0x16,
                2,
                ro_optional("secondary_status.errors", _STATUS_RW1C, Access.RW1C),
                follows("secondary_status.other", 0xFFFF & ~_STATUS_RW1C),
                doc="secondary status",
            ),
            register("primary_bus", 0x18, 1, doc="PCI bus number"),
            register("secondary_bus", 0x19, 1, doc="CardBus bus number"),
            register("subordinate_bus", 0x1A, 1, doc="subordinate bus number"),
            register("cardbus_latency_timer", 0x1B, 1, ro_optional("cardbus_latency_timer", 0xFF)),
            register("memory_base0", 0x1C, 4, doc="CardBus memory window 0 base"),
            register("memory_limit0", 0x20, 4, doc="CardBus memory window 0 limit"),
            register("memory_base1", 0x24, 4, doc="CardBus memory window 1 base"),
            register("memory_limit1", 0x28, 4, doc="CardBus memory window 1 limit"),
            register("io_base0", 0x2C, 4, doc="CardBus I/O window 0 base"),
            register("io_limit0", 0x30, 4, doc="CardBus I/O window 0 limit"),
            register("io_base1", 0x34, 4, doc="CardBus I/O window 1 base"),
            register("io_limit1", 0x38, 4, doc="CardBus I/O window 1 limit"),
            *_interrupt_registers(),
            register(
                "bridge_control",
                0x3E,
                2,
                ro("bridge_control", 0xFFFF, "bridge control (CardBus reset!)"),
            ),
            register("subsystem_vendor_id", 0x40, 2),
            register("subsystem_id", 0x42, 2),
            register("legacy_mode_base", 0x44, 4, doc="16-bit PC Card legacy-mode base"),
        ]
    else:
        regs += _bar_registers(specs, 6)
        regs += [
            register("cardbus_cis", 0x28, 4, doc="CardBus CIS pointer"),
            register("subsystem_vendor_id", 0x2C, 2),
            register("subsystem_id", 0x2E, 2),
            _rom_register(0x30, rom_size),
            _cap_pointer(0x34),
            *_interrupt_registers(),
            register("min_gnt", 0x3E, 1),
            register("max_lat", 0x3F, 1),
        ]
    return regs


def _all_header_names() -> tuple[str, ...]:
    names: list[str] = []
    every_bar = [BarSpec(i, 4096) for i in range(6)]
    for layout in (0, 1, 2):
        for reg in header_registers(layout, every_bar, 4096):
            for name in (reg.name, *(r.name for r in reg.rules)):
                if name not in names:
                    names.append(name)
    return tuple(names)


#: Every rule or register name a header can have (for validating configurations).
HEADER_NAMES = _all_header_names()
