"""Capability registers as policy rules, and capability filtering.

Every capability the walk finds gets a header register (ID and next pointer,
both read from the virtual state so filtering can rewrite links) and either
modelled registers (PM, MSI, MSI-X, PCIe, VPD, AER) or one body register.
A hidden capability's bytes become HIDDEN (they read as zero and refuse
writes); the links around it are rewritten in the virtual state by the
compiler, with :func:`shared.pci.unlink_capability`.

A capability's extent is its known length when the spec fixes one, clipped at
the next capability (in address order) and the end of its space, so a
malformed or overlapping list never produces overlapping registers: bytes
already claimed are skipped. Nothing here raises on odd device contents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared.pci import (
    EXT_CAP_START,
    Access,
    Capability,
    CapabilityWalk,
    CapId,
    ExtCapId,
    MsiControl,
    msi_layout,
)

from ._rules import (
    Register,
    fixed,
    follows,
    hidden,
    register,
    ro,
    ro_optional,
    rw1c,
    shadow,
)

__all__ = [
    "CapInstance",
    "capability_instances",
    "capability_registers",
    "std_cap_name",
    "ext_cap_name",
    "CAPABILITY_NAMES",
    "CAPABILITY_RULE_SUFFIXES",
]

_STD_ALIASES = {CapId.EXP: "pcie"}
_EXT_ALIASES = {ExtCapId.ERR: "aer", ExtCapId.VNDR: "ext_vndr"}

#: Standard capabilities whose body a configuration may pass through (others are protected).
_STD_OPEN_BODIES = frozenset({CapId.VNDR, CapId.SATA, CapId.DBG, CapId.AGP, CapId.AGP3})
#: Extended capabilities whose body a configuration may pass through. The rest configure
#: the fabric, IOV, address translation or link and stay protected.
_EXT_OPEN_BODIES = frozenset(
    {ExtCapId.VNDR, ExtCapId.DVSEC, ExtCapId.PWR, ExtCapId.LTR, ExtCapId.DSN, ExtCapId.TPH}
)
_STD_LENGTHS: dict[int, int] = {
    CapId.PM: 8,
    CapId.MSIX: 12,
    CapId.VPD: 8,
    CapId.AF: 6,
    CapId.SSVID: 8,
    CapId.SATA: 8,
    CapId.SLOT_ID: 4,
    CapId.DBG: 4,
}
_EXT_LENGTHS: dict[int, int] = {
    ExtCapId.ERR: 0x48,
    ExtCapId.DSN: 0x0C,
    ExtCapId.ARI: 0x08,
    ExtCapId.LTR: 0x08,
    ExtCapId.L1SS: 0x10,
    ExtCapId.SRIOV: 0x40,
    ExtCapId.ATS: 0x08,
    ExtCapId.PASID: 0x08,
    ExtCapId.PRI: 0x10,
}
_STD_END = 0x100


def std_cap_name(cap_id: int) -> str:
    """The policy name of a standard capability (``"msi"``, ``"pcie"``, ``"cap2a"``)."""
    if cap_id == 0:
        return "null"
    try:
        member = CapId(cap_id)
    except ValueError:
        return f"cap{cap_id:02x}"
    return _STD_ALIASES.get(member, member.name.lower())


def ext_cap_name(cap_id: int) -> str:
    """The policy name of an extended capability (``"aer"``, ``"sriov"``, ``"ecap0032"``)."""
    if cap_id == 0:
        return "null"
    try:
        member = ExtCapId(cap_id)
    except ValueError:
        return f"ecap{cap_id:04x}"
    return _EXT_ALIASES.get(member, member.name.lower())


#: Every capability name a configuration may use in ``hide``.
CAPABILITY_NAMES = tuple([std_cap_name(c) for c in CapId] + [ext_cap_name(c) for c in ExtCapId])


@dataclass(frozen=True, slots=True)
class CapInstance:
    """One capability of one device: its walk entry, policy name and byte extent."""

    cap: Capability
    kind: str  # std_cap_name / ext_cap_name
    prefix: str  # kind, or kind@0xOFF for a second instance of the same kind
    end: int


def capability_instances(walk: CapabilityWalk, image: bytes) -> list[CapInstance]:
    """Name every walked capability of ``image`` and compute where its bytes end."""
    config_size = len(image)
    out: list[CapInstance] = []
    seen: set[str] = set()
    for chain, extended in ((walk.standard, False), (walk.extended, True)):
        space_end = min(config_size, 0x1000) if extended else min(config_size, _STD_END)
        starts = sorted({c.offset for c in chain})
        for cap in chain:
            kind = ext_cap_name(cap.id) if extended else std_cap_name(cap.id)
            prefix = kind if kind not in seen else f"{kind}@{cap.offset:#x}"
            seen.add(kind)
            later = [s for s in starts if s > cap.offset]
            end = min([space_end, *later[:1]])
            lengths = _EXT_LENGTHS if extended else _STD_LENGTHS
            known = lengths.get(cap.id)
            if not extended and cap.id == CapId.VNDR and cap.offset + 2 < config_size:
                # A vendor-specific capability states its own length in its third byte.
                known = image[cap.offset + 2] if image[cap.offset + 2] >= 3 else None
            if known is not None:
                end = min(end, cap.offset + known)
            out.append(CapInstance(cap, kind, prefix, end))
    return out


ReadFn = Callable[[int, int], int]


def _pm(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    return [
        register(f"{p}.pmc", off + 2, 2, doc="power management capabilities"),
        register(
            f"{p}.pmcsr",
            off + 4,
            2,
            shadow(
                f"{p}.pmcsr.control",
                0x1F03,
                allow=Access.RW,
                doc="power state, PME enable, data select: virtual unless allowed",
            ),
            rw1c(f"{p}.pmcsr.pme_status", 0x8000, "PME status, write 1 to clear"),
            follows(f"{p}.pmcsr.ro", 0x60FC, doc="read-only PMCSR bits"),
            doc="power management control/status (emulated)",
        ),
        register(f"{p}.pmcsr_bse", off + 6, 1),
        register(f"{p}.data", off + 7, 1),
    ]


def _msi(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    control = read(off + 2, 2)
    layout = msi_layout(control)
    regs = [
        register(
            f"{p}.control",
            off + 2,
            2,
            shadow(f"{p}.control.enable", MsiControl.ENABLE, init=0, doc="MSI enable (virtual)"),
            shadow(
                f"{p}.control.mme",
                MsiControl.MULTIPLE_ENABLE_MASK,
                init=0,
                doc="multiple message enable (virtual)",
            ),
            shadow(
                f"{p}.control.ext_data_enable",
                MsiControl.EXT_DATA_ENABLE,
                init=0,
                doc="extended message data enable (virtual)",
            ),
            follows(
                f"{p}.control.ro",
                0xFFFF
                & ~int(
                    MsiControl.ENABLE | MsiControl.MULTIPLE_ENABLE_MASK | MsiControl.EXT_DATA_ENABLE
                ),
                Access.EMULATED_RO,
                doc="capability bits, from the device",
            ),
            doc="MSI message control (emulated, XSA-128/129)",
        ),
        register(f"{p}.address", off + 4, 4, shadow(f"{p}.address", 0xFFFF_FFFF, init=0)),
    ]
    if layout.address_hi is not None:
        regs.append(
            register(
                f"{p}.address_hi",
                off + layout.address_hi,
                4,
                shadow(f"{p}.address_hi", 0xFFFF_FFFF, init=0),
            )
        )
    regs.append(register(f"{p}.data", off + layout.data, 2, shadow(f"{p}.data", 0xFFFF, init=0)))
    if layout.mask is not None or control & MsiControl.EXT_DATA_CAPABLE:
        regs.append(
            register(
                f"{p}.ext_data",
                off + layout.data + 2,
                2,
                shadow(f"{p}.ext_data", 0xFFFF, init=0),
            )
        )
    if layout.mask is not None and layout.pending is not None:
        regs.append(
            register(f"{p}.mask", off + layout.mask, 4, shadow(f"{p}.mask", 0xFFFF_FFFF, init=0))
        )
        regs.append(
            register(
                f"{p}.pending",
                off + layout.pending,
                4,
                fixed(f"{p}.pending", 0xFFFF_FFFF, init=0, virtual=False),
            )
        )
    return regs


def _msix(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    return [
        register(
            f"{p}.control",
            off + 2,
            2,
            shadow(f"{p}.control.enable", 0x8000, init=0, doc="MSI-X enable (virtual)"),
            shadow(f"{p}.control.function_mask", 0x4000, init=0, doc="function mask (virtual)"),
            follows(f"{p}.control.ro", 0x3FFF, Access.EMULATED_RO, doc="table size"),
            doc="MSI-X message control (emulated)",
        ),
        register(f"{p}.table", off + 4, 4, doc="table offset and BIR"),
        register(f"{p}.pba", off + 8, 4, doc="PBA offset and BIR"),
    ]


def _pcie(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    version = read(off + 2, 2) & 0xF
    regs = [
        register(f"{p}.flags", off + 0x02, 2),
        register(f"{p}.devcap", off + 0x04, 4),
        register(
            f"{p}.devctl",
            off + 0x08,
            2,
            shadow(
                f"{p}.devctl.control",
                0x7FFF,
                allow=Access.RW,
                doc="error reporting, payload, read request size...: virtual unless allowed",
            ),
            ro(f"{p}.devctl.flr", 0x8000, "initiate FLR: use the reset operation"),
            doc="PCIe device control (follows the policy)",
        ),
        register(
            f"{p}.devsta",
            off + 0x0A,
            2,
            rw1c(f"{p}.devsta.errors", 0x000F, "error detected bits, write 1 to clear"),
            follows(f"{p}.devsta.ro", 0xFFF0),
        ),
        register(f"{p}.linkcap", off + 0x0C, 4),
        register(
            f"{p}.linkctl",
            off + 0x10,
            2,
            shadow(f"{p}.linkctl", 0xFFFF, allow=Access.RW, doc="virtual unless allowed"),
        ),
        register(
            f"{p}.linksta",
            off + 0x12,
            2,
            rw1c(f"{p}.linksta.changes", 0xC000, "bandwidth change bits"),
            follows(f"{p}.linksta.ro", 0x3FFF),
        ),
        register(f"{p}.slotcap", off + 0x14, 4),
        register(f"{p}.slotctl", off + 0x18, 2, doc="slot control (power!)"),
        register(f"{p}.slotsta", off + 0x1A, 2),
        register(f"{p}.rootctl", off + 0x1C, 2),
        register(f"{p}.rootcap", off + 0x1E, 2),
        register(f"{p}.rootsta", off + 0x20, 4),
    ]
    if version >= 2:
        regs += [
            register(f"{p}.devcap2", off + 0x24, 4),
            register(
                f"{p}.devctl2",
                off + 0x28,
                2,
                shadow(f"{p}.devctl2", 0xFFFF, allow=Access.RW, doc="virtual unless allowed"),
            ),
            register(f"{p}.devsta2", off + 0x2A, 2),
            register(f"{p}.linkcap2", off + 0x2C, 4),
            register(
                f"{p}.linkctl2",
                off + 0x30,
                2,
                shadow(f"{p}.linkctl2", 0xFFFF, allow=Access.RW, doc="virtual unless allowed"),
            ),
            register(f"{p}.linksta2", off + 0x32, 2),
            register(f"{p}.slotcap2", off + 0x34, 4),
            register(f"{p}.slotctl2", off + 0x38, 2),
            register(f"{p}.slotsta2", off + 0x3A, 2),
        ]
    return regs


def _vpd(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    return [
        register(f"{p}.address", off + 2, 2, ro_optional(f"{p}.address", 0xFFFF)),
        register(f"{p}.data", off + 4, 4, ro_optional(f"{p}.data", 0xFFFF_FFFF)),
    ]


def _aer(p: str, off: int, end: int, read: ReadFn) -> list[Register]:
    def opt(name: str, rel: int, width: int, allow: Access = Access.RW) -> Register:
        full = (1 << (8 * width)) - 1
        return register(f"{p}.{name}", off + rel, width, ro_optional(f"{p}.{name}", full, allow))

    return [
        opt("uncorrectable_status", 0x04, 4, Access.RW1C),
        opt("uncorrectable_mask", 0x08, 4),
        opt("uncorrectable_severity", 0x0C, 4),
        opt("correctable_status", 0x10, 4, Access.RW1C),
        opt("correctable_mask", 0x14, 4),
        opt("capabilities", 0x18, 4),
        register(f"{p}.header_log", off + 0x1C, 16),
        opt("root_command", 0x2C, 4),
        opt("root_status", 0x30, 4, Access.RW1C),
        register(f"{p}.error_source", off + 0x34, 4),
        register(f"{p}.tlp_prefix_log", off + 0x38, 16),
    ]


_Builder = Callable[[str, int, int, ReadFn], list[Register]]
_STD_BUILDERS: dict[int, _Builder] = {
    CapId.PM: _pm,
    CapId.MSI: _msi,
    CapId.MSIX: _msix,
    CapId.EXP: _pcie,
    CapId.VPD: _vpd,
}
_EXT_BUILDERS: dict[int, _Builder] = {ExtCapId.ERR: _aer}


def _header(inst: CapInstance) -> Register:
    p, off = inst.prefix, inst.cap.offset
    if inst.cap.extended:
        return register(
            f"{p}.header",
            off,
            4,
            fixed(f"{p}.id", 0x000F_FFFF, doc="ID and version (virtual: filtering)"),
            fixed(f"{p}.next", 0xFFF0_0000, doc="next pointer (virtual: filtering)"),
        )
    return register(
        f"{p}.header",
        off,
        2,
        fixed(f"{p}.id", 0x00FF, doc="capability ID (virtual: filtering)"),
        fixed(f"{p}.next", 0xFF00, doc="next pointer (virtual: filtering)"),
    )


def _body(inst: CapInstance, start: int) -> Register | None:
    if inst.end <= start:
        return None
    width = inst.end - start
    full = (1 << (8 * width)) - 1
    cap_id = inst.cap.id
    open_bodies: frozenset[int] = _EXT_OPEN_BODIES if inst.cap.extended else _STD_OPEN_BODIES
    name = f"{inst.prefix}.body"
    rule = ro_optional(name, full) if cap_id in open_bodies else ro(name, full)
    return register(name, start, width, rule, doc=f"{inst.kind} registers")


def _hidden_registers(inst: CapInstance) -> list[Register]:
    off, end, p = inst.cap.offset, inst.end, inst.prefix
    regs: list[Register] = []
    if inst.cap.extended and off == EXT_CAP_START:
        # The extended list must start at 0x100: its header becomes a virtual Null
        # capability that links past the hidden one (see unlink_capability).
        regs.append(
            register(
                f"{p}.header",
                off,
                4,
                fixed(f"{p}.header", 0xFFFF_FFFF, doc="replaced by a Null capability"),
            )
        )
        off += 4
    if end > off:
        width = end - off
        regs.append(
            register(f"{p}.hidden", off, width, hidden(f"{p}.hidden", (1 << (8 * width)) - 1))
        )
    return regs


def capability_registers(
    instances: Iterable[CapInstance], hide: frozenset[str], read: ReadFn, claimed: bytearray
) -> list[Register]:
    """Registers of every capability; ``claimed`` marks bytes already taken (updated here).

    ``hide`` holds capability kinds or prefixes to hide. ``read(offset, size)``
    reads the device image (used for layout: MSI flags, PCIe version).
    """
    out: list[Register] = []
    for inst in instances:
        if inst.cap.id == 0 and inst.cap.extended:
            candidates = [_header(inst)]
        elif inst.kind in hide or inst.prefix in hide:
            candidates = _hidden_registers(inst)
        else:
            hdr = _header(inst)
            candidates = [hdr]
            builders = _EXT_BUILDERS if inst.cap.extended else _STD_BUILDERS
            builder = builders.get(inst.cap.id)
            if builder is not None:
                modelled = builder(inst.prefix, inst.cap.offset, inst.end, read)
                candidates += [r for r in modelled if r.end <= inst.end]
            else:
                body = _body(inst, hdr.end)
                if body is not None:
                    candidates.append(body)
        for reg in candidates:
            if reg.end > len(claimed) or any(claimed[reg.offset : reg.end]):
                continue  # malformed/overlapping list: the first claimant keeps the bytes
            claimed[reg.offset : reg.end] = b"\x01" * reg.width
            out.append(reg)
    return out


def _suffixes() -> dict[str, tuple[str, ...]]:
    """Rule/register name suffixes per capability kind, for validating configurations."""
    image = bytearray(0x1000)
    image[0x52:0x54] = (MsiControl.ADDR_64 | MsiControl.PER_VECTOR_MASK).to_bytes(2, "little")
    image[0x42] = 2  # PCIe version 2

    def read(offset: int, size: int) -> int:
        return int.from_bytes(image[offset : offset + size], "little")

    out: dict[str, tuple[str, ...]] = {}
    builders: list[tuple[str, _Builder, int]] = [
        (std_cap_name(i), b, 0x40 if i == CapId.EXP else 0x50) for i, b in _STD_BUILDERS.items()
    ] + [(ext_cap_name(i), b, 0x100) for i, b in _EXT_BUILDERS.items()]
    for kind, builder, off in builders:
        names: list[str] = []
        for reg in builder(kind, off, 0x1000, read):
            for name in (reg.name, *(r.name for r in reg.rules)):
                suffix = name[len(kind) + 1 :]
                if suffix not in names:
                    names.append(suffix)
        out[kind] = tuple(names)
    return out


#: For every modelled capability kind, the suffixes of its register and rule names.
CAPABILITY_RULE_SUFFIXES = _suffixes()
#: Suffixes every capability has.
GENERIC_SUFFIXES = ("header", "id", "next", "body")
