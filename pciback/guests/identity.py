"""Who may act as which guest: the one check of a connection against a ``[[guest]]``.

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
for every handshake and logs every refusal. The ``[[guest]]`` tables
themselves are parsed with the rest of the config (:mod:`pciback.config`).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pciback.config import GuestConfig
from shared.errors import ErrorCode
from shared.transport import PeerIdentity

__all__ = ["Refusal", "authorize", "unreachable"]


@dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the wire code and a message that says what to do."""

    code: ErrorCode
    message: str


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
