"""TLS options for a test server and client: one throw-away CA, certificates naming
127.0.0.1 (the server) and guest0 (the client), both sides verifying."""

from __future__ import annotations

import ssl

import trustme

from shared.transport import TransportOptions


def tls_options() -> tuple[TransportOptions, TransportOptions]:
    """``(server options, client options)`` for ``tls://127.0.0.1``."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("guest0")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    client_cert.configure_cert(client_ctx)
    return (
        TransportOptions(ssl_context=server_ctx),
        TransportOptions(ssl_context=client_ctx, server_hostname="127.0.0.1"),
    )
