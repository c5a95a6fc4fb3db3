"""``pcifront setpci``: setpci's syntax against the guest's bus, through the backend's policy.

    pcifront setpci --connect ADDR --guest NAME [-s SLOT] [-d ID] [-v] [-D] OP...

Each ``OP`` is ``REG[.B|.W|.L][=VALUE[:MASK][,VALUE[:MASK]...]]``, as in
pciutils' setpci:

* ``REG`` is a hex offset (``10``), a register name (``COMMAND``,
  ``BASE_ADDRESS_0``, ``CB_CARDBUS_BASE``...), or a capability
  (``CAP_EXP``, ``ECAP_AER``, ``CAP_VNDR@2`` for the second instance), each
  optionally followed by ``+OFFSET`` in hex (``CAP_EXP+10.w``);
* the width is ``.B``, ``.W`` or ``.L``; named registers have a default,
  offsets and capabilities need one;
* without ``=`` the register is read and printed in hex (``%02x``/``%04x``/
  ``%08x``), one line per device; with ``=`` the values are written to
  consecutive registers, and ``VALUE:MASK`` changes only the bits in ``MASK``
  (read, merge, write).

Writes go through the backend's policy: a denied write stops with a non-zero
exit status and the reason. ``-D`` (demo) parses and reads but writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final

from pcifront.client.bus import Bus, Device
from pcifront.core.errors import AccessDeniedError
from pcifront.tools.lspci import DeviceFilter
from shared.errors import PcisplitError, UsageError
from shared.pci import walk_capabilities

#: Opens the connection the command line describes: ``open_bus(args, include_config=True)``.
OpenBus = Callable[..., AbstractAsyncContextManager[Bus]]

__all__ = [
    "SetpciError",
    "SetpciSyntaxError",
    "SetpciOp",
    "parse_op",
    "REGISTERS",
    "add_setpci_options",
    "setpci_main",
]

_CONFIG_SIZE: Final = 4096
_WIDTHS: Final = {"b": 1, "w": 2, "l": 4}

#: setpci's register names: name -> (offset, width). Header types 0, 1 and 2 (``CB_``).
REGISTERS: Final[dict[str, tuple[int, int]]] = {
    "VENDOR_ID": (0x00, 2), "DEVICE_ID": (0x02, 2), "COMMAND": (0x04, 2), "STATUS": (0x06, 2),
    "REVISION": (0x08, 1), "CLASS_PROG": (0x09, 1), "CLASS_DEVICE": (0x0A, 2),
    "CACHE_LINE_SIZE": (0x0C, 1), "LATENCY_TIMER": (0x0D, 1), "HEADER_TYPE": (0x0E, 1),
    "BIST": (0x0F, 1),
    **{f"BASE_ADDRESS_{i}": (0x10 + 4 * i, 4) for i in range(6)},
    "CARDBUS_CIS": (0x28, 4), "SUBSYSTEM_VENDOR_ID": (0x2C, 2), "SUBSYSTEM_ID": (0x2E, 2),
    "ROM_ADDRESS": (0x30, 4), "CAPABILITIES": (0x34, 1), "INTERRUPT_LINE": (0x3C, 1),
    "INTERRUPT_PIN": (0x3D, 1), "MIN_GNT": (0x3E, 1), "MAX_LAT": (0x3F, 1),
    "PRIMARY_BUS": (0x18, 1), "SECONDARY_BUS": (0x19, 1), "SUBORDINATE_BUS": (0x1A, 1),
    "SEC_LATENCY_TIMER": (0x1B, 1), "IO_BASE": (0x1C, 1), "IO_LIMIT": (0x1D, 1),
    "SEC_STATUS": (0x1E, 2), "MEMORY_BASE": (0x20, 2), "MEMORY_LIMIT": (0x22, 2),
    "PREF_MEMORY_BASE": (0x24, 2), "PREF_MEMORY_LIMIT": (0x26, 2),
    "PREF_BASE_UPPER32": (0x28, 4), "PREF_LIMIT_UPPER32": (0x2C, 4),
    "IO_BASE_UPPER16": (0x30, 2), "IO_LIMIT_UPPER16": (0x32, 2),
    "BRIDGE_ROM_ADDRESS": (0x38, 4), "BRIDGE_CONTROL": (0x3E, 2),
    "CB_CARDBUS_BASE": (0x10, 4), "CB_CAPABILITIES": (0x14, 2), "CB_SEC_STATUS": (0x16, 2),
    "CB_BUS_NUMBER": (0x18, 1), "CB_CARDBUS_NUMBER": (0x19, 1),
    "CB_SUBORDINATE_BUS": (0x1A, 1), "CB_CARDBUS_LATENCY": (0x1B, 1),
    "CB_MEMORY_BASE_0": (0x1C, 4), "CB_MEMORY_LIMIT_0": (0x20, 4),
    "CB_MEMORY_BASE_1": (0x24, 4), "CB_MEMORY_LIMIT_1": (0x28, 4),
    "CB_IO_BASE_0": (0x2C, 2), "CB_IO_BASE_0_HI": (0x2E, 2),
    "CB_IO_LIMIT_0": (0x30, 2), "CB_IO_LIMIT_0_HI": (0x32, 2),
    "CB_IO_BASE_1": (0x34, 2), "CB_IO_BASE_1_HI": (0x36, 2),
    "CB_IO_LIMIT_1": (0x38, 2), "CB_IO_LIMIT_1_HI": (0x3A, 2),
    "CB_BRIDGE_CONTROL": (0x3E, 2), "CB_SUBSYSTEM_VENDOR_ID": (0x40, 2),
    "CB_SUBSYSTEM_ID": (0x42, 2), "CB_LEGACY_MODE_BASE": (0x44, 4),
}

#: Capability names (``CAP_*``: standard IDs; ``ECAP_*``: extended IDs), as setpci spells them.
CAPABILITIES: Final[dict[str, int]] = {
    "CAP_PM": 0x01, "CAP_AGP": 0x02, "CAP_VPD": 0x03, "CAP_SLOTID": 0x04, "CAP_MSI": 0x05,
    "CAP_CHSWP": 0x06, "CAP_PCIX": 0x07, "CAP_HT": 0x08, "CAP_VNDR": 0x09, "CAP_DBG": 0x0A,
    "CAP_CCRC": 0x0B, "CAP_HOTPLUG": 0x0C, "CAP_SSVID": 0x0D, "CAP_AGP3": 0x0E,
    "CAP_SECURE": 0x0F, "CAP_EXP": 0x10, "CAP_MSIX": 0x11, "CAP_SATA": 0x12, "CAP_AF": 0x13,
    "CAP_EA": 0x14,
}
EXT_CAPABILITIES: Final[dict[str, int]] = {
    "ECAP_AER": 0x01, "ECAP_VC": 0x02, "ECAP_DSN": 0x03, "ECAP_PB": 0x04, "ECAP_RCLINK": 0x05,
    "ECAP_RCILINK": 0x06, "ECAP_RCEC": 0x07, "ECAP_MFVC": 0x08, "ECAP_VC2": 0x09,
    "ECAP_RBCB": 0x0A, "ECAP_VNDR": 0x0B, "ECAP_ACS": 0x0D, "ECAP_ARI": 0x0E, "ECAP_ATS": 0x0F,
    "ECAP_SRIOV": 0x10, "ECAP_MRIOV": 0x11, "ECAP_MCAST": 0x12, "ECAP_PRI": 0x13,
    "ECAP_REBAR": 0x15, "ECAP_DPA": 0x16, "ECAP_TPH": 0x17, "ECAP_LTR": 0x18,
    "ECAP_SECPCI": 0x19, "ECAP_PMUX": 0x1A, "ECAP_PASID": 0x1B, "ECAP_LNR": 0x1C,
    "ECAP_DPC": 0x1D, "ECAP_L1PM": 0x1E, "ECAP_PTM": 0x1F, "ECAP_M_PCIE": 0x20,
    "ECAP_FRS": 0x21, "ECAP_RTR": 0x22, "ECAP_DVSEC": 0x23, "ECAP_VF_REBAR": 0x24,
    "ECAP_DLNK": 0x25, "ECAP_16GT": 0x26, "ECAP_LMR": 0x27, "ECAP_HIER_ID": 0x28,
    "ECAP_NPEM": 0x29, "ECAP_32GT": 0x2A, "ECAP_DOE": 0x2E, "ECAP_IDE": 0x30,
}


class SetpciError(PcisplitError):
    """A write was refused, a capability is missing, or no device matched; says which and why."""


class SetpciSyntaxError(SetpciError, UsageError):
    """An operation is malformed (bad usage: exit status 2)."""


@dataclass(frozen=True, slots=True)
class SetpciOp:
    """One parsed operation. ``capability`` is ``(extended, id, instance)`` or None."""

    text: str
    offset: int
    width: int
    values: tuple[tuple[int, int], ...]  # (value, mask); empty: a read
    capability: tuple[bool, int, int] | None = None

    @property
    def is_write(self) -> bool:
        return bool(self.values)


def _hex(text: str, what: str, op: str) -> int:
    body = text[2:] if text[:2].lower() == "0x" else text
    try:
        if not body:
            raise ValueError
        return int(body, 16)
    except ValueError:
        raise SetpciSyntaxError(f"{op!r}: {what} {text!r} is not a hex number") from None


def parse_op(text: str) -> SetpciOp:
    """Parse one ``REG[.W][=VALUE[:MASK],...]`` operation (see the module doc)."""
    left, equals, right = text.partition("=")
    width: int | None = None
    name, dot, suffix = left.rpartition(".")
    if dot and suffix.lower() in _WIDTHS:
        width = _WIDTHS[suffix.lower()]
        left = name
    elif dot:
        raise SetpciSyntaxError(f"{text!r}: width {suffix!r} is invalid; use .B, .W or .L")
    register, plus, extra = left.partition("+")
    offset_add = _hex(extra, "offset", text) if plus else 0
    capability = None
    upper = register.upper()
    if upper.startswith(("CAP_", "ECAP_")):
        cap_name, at, instance_text = upper.partition("@")
        table = EXT_CAPABILITIES if cap_name.startswith("E") else CAPABILITIES
        if cap_name not in table:
            cap_name_hex = cap_name.split("_", 1)[1]
            cap_id = _hex(cap_name_hex, "capability", text)
        else:
            cap_id = table[cap_name]
        instance = int(instance_text, 10) if at and instance_text.isdigit() else 0
        if at and not instance_text.isdigit():
            raise SetpciSyntaxError(
                f"{text!r}: capability instance {instance_text!r} is not a number"
            )
        capability = (cap_name.startswith("E"), cap_id, instance)
        base = 0
    elif upper in REGISTERS:
        base, default_width = REGISTERS[upper]
        width = width or default_width
    else:
        base = _hex(register, "register", text)
    if width is None:
        raise SetpciSyntaxError(f"{text!r}: missing width; add .B, .W or .L")
    offset = base + offset_add
    values: list[tuple[int, int]] = []
    if equals:
        if not right:
            raise SetpciSyntaxError(f"{text!r}: no value after '='")
        full = (1 << (8 * width)) - 1
        for item in right.split(","):
            value_text, colon, mask_text = item.partition(":")
            value = _hex(value_text, "value", text)
            mask = _hex(mask_text, "mask", text) if colon else full
            if value > full or mask > full:
                raise SetpciSyntaxError(f"{text!r}: value {item!r} does not fit {width} byte(s)")
            values.append((value, mask))
    if capability is None:
        _check_range(text, offset, width, max(len(values), 1))
    return SetpciOp(text, offset, width, tuple(values), capability)


def _check_range(text: str, offset: int, width: int, count: int) -> None:
    if offset % width:
        raise SetpciSyntaxError(f"{text!r}: register {offset:#x} is not aligned to {width} bytes")
    if offset + width * count > _CONFIG_SIZE:
        raise SetpciSyntaxError(f"{text!r}: register {offset:#x} is out of range (0..0xfff)")


async def _resolve(device: Device, op: SetpciOp, image: bytes) -> int:
    if op.capability is None:
        return op.offset
    extended, cap_id, instance = op.capability
    found = [
        cap.offset
        for cap in walk_capabilities(image)
        if cap.extended == extended and cap.id == cap_id
    ]
    if len(found) <= instance:
        kind = "extended capability" if extended else "capability"
        raise SetpciError(f"{device.address}: {op.text!r}: {kind} {cap_id:#x} not found")
    offset = found[instance] + op.offset
    _check_range(op.text, offset, op.width, max(len(op.values), 1))
    return offset


async def execute(
    devices: list[Device], ops: list[SetpciOp], *, verbose: bool, demo: bool,
    write: Callable[[str], object],
) -> None:
    """Run ``ops`` on every device in turn (the whole list per device, as setpci does)."""
    for device in devices:
        image = device.config or b""
        for op in ops:
            offset = await _resolve(device, op, image)
            digits = 2 * op.width
            if not op.is_write:
                value = await device.config_read(offset, op.width)
                prefix = f"{device.address} @{offset:02x} = " if verbose else ""
                write(f"{prefix}{value:0{digits}x}\n")
                continue
            for n, (value, mask) in enumerate(op.values):
                at = offset + n * op.width
                full = (1 << (8 * op.width)) - 1
                if mask != full:
                    old = await device.config_read(at, op.width)
                    value = (old & ~mask) | (value & mask)
                if verbose:
                    write(f"{device.address}:{at:02x} {value:0{digits}x}\n")
                if demo:
                    continue
                try:
                    await device.config_write(at, op.width, value)
                except AccessDeniedError as exc:
                    raise SetpciError(
                        f"{device.address} @{at:#04x}: write of {value:#0{digits + 2}x} "
                        f"({op.text}) was denied by the backend's policy: {exc.remote_message}"
                    ) from exc


def add_setpci_options(parser: argparse.ArgumentParser) -> None:
    """setpci's own options and the operations (the connection options are the caller's)."""
    # setpci's -v (say what is done) is the command line's common -v.
    parser.add_argument("-s", dest="slot", metavar="[[[[DOMAIN]:]BUS]:][DEV][.[FUNC]]",
                        help="act on matching devices only")
    parser.add_argument("-d", dest="ids", metavar="[VENDOR]:[DEVICE][:CLASS]",
                        help="act on devices with these IDs only")
    parser.add_argument("-D", action="store_true", dest="demo",
                        help="demo mode: parse and read, write nothing")
    parser.add_argument("-f", action="store_true", dest="force",
                        help="no error when no device matches")
    parser.add_argument("ops", nargs="+", metavar="REG[.B|.W|.L][=VALUE[:MASK]]",
                        help="register to read, or to write with =")


async def setpci_main(args: argparse.Namespace, open_bus: OpenBus) -> int:
    """The ``setpci`` subcommand; a failure raises a :class:`PcisplitError` (one line)."""
    ops = [parse_op(text) for text in args.ops]
    selection = DeviceFilter.parse(args.slot, args.ids)
    async with open_bus(args, include_config=True) as bus:
        devices = sorted(
            (dev for dev in bus.devices if selection.matches(dev)), key=lambda d: d.pci_address
        )
        if not devices and not args.force:
            raise SetpciError(
                "no device on the guest's bus matches the selection; check -s/-d with "
                "pcifront lspci (or pass -f)"
            )
        await execute(
            devices, ops, verbose=bool(args.verbose), demo=args.demo, write=sys.stdout.write
        )
    return 0
