"""Devices the backend owns, their assignment to guests, and each guest's virtual bus.

A guest sees only the devices assigned to it, on a virtual bus 0000:00 (then
0000:01 ... past 32 slots). Slots are numbered in assignment order; the
functions of one physical multi-function device share a virtual slot and keep
their function numbers.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from pciback.config import BackendConfig, DeviceConfig
from pciback.devices import (
    SYSFS_PCI_DEVICES,
    DeviceProvider,
    EduDevice,
    HostDevice,
    InterruptSink,
    SnapshotDevice,
    VfioUserDevice,
    import_model,
)
from pciback.plane.access import DeviceAccess, make_access
from pciback.plane.firmware import GuestFirmware
from pciback.plane.runtime import DeviceDmaPort, DeviceRuntime
from pciback.policy import AuditLog
from shared.errors import ConfigFileError, ErrorCode, PcisplitError, did_you_mean
from shared.pci import PciAddress
from shared.protocol import DeviceInfo
from shared.sync import FastLock

__all__ = [
    "MODELS",
    "register_model",
    "ServedDevice",
    "DeviceRegistry",
    "NotAssignedError",
    "DeviceRemovedError",
    "device_info",
]

MODEL_ENTRY_POINT_GROUP = "pcisplit.models"

log = logging.getLogger("pcisplit.backend")

#: Emulated device models by name. Plugins add more through ``pcisplit.models``.
MODELS: dict[str, Callable[[], DeviceProvider]] = {"edu": EduDevice}
_models_loaded = False


def register_model(name: str, factory: Callable[[], DeviceProvider]) -> None:
    """Make ``model = "<name>"`` available in ``[[device]]`` tables."""
    if name in MODELS:
        raise ConfigFileError(f"device model {name!r} is already registered")
    MODELS[name] = factory


def _model(name: str, where: str, base: Path | None = None) -> Callable[[], DeviceProvider]:
    global _models_loaded
    if ":" in name:  # "module:Class": the user's own code, beside the config or installed
        if name not in MODELS:
            MODELS[name] = import_model(name, where, base)
        return MODELS[name]
    if name not in MODELS and not _models_loaded:
        _models_loaded = True
        for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINT_GROUP):
            MODELS.setdefault(ep.name, ep.load())
    if name not in MODELS:
        raise ConfigFileError(
            f"{where}.model: unknown device model {name!r}; {did_you_mean(name, MODELS)} "
            f"(a model of your own: model = \"module:Class\" with module.py beside the config, "
            f"pciback --plugin FILE, pciback.register_model or the {MODEL_ENTRY_POINT_GROUP!r} "
            "entry point; see docs/devices.md)"
        )
    return MODELS[name]


class NotAssignedError(PcisplitError):
    """The guest named a device that is not on its virtual bus."""

    code = ErrorCode.NOT_FOUND


class DeviceRemovedError(NotAssignedError):
    """The guest named an address whose device was hot-unplugged from its bus."""

    code = ErrorCode.DEVICE_REMOVED


@dataclass(eq=False)
class ServedDevice:
    """One device the backend serves, with its lock and its guest-facing access path."""

    config: DeviceConfig
    provider: DeviceProvider
    physical: PciAddress | None = None
    #: The guest's access path (through the policy); set when the device is assigned.
    access: DeviceAccess = field(default=None)  # type: ignore[assignment]
    guest: str | None = None
    address: PciAddress | None = None  # on the guest's virtual bus
    lock: FastLock = field(default_factory=FastLock)
    runtime: DeviceRuntime | None = None
    #: The guest it is being removed from: off that guest's bus, not yet reset and
    #: free (between :meth:`DeviceRegistry.detach` and :meth:`DeviceRegistry.release`).
    leaving: str | None = None
    leaving_address: PciAddress | None = None
    #: Hidden devices are offered to nobody (``hide`` in the config, ``pciback ctl hide``).
    hidden: bool = False

    @property
    def state(self) -> str:
        """``assigned``, ``leaving`` (removal in progress), ``hidden`` or ``free``."""
        if self.guest is not None:
            return "assigned"
        if self.leaving is not None:
            return "leaving"
        return "hidden" if self.hidden else "free"

    @property
    def id(self) -> str:
        return self.config.id

    def start(
        self,
        nursery: trio.Nursery,
        *,
        interrupts: InterruptSink | None = None,
        dma: DeviceDmaPort | None = None,
    ) -> None:
        """Give the device its runtime context (tasks, lock, IRQ router sink, DMA path)."""
        self.runtime = DeviceRuntime(self.id, self.lock, nursery, interrupts=interrupts, dma=dma)
        self.provider.attach(self.runtime)

    def reset(self) -> None:
        """Reset through the access path, cancelling the model's background work first."""
        if self.runtime is not None:
            self.runtime.cancel_background()
        self.access.reset()


def device_info(dev: ServedDevice, include_config: bool) -> DeviceInfo:
    """Describe a device as its guest sees it (through the policy)."""
    image = dev.access.config_image()
    assert dev.address is not None
    word = int.from_bytes
    return DeviceInfo(
        address=dev.address.pack(),
        vendor_id=word(image[0:2], "little"),
        device_id=word(image[2:4], "little"),
        class_code=word(image[9:12], "little"),
        revision=image[8],
        header_type=image[0x0E],
        subsystem_vendor_id=word(image[0x2C:0x2E], "little"),
        subsystem_id=word(image[0x2E:0x30], "little"),
        config=image if include_config else None,
        bar_sizes=dev.access.bar_sizes(),
    )


def build_provider(
    cfg: DeviceConfig,
    sysfs_root: Path = SYSFS_PCI_DEVICES,
    *,
    dry_run: bool = False,
    base: Path | None = None,
) -> tuple[DeviceProvider, PciAddress | None]:
    """Instantiate the provider a ``[[device]]`` table describes.

    ``dry_run`` (``pciback check``): host devices are opened read-only and never written.
    ``base``: the config file's directory, where ``model = "module:Class"`` also looks.
    """
    try:
        if cfg.kind == "emulated":
            assert cfg.model is not None
            return _model(cfg.model, cfg.where, base)(), None
        if cfg.kind == "snapshot":
            assert cfg.dump is not None
            dev = SnapshotDevice.from_dump(
                cfg.dump, bar_sizes=cfg.bar_sizes or None, index=cfg.dump_index
            )
            return dev, dev.address
        if cfg.kind == "vfio-user":
            assert cfg.socket is not None
            return VfioUserDevice(cfg.socket, timeout=cfg.timeout), None
        assert cfg.address is not None
        host = HostDevice(
            cfg.address, writable=cfg.writable, sysfs_root=sysfs_root, dry_run=dry_run
        )
        return host, cfg.address
    except ConfigFileError:
        raise
    except (PcisplitError, OSError, ValueError) as exc:
        raise ConfigFileError(f"{cfg.where} ({cfg.id}): cannot create the device: {exc}") from exc


class DeviceRegistry:
    """All served devices, and which guest owns which."""

    def __init__(self, config: BackendConfig, *, dry_run: bool = False) -> None:
        """``dry_run``: build everything as ``serve`` would, but never write a host device
        (``pciback check``)."""
        self.config = config
        self._devices: dict[str, ServedDevice] = {}
        self.audit = AuditLog(rate=config.audit_rate, burst=config.audit_burst)
        for cfg in config.devices:
            provider, physical = build_provider(
                cfg, config.sysfs_root, dry_run=dry_run, base=config.base
            )
            hidden = config.is_hidden(physical) is not None
            self._devices[cfg.id] = ServedDevice(cfg, provider, physical, hidden=hidden)
        self._buses: dict[str, dict[int, ServedDevice]] = {name: {} for name in config.guests}
        self._views = {name: g.bus for name, g in config.guests.items()}
        # Per guest: addresses whose device was removed and not since reused
        # (answered DEVICE_REMOVED, not NOT_FOUND), and addresses still held by
        # a device that is leaving (never reused before it is released).
        self._gone: dict[str, set[int]] = {name: set() for name in config.guests}
        self._held: dict[str, set[int]] = {name: set() for name in config.guests}
        #: Each guest's firmware: its address windows and what it assigned.
        self.firmware: dict[str, GuestFirmware] = {
            name: GuestFirmware(name) for name in config.guests
        }
        #: Called with a device after :meth:`unassign` (the IRQ router forgets its state).
        self.release_hooks: list[Callable[[ServedDevice], None]] = []
        #: Resets (:meth:`reset`) in which some step failed (each logged with its traceback).
        self.reset_failures = 0
        for dev in self._devices.values():
            if dev.config.guest is not None:
                self.assign(dev.id, dev.config.guest)

    def __iter__(self) -> Iterator[ServedDevice]:
        return iter(self._devices.values())

    def close(self) -> None:
        """Close what the providers hold open (host devices' sysfs files)."""
        for dev in self._devices.values():
            close = getattr(dev.provider, "close", None)
            if callable(close):
                close()

    def get(self, device_id: str) -> ServedDevice:
        try:
            return self._devices[device_id]
        except KeyError:
            raise NotAssignedError(f"no device with id {device_id!r}") from None

    def assign(self, device_id: str, guest: str) -> PciAddress:
        """Put a device on ``guest``'s virtual bus and return its virtual address."""
        dev = self.get(device_id)
        if guest not in self._buses:
            raise NotAssignedError(f"unknown guest {guest!r}", code=ErrorCode.UNKNOWN_GUEST)
        if dev.guest is not None:
            raise PcisplitError(
                f"device {device_id} is already assigned to guest {dev.guest!r}",
                code=ErrorCode.BUSY,
            )
        if dev.hidden:
            raise PcisplitError(
                f"device {device_id} is hidden and offered to nobody; unhide it first "
                f"(pciback ctl unhide {device_id}, or drop it from hide in the config)",
                code=ErrorCode.ACCESS_DENIED,
            )
        if dev.leaving is not None:
            raise PcisplitError(
                f"device {device_id} is still being removed from guest {dev.leaving!r} "
                "(waiting for its acknowledgement or the time-out); try again once it is released",
                code=ErrorCode.BUSY,
            )
        bus = self._buses[guest]
        address = self._place(bus, dev, self._held[guest], guest)
        dev.access = make_access(
            dev.provider, dev.config, guest=guest, quirks=self.config.quirks, audit=self.audit
        )
        dev.access.apply_firmware(self.firmware[guest].setup(dev.id, dev.provider, address))
        dev.guest, dev.address = guest, address
        bus[address.pack()] = dev
        self._gone[guest].discard(address.pack())
        return address

    def _place(
        self, bus: dict[int, ServedDevice], dev: ServedDevice, held: set[int], guest: str
    ) -> PciAddress:
        function = dev.config.function
        if dev.physical is not None and self._views.get(guest) == "passthrough":
            # bus = "passthrough": the guest sees the host address (one owner per host
            # address, so only a virtual device placed first could be in the way).
            taken = dev.physical.pack() in bus or dev.physical.pack() in held
            if not taken:
                return dev.physical
        if dev.physical is not None and function is None:
            function = dev.physical.function
            # Functions of one physical slot share a virtual slot.
            for other in bus.values():
                if (
                    other.physical is not None
                    and other.address is not None
                    and (other.physical.domain, other.physical.bus, other.physical.device)
                    == (dev.physical.domain, dev.physical.bus, dev.physical.device)
                ):
                    candidate = PciAddress(0, other.address.bus, other.address.device, function)
                    if candidate.pack() not in bus and candidate.pack() not in held:
                        return candidate
        function = function or 0
        used_slots = {(a.bus, a.device) for a in (PciAddress.unpack(k) for k in (*bus, *held))}
        for n in range(256 * 32):
            slot = (n // 32, n % 32)
            if slot not in used_slots:
                return PciAddress(0, slot[0], slot[1], function)
        raise PcisplitError("the guest's virtual buses are full", code=ErrorCode.BUSY)

    def unassign(self, device_id: str) -> None:
        """Take a device off its guest's bus and reset it before anyone else may get it.

        :meth:`detach` then :meth:`release`, with nothing in between; hot-plug
        (``pciback.plane.hotplug``) waits for the guest's acknowledgement between the two.
        """
        self.detach(device_id)
        self.release(device_id)

    def detach(self, device_id: str) -> tuple[str, PciAddress]:
        """The first half of a removal: the guest loses the device now.

        The device leaves the guest's bus (its requests on that address are
        answered ``DEVICE_REMOVED``) and its background work stops. The IRQ
        router and the DMA path check the owner on every delivery and every
        transfer, so from here the old guest never sees the device again
        (XSA-237/302). The device is *leaving*: nobody can be assigned it, and
        its virtual address is not reused, until :meth:`release`.
        Returns the guest and the virtual address it had.
        """
        dev = self.get(device_id)
        if dev.guest is None or dev.address is None:
            state = (
                f"already being removed from guest {dev.leaving!r}"
                if dev.leaving is not None
                else "not assigned to any guest"
            )
            raise PcisplitError(f"device {device_id} is {state}", code=ErrorCode.INVALID_STATE)
        guest, address = dev.guest, dev.address
        del self._buses[guest][address.pack()]
        self._gone[guest].add(address.pack())
        self._held[guest].add(address.pack())
        dev.guest, dev.address = None, None
        dev.leaving, dev.leaving_address = guest, address
        if dev.runtime is not None:
            dev.runtime.cancel_background()
        return guest, address

    def release(self, device_id: str) -> bool:
        """The second half of a removal: reset the device and make it free.

        The reset happens here, on every path that ends an assignment, before
        the device can be assigned again (:meth:`reset`; ``release_hooks``
        drop per-device state such as the IRQ router's). The virtual address
        and guest-physical windows the device had become reusable, also when
        the reset failed. A device whose reset failed is **hidden** (offered to
        nobody) and the failure logged: what a guest wrote may still be in it.
        Returns True when the reset succeeded.
        """
        dev = self.get(device_id)
        if dev.guest is not None:
            raise PcisplitError(
                f"device {device_id} is still assigned to guest {dev.guest!r}; detach it first",
                code=ErrorCode.INVALID_STATE,
            )
        try:
            ok = self.reset(dev, f"leaving guest {dev.leaving}")
        finally:
            if dev.leaving is not None:
                # Its guest-physical windows, like its virtual address, are held until now.
                self.firmware[dev.leaving].release(dev.id)
                if dev.leaving_address is not None:
                    self._held[dev.leaving].discard(dev.leaving_address.pack())
            dev.leaving, dev.leaving_address = None, None
        if not ok:
            dev.hidden = True
            log.error(
                "device %s could not be reset, so it is hidden (offered to no guest): what its "
                "last guest wrote may still be in it; check the device, then run "
                "`pciback ctl reset %s` and `pciback ctl unhide %s`",
                device_id, device_id, device_id,
            )
        return ok

    def reset(self, dev: ServedDevice, why: str) -> bool:
        """Reset ``dev`` now: its background work, the device, and every release hook.

        An assigned device is reset through its access path (the model, the
        policy's virtual registers, the firmware's programming); a free or
        leaving one through its provider. Every step runs even when an earlier
        one fails: a failure (of any exception type: a plugin's model may
        raise anything) is logged with its traceback, counted in
        :attr:`reset_failures`, and never skips the other steps or the other
        devices of the caller's loop. Returns True when every step succeeded.
        The caller holds the device lock (or nothing else can reach it).
        """
        ok = True
        try:
            if dev.runtime is not None:
                dev.runtime.cancel_background()
            if dev.guest is not None:
                dev.access.reset()
            else:
                dev.provider.reset()
        except Exception:  # logged with its traceback and counted below
            ok = False
            log.exception("device %s: reset (%s) failed", dev.id, why)
        for hook in self.release_hooks:
            try:
                hook(dev)
            except Exception:  # logged with its traceback and counted below
                ok = False
                log.exception("device %s: release hook %r failed (%s)", dev.id, hook, why)
        if not ok:
            self.reset_failures += 1
        return ok

    def add_device(
        self, cfg: DeviceConfig, provider: DeviceProvider, physical: PciAddress | None
    ) -> ServedDevice:
        """Serve a new device (a reload added or redefined it); free, or hidden by ``hide``."""
        if cfg.id in self._devices:
            raise PcisplitError(
                f"device {cfg.id} is already served; remove it first", code=ErrorCode.BUSY
            )
        hidden = self.config.is_hidden(physical) is not None
        dev = self._devices[cfg.id] = ServedDevice(cfg, provider, physical, hidden=hidden)
        return dev

    def remove_device(self, device_id: str) -> ServedDevice:
        """Stop serving a free device (a reload removed or redefined it); close its provider.

        Refused while it is assigned or leaving: unassign it first (that resets it).
        """
        dev = self.get(device_id)
        if dev.state in ("assigned", "leaving"):
            owner = dev.guest or dev.leaving
            raise PcisplitError(
                f"device {device_id} is still {dev.state} (guest {owner!r}); unassign it first",
                code=ErrorCode.INVALID_STATE,
            )
        if dev.runtime is not None:
            dev.runtime.cancel_background()
        del self._devices[device_id]
        close = getattr(dev.provider, "close", None)
        if callable(close):
            close()  # a host device's sysfs file
        return dev

    def add_guest(self, name: str, bus: str = "virtual") -> None:
        """A guest declared by a config reload: an empty bus of its own."""
        if name in self._buses:
            return
        self._buses[name] = {}
        self._views[name] = bus
        self._gone[name] = set()
        self._held[name] = set()
        self.firmware[name] = GuestFirmware(name)

    def find(self, text: str) -> ServedDevice:
        """A device by its id or by its host address (``0000:03:00.0``, ``03:00.0``)."""
        if text in self._devices:
            return self._devices[text]
        try:
            address = PciAddress.parse(text)
        except ValueError:
            address = None
        for dev in self._devices.values():
            if address is not None and dev.physical == address:
                return dev
        raise NotAssignedError(
            f"no device with id or host address {text!r}; "
            + did_you_mean(text, list(self._devices))
        )

    def set_hidden(self, device_id: str, hidden: bool) -> None:
        """Hide a free device from every guest, or offer it again."""
        dev = self.get(device_id)
        if hidden and dev.state in ("assigned", "leaving"):
            owner = dev.guest or dev.leaving
            raise PcisplitError(
                f"device {device_id} is assigned to guest {owner!r}; unassign it before hiding it",
                code=ErrorCode.BUSY,
            )
        dev.hidden = hidden

    def devices_of(self, guest: str) -> list[ServedDevice]:
        """The guest's devices in virtual-address order."""
        bus = self._buses.get(guest, {})
        return [bus[k] for k in sorted(bus)]

    def lookup(self, guest: str, packed_address: int) -> ServedDevice:
        """The device at ``packed_address`` on ``guest``'s bus, or NotAssignedError."""
        dev = self._buses.get(guest, {}).get(packed_address)
        if dev is None:
            try:
                shown = str(PciAddress.unpack(packed_address))
            except ValueError:
                shown = f"{packed_address:#x}"
            if packed_address in self._gone.get(guest, ()):
                raise DeviceRemovedError(
                    f"the device at {shown} was hot-unplugged from guest {guest!r}'s bus; "
                    "forget it (the guest agent removes it from bus.devices)"
                )
            raise NotAssignedError(
                f"no device at {shown} on guest {guest!r}'s bus; take a bus snapshot to list them"
            )
        return dev

    def knows_guest(self, guest: str) -> bool:
        return guest in self._buses
