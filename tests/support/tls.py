"""TLS material for tests: a throw-away CA, the backend's files and a guest's context."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from shared.transport import TransportOptions

__all__ = ["TlsFiles", "transport_options"]


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


def transport_options() -> tuple[TransportOptions, TransportOptions]:
    """``(server, client)`` transport options for ``tls://127.0.0.1`` with a new CA.

    The server presents a certificate for 127.0.0.1 and requires one from the
    client, which presents one for ``guest0``; both trust only the CA.
    """
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    ca.issue_cert("guest0").configure_cert(client_ctx)
    return (
        TransportOptions(ssl_context=server_ctx),
        TransportOptions(ssl_context=client_ctx, server_hostname="127.0.0.1"),
    )
