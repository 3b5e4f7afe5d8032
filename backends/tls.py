"""TLS to a backend: which certificates to trust, built once per backend at start-up.

`tls_ca_file` names a PEM bundle to verify the backend's certificate against (a private CA,
a self-signed certificate); empty means the system's CAs. `tls_verify = false` turns
verification off (encryption without authentication: for a lab, never for production).
Both the data plane (proxy/h1.py) and the monitor (health, discovery, scraping) use the
same context, so a backend is either reachable on both or on neither.
"""

from __future__ import annotations

import ssl

from backends.config import BackendConfig


def client_context(config: BackendConfig) -> ssl.SSLContext | None:
    """The context for an https backend; None for plain http."""
    if config.url.scheme != "https":
        return None
    context = ssl.create_default_context(cafile=config.tls_ca_file or None)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
