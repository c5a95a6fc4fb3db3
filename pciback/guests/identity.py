"""Who may act as which guest: the ``[[guest]]`` identity keys and the one check.

A connection names a guest in its ``Hello``; naming is not proving. The
backend accepts the name only if the connection proves it, in the way the
transport allows (see ``docs/operations.md#identity``):

* transports that report kernel credentials (``unix:``, ``shm:``, and the
  in-process ``memory:``): the peer's uid must be in the guest's ``uid`` list
  or its effective gid or one of its supplementary groups (``SO_PEERGROUPS``,
  where the kernel reports them) in the ``gid`` list. A guest without either
  key is reachable only by uid 0 and by the uid the backend runs as, never by
  everyone;
* ``tls://``: the verified client certificate's CN or one of its DNS
  subjectAltNames equals the guest name, compared case-insensitively as DNS
  names are (the listener requires ``[tls] ca``, so the certificate was
  verified before we got here);
* everything else (``tcp://``, ``vsock://``, plugins without credentials):
  the guest's token (``token_file``) sent in ``Hello.token``, compared in
  constant time. A guest without a token cannot use these transports.

:func:`authorize` is the only place these rules live; the service calls it
for every handshake and logs every refusal.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigFileError, ErrorCode
from shared.transport import PeerIdentity

__all__ = [
    "GuestConfig",
    "Refusal",
    "authorize",
    "parse_guest",
    "read_token_file",
    "unreachable",
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


@dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the wire code and a message that says what to do."""

    code: ErrorCode
    message: str


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


def _credential_refusal(guest: GuestConfig, peer: PeerIdentity, service_uid: int) -> str | None:
    assert peer.uid is not None and peer.gid is not None
    if guest.uids or guest.gids:
        if peer.uid in guest.uids or peer.in_group(guest.gids):
            return None
        wanted = [f"uid {', '.join(map(str, guest.uids))}"] if guest.uids else []
        wanted += [f"gid {', '.join(map(str, guest.gids))}"] if guest.gids else []
        groups = f" groups {','.join(map(str, peer.groups))}" if peer.groups else ""
        return (
            f"guest {guest.name!r} accepts only {' or '.join(wanted)}, and this process runs "
            f"as uid {peer.uid} gid {peer.gid}{groups}; run the frontend as that user or in "
            "that group, or add its uid/gid to the guest's uid/gid keys in the backend config"
        )
    if peer.uid in (0, service_uid):
        return None
    return (
        f"guest {guest.name!r} declares no uid or gid, so only root and the backend's own "
        f"uid {service_uid} may act as it, not uid {peer.uid}; add uid = {peer.uid} (or its "
        "gid) to the guest in the backend config"
    )


def _certificate_refusal(guest: GuestConfig, peer: PeerIdentity) -> str | None:
    wanted = guest.name.casefold()
    if any(name.casefold() == wanted for name in peer.cert_names):
        return None
    shown = ", ".join(map(repr, peer.cert_names)) or "no name"
    return (
        f"the TLS client certificate names {shown}, not guest {guest.name!r}; issue the guest "
        "a certificate whose CN or DNS subjectAltName is its guest name"
    )


def _token_refusal(guest: GuestConfig, token: bytes, scheme: str) -> str | None:
    if not guest.token:
        return (
            f"guest {guest.name!r} has no token_file, so it cannot prove its identity over "
            f"{scheme}://; give it token_file = \"PATH\" in the backend config (or use unix:, "
            "shm: or tls://)"
        )
    # compare_digest takes time independent of where the first difference is.
    if hmac.compare_digest(token, guest.token):
        return None
    return (
        f"wrong or missing token for guest {guest.name!r}; the frontend must send the "
        "contents of the guest's token_file (pcifront --token-file PATH)"
    )


def authorize(
    guest: GuestConfig,
    peer: PeerIdentity,
    *,
    scheme: str,
    token: bytes,
    service_uid: int | None = None,
) -> Refusal | None:
    """None if ``peer`` may act as ``guest`` over ``scheme``, else why not.

    ``scheme`` is the listener's transport scheme name (``"unix"``, ``"tls"``,
    ...), ``token`` the ``Hello.token`` the frontend sent. ``service_uid``
    defaults to the effective uid of this process.
    """
    uid = os.geteuid() if service_uid is None else service_uid
    if peer.has_credentials:
        problem = _credential_refusal(guest, peer, uid)
    elif scheme == "tls":
        problem = _certificate_refusal(guest, peer)
    else:
        problem = _token_refusal(guest, token, scheme)
    return None if problem is None else Refusal(ErrorCode.NOT_AUTHORIZED, problem)


def tls_listeners(addresses: Sequence[str]) -> list[str]:
    """The ``tls://`` addresses among ``addresses`` (they need ``[tls] ca``)."""
    return [a for a in addresses if a.startswith("tls://")]


#: Schemes whose peers prove a guest name with kernel credentials or a certificate:
#: any guest can connect over them (root and the backend's own user always can).
_NO_TOKEN_NEEDED = frozenset({"unix", "shm", "memory", "tls"})


def _token_problem(guest: GuestConfig, scheme: str) -> str | None:
    """Why ``guest`` will be refused on a ``scheme`` listener that needs a token, or None."""
    missing = []
    if scheme == "tcp" and not guest.allow_plain_tcp:
        missing.append("allow_plain_tcp = true")
    if not guest.token:
        missing.append('token_file = "PATH"')
    return " and ".join(missing) or None


def unreachable(addresses: Sequence[str], guests: dict[str, GuestConfig]) -> list[str]:
    """Warnings for listeners no guest can use and guests that can use no listener.

    The same rules as :func:`authorize` and the service's plain-TCP check, applied
    to the configuration alone (``pciback check`` prints them): over ``tcp://`` a
    guest needs ``allow_plain_tcp = true`` and a ``token_file``, over ``vsock://`` a
    ``token_file``; ``unix:``, ``shm:`` and ``tls://`` need neither. Listeners of
    transport plugins are not judged.
    """
    schemes = {address: address.split(":", 1)[0] for address in addresses}
    judged = {a: s for a, s in schemes.items() if s in ("tcp", "vsock")}
    warnings = []
    for address, scheme in judged.items():
        if guests and all(_token_problem(g, scheme) for g in guests.values()):
            needs = "allow_plain_tcp = true and " if scheme == "tcp" else ""
            warnings.append(
                f"listen {address}: no guest can connect there: every guest will be refused "
                f"(over {scheme}:// a guest needs {needs}token_file = \"PATH\" in its [[guest]] "
                "table)"
            )
    if any(scheme not in judged.values() for scheme in schemes.values()):
        # A unix:, shm:, tls:// or plugin listener: every guest has a way in. A guest
        # that asks for plain TCP without a token still never gets in over it.
        tcp = [a for a, s in judged.items() if s == "tcp"]
        warnings += [
            f"guest {g.name!r} sets allow_plain_tcp = true but has no token_file, so it will "
            f"be refused on {', '.join(tcp)}; add token_file = \"PATH\""
            for g in guests.values()
            if tcp and g.allow_plain_tcp and not g.token
        ]
        return warnings
    for guest in guests.values():
        problems = [
            f"{address} (add {problem})"
            for address, scheme in judged.items()
            if (problem := _token_problem(guest, scheme))
        ]
        if judged and len(problems) == len(judged):
            warnings.append(
                f"guest {guest.name!r} cannot connect on any listener: " + "; ".join(problems)
            )
    return warnings
