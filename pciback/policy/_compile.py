"""Compile a device's registers, its preset, allow/deny lists and quirks into a field table.

Order, each step acting on the result of the previous one:

1. registers: the header (from the header type, BARs and ROM size) and every
   capability the walk finds, hidden ones as HIDDEN bytes;
2. the preset (``default`` changes nothing; ``transparent-readonly`` turns
   every non-virtual rule into a device read and refuses all writes;
   ``permissive`` allows every rule that may reach the device and passes
   unlisted bytes through);
3. ``allow`` then ``deny`` by name;
4. quirks of this vendor:device, carving their mask out of the registers they
   cover (never out of a protected rule);
5. the virtual image: the device's bytes, the rules' initial values, and
   the capability lists with hidden entries unlinked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from pciback.devices import BarSpec
from shared.errors import ConfigFileError
from shared.pci import (
    Access,
    ConfigSpace,
    FieldTable,
    Reg,
    unlink_capability,
    walk_capabilities,
)

from ._capregs import CapInstance, capability_instances, capability_registers
from ._config import PolicyConfig, Preset, QuirkConfig
from ._header import header_registers
from ._rules import Register, Rule, ro

__all__ = ["CompiledPolicy", "compile_policy"]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """Everything a :class:`PolicedDevice` needs, derived once from the device and config."""

    table: FieldTable
    registers: tuple[Register, ...]
    virtual: bytes
    capabilities: tuple[CapInstance, ...]
    hidden: tuple[CapInstance, ...]
    #: Names in allow/deny/hide that this device does not have (not an error: policies are shared).
    unmatched: tuple[str, ...]
    quirks: tuple[QuirkConfig, ...]


def _apply_preset(rule: Rule, preset: Preset) -> Rule:
    if preset is Preset.TRANSPARENT_READONLY:
        if rule.access is Access.HIDDEN:
            return rule
        if rule.virtual:
            return rule.with_policy(rule.access, False)
        return rule.with_policy(Access.RO, False)
    if preset is Preset.PERMISSIVE:
        allow = rule.allow_access
        if allow is not None and allow.reaches_device:
            return rule.with_policy(allow, True)
    return rule


def _names(regs: Sequence[Register]) -> dict[str, list[tuple[int, int]]]:
    """name -> [(register index, rule index)] for register names and rule names."""
    index: dict[str, list[tuple[int, int]]] = {}
    for ri, reg in enumerate(regs):
        index.setdefault(reg.name, []).extend((ri, k) for k in range(len(reg.rules)))
        for k, rule in enumerate(reg.rules):
            if rule.name != reg.name:
                index.setdefault(rule.name, []).append((ri, k))
    return index


def _apply_lists(
    regs: list[Register], config: PolicyConfig, unmatched: list[str]
) -> list[Register]:
    rules = [list(reg.rules) for reg in regs]
    index = _names(regs)
    for key in ("allow", "deny"):
        for i, name in enumerate(getattr(config, key)):
            hits = index.get(name)
            if not hits:
                unmatched.append(name)
                continue
            changed = 0
            for ri, k in hits:
                rule = rules[ri][k]
                if key == "deny":
                    rules[ri][k] = rule.with_policy(rule.access, False)
                    changed += 1
                elif rule.allow_access is not None and rule.access is not Access.HIDDEN:
                    rules[ri][k] = rule.with_policy(rule.allow_access, True)
                    changed += 1
            if not changed:
                raise ConfigFileError(
                    f"{config.where}.allow[{i}]: {name!r} is read-only or protected and cannot "
                    "be allowed (see docs/policy.md for what each register permits)"
                )
    return [replace(reg, rules=tuple(r)) for reg, r in zip(regs, rules, strict=True)]


def _quirk_span(quirk: QuirkConfig, regs: Sequence[Register], size: int) -> tuple[int, int]:
    if quirk.register is None:
        if quirk.offset is None or quirk.size is None:
            raise ConfigFileError(f"{quirk.where}: give register = '<name>' or offset and size")
        if quirk.offset + quirk.size > size:
            raise ConfigFileError(
                f"{quirk.where}.offset: {quirk.offset:#x} is outside this device's "
                f"{size}-byte config space"
            )
        return quirk.offset, quirk.size
    for reg in regs:
        if reg.name == quirk.register:
            if reg.width > 4:
                raise ConfigFileError(
                    f"{quirk.where}.register: {quirk.register!r} is {reg.width} bytes wide; "
                    "a quirk covers one 1-, 2- or 4-byte register (use offset and size)"
                )
            return reg.offset, reg.width
    raise ConfigFileError(f"{quirk.where}.register: this device has no register {quirk.register!r}")


def _apply_quirk(quirk: QuirkConfig, regs: list[Register], size: int) -> list[Register]:
    offset, width = _quirk_span(quirk, regs, size)
    mask = quirk.mask
    if mask >> (8 * width):
        raise ConfigFileError(
            f"{quirk.where}.mask: {mask:#x} is wider than the {width}-byte register"
        )
    name = f"quirk.{quirk.label}"
    quirk_rule = Rule(name, mask, Access.RW, True, Access.RW, doc="quirk: guest writes through")
    end = offset + width
    overlapping = [r for r in regs if r.offset < end and offset < r.end]
    full = (1 << (8 * width)) - 1
    if not overlapping:
        extra = full & ~mask
        rules = [quirk_rule]
        if extra:
            # Enforced: a write that changes any bit outside the mask is refused.
            rules.append(ro(f"{name}.masked", extra, "outside the quirk mask"))
        return [*regs, Register(name, offset, width, tuple(rules), f"quirk ({quirk.where})")]
    if len(overlapping) > 1:
        names = ", ".join(repr(r.name) for r in overlapping)
        raise ConfigFileError(
            f"{quirk.where}: the quirk's bytes {offset:#x}+{width} span registers {names}; "
            "a quirk must lie inside one register"
        )
    target = overlapping[0]
    shift = 8 * (offset - target.offset)
    positioned = mask << shift
    carved: list[Rule] = []
    for rule in target.rules:
        bits = rule.mask & positioned
        if bits and rule.protected:
            raise ConfigFileError(
                f"{quirk.where}.mask: bits {bits >> shift:#x} belong to {rule.name!r}, which is "
                "protected; a quirk cannot pass them through to the device"
            )
        rest = rule.mask & ~positioned
        if rest:
            carved.append(replace(rule, mask=rest))
    carved.append(replace(quirk_rule, mask=positioned))
    regs = [r for r in regs if r is not target]
    regs.append(replace(target, rules=tuple(carved)))
    return regs


def _virtual_image(image: bytes, regs: Sequence[Register], hidden: Sequence[CapInstance]) -> bytes:
    virtual = bytearray(image)
    for reg in regs:
        for rule in reg.rules:
            if rule.init is None:
                continue
            old = int.from_bytes(virtual[reg.offset : reg.end], "little")
            new = (old & ~rule.mask) | (rule.init & rule.mask)
            virtual[reg.offset : reg.end] = new.to_bytes(reg.width, "little")
    space = ConfigSpace(bytes(virtual))
    for inst in hidden:
        unlink_capability(space, inst.cap)
    return bytes(space)


def compile_policy(
    image: bytes,
    bars: Sequence[BarSpec],
    rom_size: int,
    config: PolicyConfig,
    quirks: Sequence[QuirkConfig] = (),
) -> CompiledPolicy:
    """Build the field table and initial virtual image of one device for one guest."""
    size = len(image)
    walk = walk_capabilities(image)
    instances = capability_instances(walk, image)
    hide = frozenset(config.hide)
    unmatched = [n for n in config.hide if not any(n in (i.kind, i.prefix) for i in instances)]
    header = header_registers(image[Reg.HEADER_TYPE], list(bars), rom_size)
    regs = [r for r in header if r.end <= size]
    claimed = bytearray(size)
    for reg in regs:
        claimed[reg.offset : reg.end] = b"\x01" * reg.width

    def read(offset: int, width: int) -> int:
        return int.from_bytes(image[offset : offset + width], "little")

    regs += capability_registers(instances, hide, read, claimed)
    regs = [replace(r, rules=tuple(_apply_preset(x, config.preset) for x in r.rules)) for r in regs]
    regs = _apply_lists(regs, config, unmatched)
    vendor, device = read(Reg.VENDOR_ID, 2), read(Reg.DEVICE_ID, 2)
    applied = tuple(q for q in (*config.quirks, *quirks) if q.matches(vendor, device))
    for quirk in applied:
        regs = _apply_quirk(quirk, regs, size)
    permissive = config.preset is Preset.PERMISSIVE
    table = FieldTable(
        size,
        (r.to_field() for r in regs),
        unlisted_access=Access.RW if permissive else Access.RO,
        unlisted_allowed=permissive,
    )
    hidden = tuple(i for i in instances if (i.kind in hide or i.prefix in hide) and i.cap.id != 0)
    virtual = _virtual_image(image, regs, hidden)
    regs.sort(key=lambda r: r.offset)
    return CompiledPolicy(
        table,
        tuple(regs),
        virtual,
        tuple(instances),
        hidden,
        tuple(dict.fromkeys(unmatched)),
        applied,
    )
