"""Backend configurations as TOML text, built so that a test shows what it depends on.

Most end-to-end tests need guests and a few edu devices, some owned and some
spare. Instead of a copied ``[[guest]]`` / ``[[device]]`` block, a test writes
the part it depends on::

    CONFIG = "[dma]\\ncall_timeout = 2.0\\n" + TWO_GUESTS
    BEFORE = edu_config(["alpha", "beta"], {"edu-a": "alpha", "edu-b": "beta", "edu-c": None})
    AFTER = edu_config(["alpha"], {"edu-a": "alpha"}) + device_table("m", model="sec-msix")

Top-level keys and sections (``listen``, ``sysfs_root``, ``[dma]``) go in front
of the text, extra ``[[device]]`` tables after it: plain concatenation keeps
the TOML valid.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "ONE_GUEST",
    "TWO_GUESTS",
    "device_table",
    "edu_config",
    "guest_table",
    "listen_line",
    "toml_value",
    "writable_host_config",
]

TomlValue = str | int | float | bool | list["TomlValue"] | dict[str, "TomlValue"]


def toml_value(value: TomlValue) -> str:
    """``value`` as a TOML value (strings quoted, lists and inline tables nested)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def _table(header: str, keys: Mapping[str, TomlValue | None]) -> str:
    lines = [header] + [f"{k} = {toml_value(v)}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


def guest_table(name: str, **keys: TomlValue) -> str:
    """One ``[[guest]]`` table: ``guest_table("g", uid=4242)``."""
    return _table("[[guest]]", {"name": name, **keys})


def device_table(
    id: str, guest: str | None = None, *, model: str | None = "edu", **keys: TomlValue
) -> str:
    """One ``[[device]]`` table; an emulated edu unless ``model`` or ``kind`` says otherwise.

    ``guest=None`` leaves the device unassigned (spare). Other keys are written
    as given: ``device_table("nic", "g", model=None, kind="snapshot", dump="nic.txt")``.
    """
    return _table("[[device]]", {"id": id, "model": model, **keys, "guest": guest})


def edu_config(guests: Iterable[str], edus: Mapping[str, str | None]) -> str:
    """``[[guest]]`` tables for ``guests``, then one edu device per entry of ``edus``.

    ``edus`` maps a device id to its owner (``None``: spare), in bus order.
    """
    return "".join(guest_table(g) for g in guests) + "".join(
        device_table(d, owner) for d, owner in edus.items()
    )


def listen_line(*addresses: str) -> str:
    """The top-level ``listen = [...]`` line for ``addresses`` (put it first)."""
    return f"listen = {toml_value(list(addresses))}\n"


def writable_host_config(sysfs_root: Path, address: str, *, policy: str = "permissive") -> str:
    """Guest ``g`` with host function ``address`` as device ``h``: writable, ``policy``.

    ``sysfs_root`` is a fake host tree (``pciback.testing.FakeHost.root``): a
    writable host device is written to, so never this machine's.
    """
    return (
        f"sysfs_root = {toml_value(str(sysfs_root))}\n"
        + guest_table("g")
        + device_table(
            "h", "g", model=None, kind="host", address=address, writable=True, policy=policy
        )
    )


#: guest0 with one edu device, edu0: the smallest whole backend.
ONE_GUEST = edu_config(["guest0"], {"edu0": "guest0"})

#: Two guests that must not see each other: alpha owns edu-a, beta owns edu-b.
TWO_GUESTS = edu_config(["alpha", "beta"], {"edu-a": "alpha", "edu-b": "beta"})
