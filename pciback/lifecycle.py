"""The service's life: systemd notification, config reload (SIGHUP), the startup summary.

* :func:`sd_notify` speaks systemd's notify protocol (``READY=1``,
  ``RELOADING=1``, ``STOPPING=1``) on ``$NOTIFY_SOCKET``, and does nothing
  when that variable is unset, so ``Type=notify`` units work and nothing else
  notices.
* :func:`reload` reads the config file again and applies what can change
  while guests are connected: ``[[guest]]`` identities (new connections use
  them), new guests, ``hide``, and device assignments, which move as
  hot-plug operations (unassign first, then assign) so connected guests see
  device-removed/added events and devices are reset on the way out. A
  config that does not validate, or that changes something only a restart
  can change (listen addresses, TLS, a device's definition, removing a
  guest), is refused as a whole and the running config stays.
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
from typing import TYPE_CHECKING

from pciback.config import BackendConfig, DeviceConfig, load_config
from shared.errors import ConfigFileError, PcisplitError

if TYPE_CHECKING:
    from pciback.service import Backend

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


def summary(backend: Backend) -> str:
    """``pciback: serving 2 guests, 3 devices (2 assigned, 1 hidden) on ...; control ...``."""
    devices = list(backend.registry)
    assigned = sum(dev.guest is not None for dev in devices)
    hidden = sum(dev.hidden for dev in devices)
    listen = ", ".join(lst.address for lst in backend.listeners) or "nothing"
    text = (
        f"pciback: serving {len(backend.config.guests)} guest(s), {len(devices)} device(s) "
        f"({assigned} assigned, {hidden} hidden) on {listen}"
    )
    if backend.control_path is not None:
        text += f"; control socket {backend.control_path}"
    return text


@dataclass(frozen=True)
class ReloadResult:
    """What a reload changed (``moves``: device, old guest, new guest)."""

    moves: tuple[tuple[str, str | None, str | None], ...]
    guests_added: tuple[str, ...]
    hide_changed: bool

    def describe(self) -> str:
        parts = [
            f"{dev}: {old or 'free'} -> {new or 'free'}" for dev, old, new in self.moves
        ]
        if self.guests_added:
            parts.append("new guests " + ", ".join(self.guests_added))
        if self.hide_changed:
            parts.append("hide changed")
        return "; ".join(parts) or "no changes"


def _shape(dev: DeviceConfig) -> DeviceConfig:
    """A device's definition without its assignment, to compare two configs."""
    return dataclasses.replace(dev, guest=None, where="")


def plan_reload(old: BackendConfig, new: BackendConfig) -> ReloadResult:
    """Check that ``new`` can replace ``old`` live; raise ConfigFileError naming what cannot."""
    for key in ("listen", "tls", "limits", "control", "listen_mode", "listen_group", "sysfs_root"):
        if getattr(old, key) != getattr(new, key):
            raise ConfigFileError(
                f"{key}: changed, which needs a restart of the backend; reload refused "
                "(the running configuration stays)"
            )
    removed = sorted(set(old.guests) - set(new.guests))
    if removed:
        raise ConfigFileError(
            f"guest {removed[0]!r} was removed, which needs a restart; reload refused "
            "(the running configuration stays)"
        )
    old_devices = {dev.id: dev for dev in old.devices}
    new_devices = {dev.id: dev for dev in new.devices}
    if set(old_devices) != set(new_devices):
        changed = sorted(set(old_devices) ^ set(new_devices))[0]
        raise ConfigFileError(
            f"device {changed!r} was added or removed, which needs a restart; reload refused "
            "(the running configuration stays)"
        )
    for dev_id, dev in new_devices.items():
        if _shape(dev) != _shape(old_devices[dev_id]):
            raise ConfigFileError(
                f"{dev.where} ({dev_id}): its definition changed, which needs a restart (only "
                "guest may change on reload); reload refused (the running configuration stays)"
            )
    moves = tuple(
        (dev_id, old_devices[dev_id].guest, dev.guest)
        for dev_id, dev in new_devices.items()
        if dev.guest != old_devices[dev_id].guest
    )
    return ReloadResult(
        moves=moves,
        guests_added=tuple(sorted(set(new.guests) - set(old.guests))),
        hide_changed=old.hide != new.hide,
    )


async def reload(backend: Backend, path: str | Path) -> ReloadResult:
    """Apply the config file at ``path`` to the running ``backend`` (see the module doc).

    Raises :class:`ConfigFileError` (nothing changed) when the file does not
    validate or cannot be applied live; a hot-plug step that fails is logged
    and the others still run.
    """
    new = load_config(path)
    plan = plan_reload(backend.config, new)
    registry = backend.registry
    # Validate what the running devices' state decides before changing anything.
    for dev_id, _old, guest in plan.moves:
        dev = registry.get(dev_id)
        if guest is not None and new.is_hidden(dev.physical) is not None:
            raise ConfigFileError(f"device {dev_id} is hidden by the new config's hide")
    backend.config = new
    registry.config = new
    for name in plan.guests_added:
        registry.add_guest(name, new.guests[name].bus)
    for dev in registry:
        if dev.state in ("free", "hidden") and dev.physical is not None:
            dev.hidden = new.is_hidden(dev.physical) is not None
    for dev_id, old_guest, _new in plan.moves:
        if old_guest is not None and registry.get(dev_id).guest is not None:
            try:
                await backend.unassign(dev_id, reason="moved by a configuration reload")
            except PcisplitError as exc:
                log.error("reload: could not unassign %s: %s", dev_id, exc)
    for dev_id, _old, new_guest in plan.moves:
        if new_guest is not None:
            try:
                await backend.assign(dev_id, new_guest)
            except PcisplitError as exc:
                log.error("reload: could not assign %s to %s: %s", dev_id, new_guest, exc)
    log.info("configuration reloaded from %s: %s", path, plan.describe())
    return plan
