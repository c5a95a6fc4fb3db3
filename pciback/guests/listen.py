"""Opening the front doors: the TLS context guests' ``tls://`` listeners use, and
what to do when a listen address cannot be bound."""

from __future__ import annotations

import errno
import os
import ssl

from pciback.config import BackendConfig
from shared.errors import ConfigFileError, reason

__all__ = ["server_ssl_context", "listen_hint"]


def server_ssl_context(config: BackendConfig) -> ssl.SSLContext | None:
    """TLS server context: guests must present a certificate signed by ``tls.ca``.

    Without ``tls.ca`` there is no context at all, so no ``tls://`` listener
    can exist that accepts any client (:func:`check_listen` says so first).
    """
    if config.tls is None or config.tls.ca is None:
        return None
    tls = config.tls
    for key, path in (("cert", tls.cert), ("key", tls.key), ("ca", tls.ca)):
        if not path.is_file():
            raise ConfigFileError(f"{config.source}: tls.{key}: {path}: no such file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigFileError(
            f"{config.source}: tls.cert {tls.cert} / tls.key {tls.key}: cannot load them "
            f"({reason(exc)}); both must be PEM files and the key must match the certificate"
        ) from exc
    try:
        ctx.load_verify_locations(str(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigFileError(
            f"{config.source}: tls.ca {tls.ca}: not a PEM CA certificate ({reason(exc)})"
        ) from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def listen_hint(exc: OSError) -> str:
    """What to do when ``address`` cannot be bound."""
    if exc.errno == errno.EADDRINUSE:
        return "something already listens there (another pciback?); stop it or pick another address"
    if exc.errno == errno.ENOENT:
        return "its directory does not exist; create it or pick another path"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"uid {os.geteuid()} may not create it there (or, below port 1024, bind the port); "
            "run as a user who may, or pick another address"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address; use one of its own or 0.0.0.0"
    return "check the address"
