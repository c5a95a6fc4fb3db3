"""The ``[[guest]]`` tables: each guest's name, how it proves it, and its bus view.

Parsing only: whether a connection may act as a guest is decided by
:func:`pciback.guests.identity.authorize`, from the :class:`GuestConfig`
parsed here.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigFileError

__all__ = [
    "GuestConfig",
    "parse_guest",
    "read_token_file",
    "tls_listeners",
    "BUS_VIEWS",
    "GUEST_KEYS",
    "MIN_TOKEN_LEN",
]

#: A token shorter than this is too easy to guess; ``pciback check`` refuses it.
MIN_TOKEN_LEN = 16
_MAX_TOKEN_LEN = 256  # shared.protocol's Hello.token limit
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no change" to the kernel; never a real id

BUS_VIEWS = ("virtual", "passthrough")
GUEST_KEYS = frozenset({"name", "allow_plain_tcp", "uid", "gid", "token_file", "bus"})


@dataclass(frozen=True)
class GuestConfig:
    """One ``[[guest]]`` table: its name, how it proves it, and how it sees its bus."""

    name: str
    allow_plain_tcp: bool = False
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    token_file: Path | None = None
    #: The secret read from ``token_file`` (never logged, never in a repr).
    token: bytes = field(default=b"", repr=False)
    #: ``"virtual"``: devices numbered 00:00.0, 00:01.0...; ``"passthrough"``: host addresses.
    bus: str = "virtual"


def _ids(raw: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = raw.get(key, [])
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= _MAX_ID:
            shown = f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
            raise ConfigFileError(
                f"{shown}: expected a numeric {key} (0-{_MAX_ID}) or a list of them, got {item!r}"
            )
        out.append(item)
    return tuple(dict.fromkeys(out))


def read_token_file(path: Path, where: str) -> bytes:
    """The secret in ``path``: one line, surrounding whitespace dropped.

    Refused (naming ``where``): a missing or unreadable file, a token shorter
    than :data:`MIN_TOKEN_LEN` or longer than 256 bytes, and a file that other
    users may read (a secret everyone can read proves nothing).
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(
            f"{where}: cannot read token file {path}: {exc.strerror or exc}"
        ) from exc
    if st.st_mode & stat.S_IROTH:
        raise ConfigFileError(
            f"{where}: token file {path} is readable by every user (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
        )
    token = data.strip()
    if not MIN_TOKEN_LEN <= len(token) <= _MAX_TOKEN_LEN or b"\n" in token:
        raise ConfigFileError(
            f"{where}: token file {path} must hold one line of {MIN_TOKEN_LEN}-{_MAX_TOKEN_LEN} "
            f"bytes (it has {len(token)}); e.g. python3 -c 'import secrets; "
            f"print(secrets.token_hex(32))' > {path}"
        )
    return token


def parse_guest(raw: dict[str, Any], where: str, base: Path) -> GuestConfig:
    """Validate one ``[[guest]]`` table (its name was checked by the caller)."""
    plain = raw.get("allow_plain_tcp", False)
    if not isinstance(plain, bool):
        raise ConfigFileError(f"{where}.allow_plain_tcp: expected true or false, got {plain!r}")
    bus = raw.get("bus", "virtual")
    if bus not in BUS_VIEWS:
        raise ConfigFileError(f"{where}.bus: {bus!r} is not one of {', '.join(BUS_VIEWS)}")
    token_file: Path | None = None
    token = b""
    if "token_file" in raw:
        value = raw["token_file"]
        if not isinstance(value, str) or not value:
            raise ConfigFileError(f"{where}.token_file: expected a file path string")
        token_file = Path(value) if Path(value).is_absolute() else base / value
        token = read_token_file(token_file, f"{where}.token_file")
    return GuestConfig(
        name=raw["name"],
        allow_plain_tcp=plain,
        uids=_ids(raw, "uid", where),
        gids=_ids(raw, "gid", where),
        token_file=token_file,
        token=token,
        bus=bus,
    )


def tls_listeners(addresses: Sequence[str]) -> list[str]:
    """The ``tls://`` addresses among ``addresses`` (they need ``[tls] ca``)."""
    return [a for a in addresses if a.startswith("tls://")]
