"""Stand-ins for what a ```toml block names that the reader provides (docs/README.md).

``<!-- stand-ins: WORD ... -->`` above a ```toml block: each WORD is a file the
block names (a ``[tls]`` certificate, key or CA, a snapshot ``dump``, a guest's
``token_file``, a vfio-user server's ``socket``) or a host device address
(``kind = "host"``). For the check
only, the runner creates a stand-in for each in the page's scratch directory:
a CA and a server certificate made for the occasion, a copy of a real dump
from ``tests/data/pcidata``, a random token (mode 0600), or a function of a
copied sysfs tree (``sysfs_root`` is pointed at it), or libvfio-user's
gpio-pci-idio-16 sample serving the socket. Everything the block names
that is not a stand-in must exist, and a WORD the block does not name fails,
so the marker cannot go stale. The stand-ins are removed after the check.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trustme

from shared.pci import PciAddress, parse_dump
from tests.pciback.vfio_user._vfio_user_peer import gpio_server

__all__ = ["stand_ins", "StandInError"]

REPO = Path(__file__).resolve().parents[2]
PCIDATA = REPO / "tests" / "data" / "pcidata"
#: The dump a stand-in ``dump`` file or host device is made from, unless
#: tests/data/pcidata has a file of the very name the block uses.
DEFAULT_DUMP = PCIDATA / "eth_intel_82576_sriov.txt"
#: Where a block without ``sysfs_root`` finds its stand-in host devices.
SYSFS_DIR = ".stand-in-sysfs"


class StandInError(Exception):
    """A ``stand-ins`` marker that does not fit its block."""


def _roles(raw: dict[str, Any]) -> dict[str, str]:
    """Every file and host address the config names -> what it is."""
    roles: dict[str, str] = {}
    tls = raw.get("tls")
    if isinstance(tls, dict):
        for key in ("cert", "key", "ca"):
            if isinstance(tls.get(key), str):
                roles[tls[key]] = f"tls.{key}"
    for guest in raw.get("guest", []) if isinstance(raw.get("guest"), list) else []:
        if isinstance(guest, dict) and isinstance(guest.get("token_file"), str):
            roles[guest["token_file"]] = "token_file"
    for dev in raw.get("device", []) if isinstance(raw.get("device"), list) else []:
        if not isinstance(dev, dict):
            continue
        if dev.get("kind") == "snapshot" and isinstance(dev.get("dump"), str):
            roles[dev["dump"]] = "dump"
        if dev.get("kind") == "vfio-user" and isinstance(dev.get("socket"), str):
            roles[dev["socket"]] = "vfio-user"
        if dev.get("kind") == "host" and isinstance(dev.get("address"), str):
            roles[str(PciAddress.parse(dev["address"]))] = "host"
    return roles


def _dump_for(name: str) -> Path:
    same = PCIDATA / Path(name).name
    return same if same.is_file() else DEFAULT_DUMP


def _host_function(root: Path, address: str) -> Path:
    path = root / address
    path.mkdir(parents=True)
    config = parse_dump(DEFAULT_DUMP.read_text())[0].data
    (path / "config").write_bytes(config)
    (path / "resource").write_text("")
    return path


@contextmanager
def stand_ins(text: str, words: list[str], scratch: Path) -> Iterator[str]:
    """Create the stand-ins ``words`` name for the config ``text``; yield the text to check.

    The text is the block itself, with ``sysfs_root`` pointed at the stand-in
    sysfs tree when the block has host-device stand-ins and no ``sysfs_root``.
    """
    if not words:
        yield text
        return
    raw = tomllib.loads(text)
    roles = _roles(raw)
    made: list[Path] = []
    servers = ExitStack()
    ca: trustme.CA | None = None
    server: trustme.LeafCert | None = None
    sysfs_text = raw.get("sysfs_root")
    sysfs = scratch / (sysfs_text if isinstance(sysfs_text, str) else SYSFS_DIR)
    try:
        for word in words:
            try:
                key = str(PciAddress.parse(word))
            except ValueError:
                key = word
            role = roles.get(key)
            if role is None:
                raise StandInError(
                    f"stand-in {word!r}: the block names no such file or host device "
                    f"(it names: {', '.join(sorted(roles)) or 'nothing'})"
                )
            if role == "host":
                if (sysfs / key).exists():
                    raise StandInError(f"stand-in {word!r}: {sysfs / key} exists already")
                sysfs_existed = sysfs.exists()
                _host_function(sysfs, key)
                made.append(sysfs if not sysfs_existed else sysfs / key)
                continue
            target = scratch / word
            if target.exists():
                raise StandInError(
                    f"stand-in {word!r}: the page already made {target}; drop it from the marker"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            made.append(target)
            if role.startswith("tls."):
                if ca is None:
                    ca = trustme.CA()
                    server = ca.issue_cert("localhost")
                assert server is not None
                if role == "tls.cert":
                    server.cert_chain_pems[0].write_to_path(str(target))
                elif role == "tls.key":
                    server.private_key_pem.write_to_path(str(target))
                else:
                    ca.cert_pem.write_to_path(str(target))
            elif role == "vfio-user":
                servers.enter_context(gpio_server(target.parent, target.name))
            elif role == "dump":
                shutil.copyfile(_dump_for(word), target)
            else:  # token_file
                target.write_text(secrets.token_hex(32) + "\n")
                os.chmod(target, 0o600)
        if any(roles.get(w) == "host" for w in words) and not isinstance(sysfs_text, str):
            text = f"sysfs_root = {str(sysfs)!r}\n" + text
        yield text
    finally:
        servers.close()
        for path in reversed(made):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
