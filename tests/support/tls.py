"""TLS material for tests: a throw-away CA, the backend's files and a guest's context."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

__all__ = ["TlsFiles"]


class TlsFiles:
    """A new CA; the backend's ``server.pem``, ``server.key`` and ``ca.pem`` written to ``dir``.

    ``section`` is the ``[tls]`` table naming those files (relative to ``dir``:
    parse the config with ``base=dir``); prepend it to a config's text.
    """

    section = "[tls]\ncert = 'server.pem'\nkey = 'server.key'\nca = 'ca.pem'\n"

    def __init__(self, dir: Path, server_name: str = "127.0.0.1") -> None:
        self.dir = dir
        self.ca = trustme.CA()
        server = self.ca.issue_cert(server_name)
        server.cert_chain_pems[0].write_to_path(str(dir / "server.pem"))
        server.private_key_pem.write_to_path(str(dir / "server.key"))
        self.ca.cert_pem.write_to_path(str(dir / "ca.pem"))

    def client_context(self, guest: str, *, common_name: str | None = None) -> ssl.SSLContext:
        """A guest's client context: trusts the CA and presents a certificate for ``guest``."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        self.ca.issue_cert(guest, common_name=common_name).configure_cert(ctx)
        return ctx

    def client_files(self, guest: str) -> tuple[Path, Path]:
        """A certificate for ``guest`` as ``GUEST.pem`` and ``GUEST.key`` in ``dir`` (for CLIs)."""
        cert = self.ca.issue_cert(guest)
        pem, key = self.dir / f"{guest}.pem", self.dir / f"{guest}.key"
        cert.cert_chain_pems[0].write_to_path(str(pem))
        cert.private_key_pem.write_to_path(str(key))
        return pem, key
