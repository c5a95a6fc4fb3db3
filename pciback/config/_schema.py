"""The backend configuration: TOML, validated with errors that name the key.

Schema (later issues extend it)::

    listen = ["unix:/run/pcisplit/pciback.sock"]   # address strings
    [limits]                    # optional: protocol limits and resource limits (docs/security.md)
    max_message_size = 65536
    max_in_flight = 64
    max_connections = 256  max_connections_per_guest = 8  ...  (config.ResourceLimits)
    [tls]                       # needed only for tls:// listeners
    cert = "server.pem"  key = "server.key"  ca = "guests-ca.pem"
    [[guest]]
    name = "guest0"
    allow_plain_tcp = false     # a guest may use tcp:// (no TLS) only if this is true
    [[device]]
    id = "edu0"                 # unique name
    kind = "emulated"           # "emulated" | "snapshot" | "host" | "vfio-user"
    model = "edu"               # emulated: a registered model
    dump = "nic.txt"            # snapshot: an lspci -x/-xxx/-xxxx dump (relative to this file)
    bar_sizes = { 0 = 0x20000 } # snapshot: optional BAR sizes
    address = "0000:00:03.0"    # host: the real device (read-only unless writable = true)
    writable = false
    socket = "/run/gpio.sock"   # vfio-user: the server's socket (relative to this file)
    timeout = 5.0               # vfio-user: seconds one access may take before the device fails
    guest = "guest0"            # optional: assigned at start
    policy = "default"          # "default" | "transparent-readonly" | "permissive"
    allow = ["command.bus_master"]   deny = [...]   hide = ["msix"]   quirks = [...]
    [[quirk]]                   # global quirks (masks that ARE enforced); see docs/policy.md
    match = "8086:10c9"  register = "..."  mask = 0x...
    [audit]                     # denied-write audit log rate limit per (guest, device)
    rate = 5.0  burst = 20
    [interrupts]                # older spelling of limits.notifications_per_second / _burst
    max_events_per_second = 100000.0  burst = 1024
    [dma]                       # message-based DMA: seconds to wait for the frontend
    call_timeout = 5.0
"""

from __future__ import annotations

import fnmatch
import grp
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pciback.config._guests import GUEST_KEYS, GuestConfig, parse_guest, tls_listeners
from pciback.config._limits import LIMIT_KEYS, ResourceLimits
from pciback.devices import SYSFS_PCI_DEVICES
from pciback.policy import PolicyConfig, QuirkConfig
from shared.errors import ConfigFileError, LocalProtocolError, did_you_mean
from shared.pci import PciAddress
from shared.protocol import Limits

__all__ = [
    "BackendConfig",
    "GuestConfig",
    "DeviceConfig",
    "TlsConfig",
    "HidePattern",
    "check_listen",
    "default_control_path",
    "load_config",
    "parse_config",
    "default_config",
    "DEFAULT_CONFIG_TEXT",
]

DEVICE_KINDS = ("emulated", "snapshot", "host", "vfio-user")


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    kind: str
    where: str  # "device[0]" -- for error messages
    model: str | None = None
    dump: Path | None = None
    dump_index: int = 0
    bar_sizes: dict[int, int] = field(default_factory=dict)
    address: PciAddress | None = None
    writable: bool = False
    #: vfio-user: the server's socket and how long one access may take.
    socket: Path | None = None
    timeout: float = 5.0
    guest: str | None = None
    function: int | None = None
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig.from_mapping({}, where="-"))


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    ca: Path | None


_HIDE_PATTERN = re.compile(
    r"([0-9a-fA-F]{4}|\*):([0-9a-fA-F]{2}|\*):([0-9a-fA-F]{2}|\*)\.([0-7]|\*)"
)


@dataclass(frozen=True)
class HidePattern:
    """One ``hide`` entry: ``DDDD:BB:DD.F`` where any part may be ``*``."""

    text: str
    where: str

    @classmethod
    def parse(cls, text: Any, where: str) -> HidePattern:
        _expect(text, str, where, 'a host address or glob such as "0000:03:*.*"')
        if _HIDE_PATTERN.fullmatch(text) is None:
            raise ConfigFileError(
                f"{where}: {text!r} is not a host address pattern; use DDDD:BB:DD.F where any "
                'part may be *, e.g. "0000:02:01.0" or "0000:03:*.*"'
            )
        return cls(text.lower(), where)

    def matches(self, address: PciAddress) -> bool:
        return fnmatch.fnmatchcase(str(address).lower(), self.text)


@dataclass(frozen=True)
class BackendConfig:
    listen: tuple[str, ...]
    guests: dict[str, GuestConfig]
    devices: tuple[DeviceConfig, ...]
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig | None = None
    source: str = "<embedded default>"
    quirks: tuple[QuirkConfig, ...] = ()
    audit_rate: float = 5.0
    audit_burst: int = 20
    #: ``[dma]``: how long a DMA call waits for the frontend's answer.
    dma_call_timeout: float = 5.0
    #: ``[transport]``: shm adaptive-polling budget in microseconds (0: off) and ring size.
    shm_poll_us: float = 0.0
    shm_ring_size: int = 256 * 1024
    #: ``[limits]`` beyond the protocol's two: what any guest can make the backend hold.
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    #: ``[hotplug]``: how long a hot-plug operation waits for the guest's
    #: acknowledgement; after it a removal is forced (and logged).
    hotplug_ack_timeout: float = 5.0
    #: ``hide``: host addresses never offered to any guest (globs allowed).
    hide: tuple[HidePattern, ...] = ()
    #: ``control``: the admin socket (None: beside the first unix: listener).
    control: Path | None = None
    #: ``listen_mode`` / ``listen_group``: mode and group of unix:/shm: socket files.
    listen_mode: int = 0o600
    listen_group: int | None = None
    #: ``sysfs_root``: where host devices are read (a copy of the tree for tests).
    sysfs_root: Path = SYSFS_PCI_DEVICES
    #: The directory relative paths were resolved against.
    base: Path = field(default_factory=Path.cwd)

    def is_hidden(self, address: PciAddress | None) -> HidePattern | None:
        """The first ``hide`` pattern matching host ``address``, or None."""
        if address is None:
            return None
        return next((p for p in self.hide if p.matches(address)), None)

    def control_path(self) -> Path:
        """Where the admin socket lives (``control``, or its default)."""
        return self.control if self.control is not None else default_control_path(self.listen)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigFileError(f"{where}: expected {what}, got {value!r}")
    return value


def _name(value: Any, where: str) -> str:
    _expect(value, str, where, "a string")
    if not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise ConfigFileError(
            f"{where}: {value!r} is not a valid name (1-64 letters, digits, '-', '_', '.')"
        )
    return str(value)


def _known_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigFileError(
            f"{where}: unknown key {unknown[0]!r}; {did_you_mean(unknown[0], allowed)}"
        )


def _path(value: Any, where: str, base: Path) -> Path:
    _expect(value, str, where, "a file path string")
    path = Path(value)
    return path if path.is_absolute() else base / path


_DEVICE_KEYS = {
    "id",
    "kind",
    "model",
    "dump",
    "dump_index",
    "bar_sizes",
    "address",
    "writable",
    "socket",
    "timeout",
    "guest",
    "function",
    "policy",
    "allow",
    "deny",
    "hide_capabilities",
    "quirks",
}
_POLICY_KEYS = ("policy", "allow", "deny", "hide_capabilities", "quirks")


def _device(raw: Any, where: str, base: Path, guests: dict[str, GuestConfig]) -> DeviceConfig:
    _expect(raw, dict, where, "a table")
    _known_keys(raw, _DEVICE_KEYS, where)
    if "id" not in raw:
        raise ConfigFileError(f"{where}: missing key 'id' (a unique device name)")
    dev_id = _name(raw["id"], f"{where}.id")
    kind = _expect(raw.get("kind", "emulated"), str, f"{where}.kind", "a string")
    if kind not in DEVICE_KINDS:
        raise ConfigFileError(f"{where}.kind: {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    guest = raw.get("guest")
    if guest is not None:
        guest = _name(guest, f"{where}.guest")
        if guest not in guests:
            raise ConfigFileError(
                f"{where}.guest: guest {guest!r} is not declared; add [[guest]] name = {guest!r}"
            )
    function = raw.get("function")
    if function is not None:
        _expect(function, int, f"{where}.function", "an integer 0-7")
        if not 0 <= function <= 7:
            raise ConfigFileError(f"{where}.function: {function} is out of range 0-7")
    policy = PolicyConfig.from_mapping(raw, where=where)
    common: dict[str, Any] = dict(
        id=dev_id, kind=kind, where=where, guest=guest, function=function, policy=policy
    )
    if kind == "emulated":
        if "model" not in raw:
            raise ConfigFileError(f"{where}: kind 'emulated' needs key 'model' (e.g. \"edu\")")
        model = _expect(raw["model"], str, f"{where}.model", "a model name string")
        return DeviceConfig(model=model, **common)
    if kind == "snapshot":
        if "dump" not in raw:
            raise ConfigFileError(f"{where}: kind 'snapshot' needs key 'dump' (an lspci dump file)")
        dump = _path(raw["dump"], f"{where}.dump", base)
        index = _expect(raw.get("dump_index", 0), int, f"{where}.dump_index", "an integer")
        sizes_raw = _expect(raw.get("bar_sizes", {}), dict, f"{where}.bar_sizes", "a table")
        sizes: dict[int, int] = {}
        for key, size in sizes_raw.items():
            if not str(key).isdigit() or not 0 <= int(key) <= 5:
                raise ConfigFileError(f"{where}.bar_sizes: key {key!r} must be a BAR index 0-5")
            _expect(size, int, f"{where}.bar_sizes.{key}", "a size in bytes")
            if size <= 0 or size & (size - 1):
                raise ConfigFileError(f"{where}.bar_sizes.{key}: {size:#x} is not a power of two")
            sizes[int(key)] = size
        return DeviceConfig(dump=dump, dump_index=index, bar_sizes=sizes, **common)
    if kind == "vfio-user":
        if "socket" not in raw:
            raise ConfigFileError(
                f"{where}: kind 'vfio-user' needs key 'socket' (the server's UNIX socket path)"
            )
        sock = _path(raw["socket"], f"{where}.socket", base)
        timeout = _expect(raw.get("timeout", 5.0), (int, float), f"{where}.timeout", "seconds")
        if isinstance(timeout, bool) or not 0 < timeout <= 600:
            raise ConfigFileError(f"{where}.timeout: {timeout!r} must be 0 < seconds <= 600")
        return DeviceConfig(socket=sock, timeout=float(timeout), **common)
    if "address" not in raw:
        raise ConfigFileError(f"{where}: kind 'host' needs key 'address' (e.g. \"0000:00:03.0\")")
    address_text = _expect(raw["address"], str, f"{where}.address", "a PCI address string")
    try:
        address = PciAddress.parse(address_text)
    except ValueError as exc:
        raise ConfigFileError(f"{where}.address: {exc}") from exc
    writable = _expect(raw.get("writable", False), bool, f"{where}.writable", "true or false")
    return DeviceConfig(address=address, writable=writable, **common)


def parse_config(text: str, *, source: str = "<string>", base: Path | None = None) -> BackendConfig:
    """Parse and validate TOML text. Raises :class:`ConfigFileError` naming the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{source}: not valid TOML: {exc}") from exc
    base = base or Path.cwd()
    _known_keys(
        raw,
        {
            "listen", "guest", "device", "limits", "tls", "quirk", "audit", "interrupts", "dma",
            "transport", "hide", "control", "listen_mode", "listen_group", "hotplug",
            "sysfs_root",
        },
        source,
    )
    listen = _expect(raw.get("listen", []), list, "listen", "a list of address strings")
    for i, address in enumerate(listen):
        _expect(address, str, f"listen[{i}]", "an address string such as unix:/run/pciback.sock")
    guests: dict[str, GuestConfig] = {}
    for i, graw in enumerate(_expect(raw.get("guest", []), list, "guest", "[[guest]] tables")):
        where = f"guest[{i}]"
        _expect(graw, dict, where, "a table")
        _known_keys(graw, set(GUEST_KEYS), where)
        if "name" not in graw:
            raise ConfigFileError(f"{where}: missing key 'name'")
        name = _name(graw["name"], f"{where}.name")
        if name in guests:
            raise ConfigFileError(f"{where}.name: guest {name!r} is declared twice")
        guests[name] = parse_guest(graw, where, base)
    hide = tuple(
        HidePattern.parse(text, f"hide[{i}]")
        for i, text in enumerate(_expect(raw.get("hide", []), list, "hide", "a list of patterns"))
    )
    devices = _devices(raw, base, guests, hide)
    limits = Limits()
    lraw = _expect(raw.get("limits", {}), dict, "limits", "a table")
    _known_keys(lraw, set(_PROTOCOL_LIMIT_KEYS) | LIMIT_KEYS, "limits")
    try:
        limits = Limits(**{k: v for k, v in lraw.items() if k in _PROTOCOL_LIMIT_KEYS})
    except (TypeError, ValueError, LocalProtocolError) as exc:
        raise ConfigFileError(f"limits: {exc}") from exc
    resources = ResourceLimits.from_mapping({**_interrupts_table(raw, lraw), **lraw})
    resources.check_message_size(limits.max_message_size)
    tls = None
    if "tls" in raw:
        traw = _expect(raw["tls"], dict, "tls", "a table")
        _known_keys(traw, {"cert", "key", "ca"}, "tls")
        for key in ("cert", "key"):
            if key not in traw:
                raise ConfigFileError(f"tls: missing key {key!r} (PEM file path)")
        tls = TlsConfig(
            _path(traw["cert"], "tls.cert", base),
            _path(traw["key"], "tls.key", base),
            _path(traw["ca"], "tls.ca", base) if "ca" in traw else None,
        )
    check_listen(listen, tls)
    quirks = tuple(
        QuirkConfig.from_mapping(_expect(q, dict, f"quirk[{i}]", "a table"), where=f"quirk[{i}]")
        for i, q in enumerate(_expect(raw.get("quirk", []), list, "quirk", "[[quirk]] tables"))
    )
    audit = _expect(raw.get("audit", {}), dict, "audit", "a table")
    _known_keys(audit, {"rate", "burst"}, "audit")
    rate = _expect(audit.get("rate", 5.0), (int, float), "audit.rate", "entries per second")
    burst = _expect(audit.get("burst", 20), int, "audit.burst", "an entry count")
    if rate <= 0 or burst < 1:
        raise ConfigFileError("audit: rate must be > 0 and burst >= 1")
    dma_timeout = _dma_timeout(raw)
    transport = _expect(raw.get("transport", {}), dict, "transport", "a table")
    _known_keys(transport, {"shm_poll_us", "shm_ring_size"}, "transport")
    poll_us = _expect(transport.get("shm_poll_us", 0.0), (int, float), "transport.shm_poll_us",
                      "microseconds (0 turns polling off)")
    if isinstance(poll_us, bool) or not 0 <= poll_us <= 100_000:
        raise ConfigFileError("transport.shm_poll_us: must be between 0 and 100000 microseconds")
    ring_size = _expect(transport.get("shm_ring_size", 256 * 1024), int,
                        "transport.shm_ring_size", "a size in bytes")
    if ring_size < 4096 or ring_size & (ring_size - 1):
        raise ConfigFileError("transport.shm_ring_size: must be a power of two >= 4096")
    hotplug = _expect(raw.get("hotplug", {}), dict, "hotplug", "a table")
    _known_keys(hotplug, {"ack_timeout"}, "hotplug")
    ack_timeout = _positive(hotplug, "ack_timeout", 5.0, "hotplug", "seconds")
    mode_text = _expect(raw.get("listen_mode", "0600"), str, "listen_mode", 'an octal mode "0660"')
    if re.fullmatch(r"0?[0-7]{3}", mode_text) is None:
        raise ConfigFileError(f'listen_mode: {mode_text!r} is not an octal mode such as "0660"')
    control = _path(raw["control"], "control", base) if "control" in raw else None
    return BackendConfig(
        tuple(listen),
        guests,
        tuple(devices),
        limits,
        tls,
        source,
        quirks,
        float(rate),
        burst,
        dma_timeout,
        float(poll_us),
        ring_size,
        resources,
        hotplug_ack_timeout=ack_timeout,
        hide=hide,
        control=control,
        listen_mode=int(mode_text, 8),
        listen_group=_group(raw.get("listen_group")),
        base=base,
        sysfs_root=(
            _path(raw["sysfs_root"], "sysfs_root", base) if "sysfs_root" in raw
            else SYSFS_PCI_DEVICES
        ),
    )


def _devices(
    raw: dict[str, Any], base: Path, guests: dict[str, GuestConfig], hide: tuple[HidePattern, ...]
) -> tuple[DeviceConfig, ...]:
    """The ``[[device]]`` tables: unique ids, one owner per host address, hidden ones unowned."""
    devices: list[DeviceConfig] = []
    ids: set[str] = set()
    hosts: dict[PciAddress, str] = {}
    for i, draw in enumerate(_expect(raw.get("device", []), list, "device", "[[device]] tables")):
        dev = _device(draw, f"device[{i}]", base, guests)
        if dev.id in ids:
            raise ConfigFileError(f"device[{i}].id: device id {dev.id!r} is used twice")
        ids.add(dev.id)
        if dev.address is not None:
            if dev.address in hosts:
                raise ConfigFileError(
                    f"device[{i}].address: host device {dev.address} is already served as "
                    f"{hosts[dev.address]}; a device belongs to at most one guest, list it once"
                )
            hosts[dev.address] = f"{dev.where} ({dev.id})"
            pattern = next((p for p in hide if p.matches(dev.address)), None)
            if pattern is not None and dev.guest is not None:
                raise ConfigFileError(
                    f"device[{i}].guest: host device {dev.address} is hidden by {pattern.where} "
                    f"({pattern.text!r}) and cannot be assigned; drop the guest key or the pattern"
                )
        devices.append(dev)
    return tuple(devices)


def _group(value: Any) -> int | None:
    """``listen_group``: a group name or number, resolved now so a typo fails at start."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFFFFFF:
        return value
    _expect(value, str, "listen_group", "a group name or number")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigFileError(f"listen_group: no group named {value!r} on this host") from None


def check_listen(addresses: Sequence[str], tls: TlsConfig | None) -> None:
    """Refuse listen addresses the rest of the config cannot serve safely.

    A ``tls://`` listener without ``[tls] ca`` would accept any client at all,
    so it is an error (named by the address).
    """
    for address in tls_listeners(addresses):
        if tls is None:
            raise ConfigFileError(f"listen: {address} needs a [tls] table with cert, key and ca")
        if tls.ca is None:
            raise ConfigFileError(
                f"tls.ca: the tls:// listener {address} needs ca = \"PEM file\" (the CA that "
                "signs guest certificates); without it any client could connect"
            )


def default_control_path(listen: Sequence[str]) -> Path:
    """``pciback.ctl`` beside the first ``unix:`` socket, or in the working directory."""
    for address in listen:
        if address.startswith("unix:"):
            return Path(address[len("unix:") :]).parent / "pciback.ctl"
    return Path("pciback.ctl")


def _positive(table: dict[str, Any], key: str, default: float, where: str, what: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool):
        raise ConfigFileError(f"{where}.{key}: expected a number ({what}), got {value!r}")
    _expect(value, (int, float), f"{where}.{key}", what)
    if not 0 < value < float("inf"):
        raise ConfigFileError(f"{where}.{key}: {value!r} must be a positive number ({what})")
    return float(value)


_PROTOCOL_LIMIT_KEYS = ("max_message_size", "max_in_flight")


def _interrupts_table(raw: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """``[interrupts]``, the older spelling of two ``[limits]`` keys, as ``[limits]`` keys."""
    irq = _expect(raw.get("interrupts", {}), dict, "interrupts", "a table")
    _known_keys(irq, {"max_events_per_second", "burst"}, "interrupts")
    renamed = {"max_events_per_second": "notifications_per_second", "burst": "notification_burst"}
    out: dict[str, Any] = {}
    for old, new in renamed.items():
        if old in irq:
            if new in limits:
                raise ConfigFileError(
                    f"interrupts.{old} and limits.{new} are the same setting; keep limits.{new}"
                )
            out[new] = irq[old]
    if "notification_burst" in out and not 1 <= out["notification_burst"] <= 1_000_000:
        raise ConfigFileError(
            f"interrupts.burst: {out['notification_burst']} must be between 1 and 1000000"
        )
    return out


def _dma_timeout(raw: dict[str, Any]) -> float:
    """The ``[dma]`` table (optional)."""
    dma = _expect(raw.get("dma", {}), dict, "dma", "a table")
    _known_keys(dma, {"call_timeout"}, "dma")
    return _positive(dma, "call_timeout", 5.0, "dma", "seconds")


def load_config(path: str | Path) -> BackendConfig:
    """Read and validate a config file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x}); "
            "TOML files must be saved as UTF-8"
        ) from exc
    return parse_config(text, source=str(path), base=path.parent.resolve())


DEFAULT_CONFIG_TEXT = resources.files("pciback").joinpath("default.toml").read_text()


def default_config() -> BackendConfig:
    """The embedded default: one edu device for guest0 on unix:./pciback.sock."""
    return parse_config(DEFAULT_CONFIG_TEXT, source="<embedded default>")
