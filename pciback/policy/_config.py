"""Per-device policy configuration: presets, allow/deny lists, hidden capabilities, quirks.

The TOML shape (the lead's loader passes each table to ``from_mapping``)::

    [[device]]
    policy = "default"                      # or "transparent-readonly", "permissive"
    allow  = ["command.intx_disable", "pcie.devctl"]
    deny   = ["command.bus_master"]
    hide   = ["msix", "aer"]                # capabilities the guest must not see
    quirks = [{ offset = 0x4c, size = 4, mask = 0x0000ff00 }]

    [[quirk]]                               # global, matched by vendor:device
    match    = "8086:10c9"
    register = "pcie.devctl"                # or offset = 0xa8 and size = 2
    mask     = 0x0010                       # bits the guest may write through

Names are validated here against every name a device can have, so a typo
fails at load time with the key that holds it. Whether a name exists on a
particular device (``pcie.devctl`` on a conventional PCI device) is only known
when the device is bound; see :class:`~pciback.policy.PolicedDevice`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.errors import ConfigFileError, did_you_mean

from ._capregs import (
    CAPABILITY_NAMES,
    CAPABILITY_RULE_SUFFIXES,
    GENERIC_SUFFIXES,
)
from ._header import HEADER_NAMES

__all__ = ["Preset", "PolicyConfig", "QuirkConfig", "known_register_names"]


class Preset(enum.Enum):
    """Named starting points for a device's policy (see ``docs/policy.md``)."""

    DEFAULT = "default"
    TRANSPARENT_READONLY = "transparent-readonly"
    PERMISSIVE = "permissive"


_INSTANCE = re.compile(r"^(?P<kind>[a-z0-9_]+)@0x(?P<offset>[0-9a-f]+)$")


def known_register_names() -> tuple[str, ...]:
    """Every register or rule name a configuration may use (header and capabilities)."""
    names = list(HEADER_NAMES)
    for kind in CAPABILITY_NAMES:
        if kind == "null":
            continue
        for suffix in GENERIC_SUFFIXES + CAPABILITY_RULE_SUFFIXES.get(kind, ()):
            name = f"{kind}.{suffix}" if suffix else kind
            if name not in names:
                names.append(name)
    return tuple(names)


_KNOWN = frozenset(known_register_names())


def _canonical(name: str) -> str:
    """``vndr@0x60.body`` -> ``vndr.body`` (a second instance of a capability kind)."""
    head, _, rest = name.partition(".")
    match = _INSTANCE.match(head)
    if match is None:
        return name
    return f"{match['kind']}.{rest}" if rest else match["kind"]


def _suggest(name: str, known: Sequence[str]) -> str:
    return did_you_mean(name, known, listing="the names are in docs/policy.md")


def _string_list(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple):
        raise ConfigFileError(f"{where}.{key}: expected a list of strings, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigFileError(f"{where}.{key}[{i}]: expected a non-empty string, got {item!r}")
    return tuple(value)


def _int(data: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigFileError(
            f"{where}.{key}: expected an integer from {lo:#x} to {hi:#x}, got {value!r}"
        )
    return value


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigFileError(f"{where}.{key}: unknown key; {did_you_mean(key, allowed)}")


@dataclass(frozen=True, slots=True)
class QuirkConfig:
    """A register a guest may write through to one kind of device, with an ENFORCED mask.

    Bits in ``mask`` pass to the device; a write that changes any other bit
    of the quirk's bytes is refused (ACCESS_DENIED). ``match`` is
    ``(vendor, device)`` or ``None`` (only inside a device's own ``quirks``).
    The register is named (``register``) or given by ``offset`` and ``size``.
    """

    mask: int
    match: tuple[int, int] | None = None
    register: str | None = None
    offset: int | None = None
    size: int | None = None
    name: str = ""
    where: str = "quirk"

    KEYS: ClassVar[tuple[str, ...]] = ("match", "register", "offset", "size", "mask", "name")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, where: str, require_match: bool = True
    ) -> QuirkConfig:
        """Validate one quirk table; raises :class:`ConfigFileError` naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigFileError(f"{where}: expected a table, got {data!r}")
        _check_keys(data, cls.KEYS, where)
        match: tuple[int, int] | None = None
        if "match" in data:
            raw = data["match"]
            parsed = (
                re.fullmatch(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})", raw)
                if isinstance(raw, str)
                else None
            )
            if parsed is None:
                raise ConfigFileError(
                    f"{where}.match: expected 'vvvv:dddd' (hex vendor and device IDs), got {raw!r}"
                )
            match = (int(parsed[1], 16), int(parsed[2], 16))
        elif require_match:
            raise ConfigFileError(f"{where}.match: missing; say which device, e.g. '8086:10c9'")
        if "mask" not in data:
            raise ConfigFileError(f"{where}.mask: missing; give the bits the guest may write")
        register = data.get("register")
        offset = size = None
        if register is not None:
            if "offset" in data or "size" in data:
                raise ConfigFileError(f"{where}: give either register or offset/size, not both")
            if not isinstance(register, str) or _canonical(register) not in _KNOWN:
                raise ConfigFileError(
                    f"{where}.register: unknown register {register!r}; "
                    + _suggest(str(register), sorted(_KNOWN))
                )
            width = 4
        else:
            if "offset" not in data or "size" not in data:
                raise ConfigFileError(f"{where}: give register = '<name>' or both offset and size")
            size = _int(data, "size", where, 1, 4)
            if size not in (1, 2, 4):
                raise ConfigFileError(f"{where}.size: must be 1, 2 or 4, got {size}")
            offset = _int(data, "offset", where, 0x40, 0xFFF)
            if offset % size:
                raise ConfigFileError(
                    f"{where}.offset: {offset:#x} is not aligned to its size {size}"
                )
            width = size
        mask = _int(data, "mask", where, 1, (1 << (8 * width)) - 1)
        name = data.get("name", "")
        if not isinstance(name, str):
            raise ConfigFileError(f"{where}.name: expected a string, got {name!r}")
        return cls(mask, match, register, offset, size, name, where)

    def matches(self, vendor: int, device: int) -> bool:
        return self.match is None or self.match == (vendor, device)

    @property
    def label(self) -> str:
        if self.name:
            return re.sub(r"[^a-z0-9_]+", "_", self.name.lower()).strip("_") or "quirk"
        target = self.register or f"{self.offset:#x}"
        return f"{target}".replace(".", "_")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The policy part of one device's configuration.

    ``where`` (e.g. ``"device[2]"``) prefixes every error message about it,
    including those found only when the device is bound.
    """

    preset: Preset = Preset.DEFAULT
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    quirks: tuple[QuirkConfig, ...] = ()
    where: str = "device"
    #: Keys of a device table this class reads; the loader validates the others.
    KEYS: ClassVar[tuple[str, ...]] = ("policy", "allow", "deny", "hide_capabilities", "quirks")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str) -> PolicyConfig:
        """Read ``policy``/``allow``/``deny``/``hide_capabilities``/``quirks`` from a device table.

        Other keys (``kind``, ``dump``, ...) are left to the caller. Raises
        :class:`ConfigFileError` naming the offending key, e.g.
        ``device[2].allow[0]: unknown register 'comand.bus_master'; did you mean ...``.
        """
        if not isinstance(data, Mapping):
            raise ConfigFileError(f"{where}: expected a table, got {data!r}")
        raw_preset = data.get("policy", Preset.DEFAULT.value)
        try:
            preset = Preset(raw_preset)
        except ValueError:
            raise ConfigFileError(
                f"{where}.policy: unknown preset {raw_preset!r}; "
                + did_you_mean(str(raw_preset), [p.value for p in Preset])
            ) from None
        known = known_register_names()
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("allow", "deny"):
            lists[key] = _string_list(data, key, where)
            for i, name in enumerate(lists[key]):
                if _canonical(name) not in _KNOWN:
                    raise ConfigFileError(
                        f"{where}.{key}[{i}]: unknown register {name!r}; " + _suggest(name, known)
                    )
        both = set(lists["allow"]) & set(lists["deny"])
        if both:
            name = sorted(both)[0]
            raise ConfigFileError(
                f"{where}.deny[{lists['deny'].index(name)}]: {name!r} is also in allow; "
                "a register is either allowed or denied"
            )
        hide = _string_list(data, "hide_capabilities", where)
        for i, name in enumerate(hide):
            if _canonical(name) not in CAPABILITY_NAMES or name.startswith("null"):
                raise ConfigFileError(
                    f"{where}.hide_capabilities[{i}]: unknown capability {name!r}; "
                    + _suggest(name, [c for c in CAPABILITY_NAMES if c != "null"])
                )
        raw_quirks = data.get("quirks", [])
        if not isinstance(raw_quirks, list | tuple):
            raise ConfigFileError(f"{where}.quirks: expected a list of tables, got {raw_quirks!r}")
        quirks = tuple(
            QuirkConfig.from_mapping(q, where=f"{where}.quirks[{i}]", require_match=False)
            for i, q in enumerate(raw_quirks)
        )
        return cls(preset, lists["allow"], lists["deny"], hide, quirks, where)
