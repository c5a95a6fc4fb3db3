"""The service's life: systemd notification, config reload (SIGHUP), the startup summary.

* :func:`sd_notify` speaks systemd's notify protocol (``READY=1``,
  ``RELOADING=1``, ``STOPPING=1``) on ``$NOTIFY_SOCKET``, and does nothing
  when that variable is unset, so ``Type=notify`` units work and nothing else
  notices.
* :func:`reload` reads the config file again and applies what can change
  while guests are connected: ``[[guest]]`` identities (new connections use
  them), new guests, ``hide``, ``[hotplug]``, and devices: a device whose
  assignment, definition or existence changed is hot-unplugged from its
  guest (reset on the way out), replaced, and hot-plugged into its new guest,
  so connected guests see device-removed/added events; guests owning none of
  the changed devices notice nothing. A config that does not validate, whose
  new devices cannot be created, or that changes something only a restart
  can change (listen addresses, TLS, ``[limits]``, the control socket,
  ``[transport]``, ``[dma]``, ``[audit]``, quirks, removing a guest), is
  refused as a whole and the running config stays.
* :func:`summary` is the one line ``pciback serve`` prints once it is up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pciback.config import BackendConfig, DeviceConfig, load_config
from pciback.devices import DeviceProvider, HostDevice
from pciback.ops.interface import OperatedBackend
from pciback.plane.access import make_access
from pciback.plane.registry import build_provider
from shared.errors import ConfigFileError, PcisplitError
from shared.pci import PciAddress

__all__ = ["sd_notify", "reload", "ReloadResult", "summary", "plan_reload"]

log = logging.getLogger("pcisplit.backend")


def sd_notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``...) to systemd; False (and nothing sent) without it."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        # systemd went away or the path is wrong: the service keeps running, and says so.
        log.warning("sd_notify(%s) to %s failed: %s", state.split("\n")[0], target, exc)
        return False
    return True


def notify_reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp systemd (>= 253) wants with it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def summary(backend: OperatedBackend) -> str:
    """``pciback: serving 2 guests, 3 devices (2 assigned, 1 hidden) on ...; control ...``."""
    devices = list(backend.registry)
    assigned = sum(dev.guest is not None for dev in devices)
    hidden = sum(dev.hidden for dev in devices)
    listen = ", ".join(backend.bound_addresses()) or "nothing"
    text = (
        f"pciback: serving {len(backend.config.guests)} guest(s), {len(devices)} device(s) "
        f"({assigned} assigned, {hidden} hidden) on {listen}"
    )
    if backend.control_path is not None:
        text += f"; control socket {backend.control_path}"
    return text


@dataclass(frozen=True)
class ReloadResult:
    """What a reload changed.

    ``moves``: (device, old guest, new guest) of devices whose only change is
    their guest. ``redefined``, ``added``, ``removed``: devices whose
    definition changed, that are new, that are gone (by id).
    """

    moves: tuple[tuple[str, str | None, str | None], ...]
    guests_added: tuple[str, ...]
    hide_changed: bool
    redefined: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [
            f"{dev}: {old or 'free'} -> {new or 'free'}" for dev, old, new in self.moves
        ]
        parts += [f"{dev}: redefined" for dev in self.redefined]
        parts += [f"{dev}: added" for dev in self.added]
        parts += [f"{dev}: removed" for dev in self.removed]
        if self.guests_added:
            parts.append("new guests " + ", ".join(self.guests_added))
        if self.hide_changed:
            parts.append("hide changed")
        return "; ".join(parts) or "no changes"


def _shape(dev: DeviceConfig) -> DeviceConfig:
    """A device's definition without its assignment, to compare two configs."""
    return dataclasses.replace(dev, guest=None, where="")


#: What only a restart can change: (the config key(s) named in the refusal, attributes).
RESTART_ONLY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("listen", ("listen",)),
    ("tls", ("tls",)),
    ("limits", ("limits", "resources")),
    ("control", ("control",)),
    ("listen_mode", ("listen_mode",)),
    ("listen_group", ("listen_group",)),
    ("sysfs_root", ("sysfs_root",)),
    ("transport", ("shm_poll_us", "shm_ring_size")),
    ("dma", ("dma_call_timeout",)),
    ("audit", ("audit_rate", "audit_burst")),
    ("quirk", ("quirks",)),
)


def plan_reload(old: BackendConfig, new: BackendConfig) -> ReloadResult:
    """Check that ``new`` can replace ``old`` live; raise ConfigFileError naming what cannot.

    Listeners, TLS, ``[limits]``, the control socket, socket modes,
    ``sysfs_root``, ``[transport]``, ``[dma]``, ``[audit]`` and quirks are
    fixed when the backend starts (connections, buffers and policies already
    use them), and removing a guest would strand its connections: a change to
    any of them refuses the whole reload. Devices may change in every way.
    """
    for key, attributes in RESTART_ONLY:
        if any(getattr(old, a) != getattr(new, a) for a in attributes):
            raise ConfigFileError(
                f"{key}: changed, which needs a restart of the backend; reload refused "
                "(the running configuration stays)"
            )
    removed_guests = sorted(set(old.guests) - set(new.guests))
    if removed_guests:
        raise ConfigFileError(
            f"guest {removed_guests[0]!r} was removed, which needs a restart; reload refused "
            "(the running configuration stays)"
        )
    old_devices = {dev.id: dev for dev in old.devices}
    new_devices = {dev.id: dev for dev in new.devices}
    kept = [dev_id for dev_id in new_devices if dev_id in old_devices]
    redefined = tuple(
        dev_id for dev_id in kept if _shape(new_devices[dev_id]) != _shape(old_devices[dev_id])
    )
    moves = tuple(
        (dev_id, old_devices[dev_id].guest, new_devices[dev_id].guest)
        for dev_id in kept
        if dev_id not in redefined and new_devices[dev_id].guest != old_devices[dev_id].guest
    )
    return ReloadResult(
        moves=moves,
        guests_added=tuple(sorted(set(new.guests) - set(old.guests))),
        hide_changed=old.hide != new.hide,
        redefined=redefined,
        added=tuple(dev_id for dev_id in new_devices if dev_id not in old_devices),
        removed=tuple(dev_id for dev_id in old_devices if dev_id not in new_devices),
    )


def _build(
    backend: OperatedBackend, new: BackendConfig, ids: tuple[str, ...]
) -> dict[str, tuple[DeviceProvider, PciAddress | None]]:
    """The providers of new and redefined devices, each checked with its policy.

    Raises ConfigFileError (and closes what it built) if any cannot be made:
    the reload is then refused before anything changed.
    """
    by_id = {dev.id: dev for dev in new.devices}
    built: dict[str, tuple[DeviceProvider, PciAddress | None]] = {}
    try:
        for dev_id in ids:
            cfg = by_id[dev_id]
            provider, physical = build_provider(cfg, new.sysfs_root, base=new.base)
            built[dev_id] = provider, physical
            # The policy compiles now, not half-way through the reload.
            make_access(
                provider, cfg, guest=cfg.guest or "-", quirks=new.quirks,
                audit=backend.registry.audit,
            )
    except BaseException:
        for provider, _ in built.values():
            _close(provider)
        raise
    return built


def _close(provider: DeviceProvider) -> None:
    close = getattr(provider, "close", None)
    if callable(close):
        close()


async def reload(backend: OperatedBackend, path: str | Path) -> ReloadResult:
    """Apply the config file at ``path`` to the running ``backend`` (see the module doc).

    Raises :class:`ConfigFileError` (nothing changed) when the file does not
    validate or cannot be applied live; a hot-plug step that fails is logged
    and the others still run. Devices that were not changed, and guests that
    own none of the changed devices, notice nothing.
    """
    new = load_config(path)
    plan = plan_reload(backend.config, new)
    registry = backend.registry
    # Validate what the running devices' state decides before changing anything.
    for dev_id, _old, guest in plan.moves:
        dev = registry.get(dev_id)
        if guest is not None and new.is_hidden(dev.physical) is not None:
            raise ConfigFileError(f"device {dev_id} is hidden by the new config's hide")
    built = _build(backend, new, plan.redefined + plan.added)
    backend.adopt_config(new)
    # 1. Take every affected device away from its guest (hot-unplug: reset on the way out).
    leaving = [dev_id for dev_id, old_guest, _ in plan.moves if old_guest is not None]
    for dev_id in (*plan.removed, *plan.redefined, *leaving):
        if registry.get(dev_id).guest is not None:
            why = "moved" if dev_id in leaving else "removed or redefined"
            try:
                await backend.unassign(dev_id, reason=f"{why} by a configuration reload")
            except PcisplitError as exc:
                log.error("reload: could not unassign %s: %s", dev_id, exc)
    # 2. Replace the definitions.
    saved: dict[str, bytes] = {}
    for dev_id in (*plan.removed, *plan.redefined):
        try:
            old = backend.remove_device(dev_id)
        except PcisplitError as exc:
            log.error("reload: could not remove %s: %s", dev_id, exc)
            continue
        if isinstance(old.provider, HostDevice) and old.provider.writable:
            saved[str(old.provider.address)] = old.provider.saved_config
    by_id = {dev.id: dev for dev in new.devices}
    for dev_id in (*plan.redefined, *plan.added):
        provider, physical = built[dev_id]
        previous = saved.get(str(physical)) if isinstance(provider, HostDevice) else None
        if previous is not None and provider.writable and len(previous) == provider.config_size:
            # Opened while the old definition's guest still held it: the clean config is
            # the one saved by the old definition, not what was read at open time.
            provider.saved_config = previous
        try:
            backend.add_device(by_id[dev_id], provider, physical)
        except PcisplitError as exc:
            log.error("reload: could not add %s: %s", dev_id, exc)
            _close(provider)
            continue
    backend.record_host_state(devices_changed=bool(saved) or bool(built))
    # 3. Assign (hot-plug: the guests see device-added).
    assign = [(dev_id, guest) for dev_id, _old, guest in plan.moves if guest is not None]
    assign += [
        (dev_id, by_id[dev_id].guest)
        for dev_id in (*plan.redefined, *plan.added)
        if by_id[dev_id].guest is not None
    ]
    for dev_id, guest in assign:
        assert guest is not None
        try:
            await backend.assign(dev_id, guest)
        except PcisplitError as exc:
            log.error("reload: could not assign %s to %s: %s", dev_id, guest, exc)
    log.debug("configuration reloaded from %s: %s", path, plan.describe())
    return plan
