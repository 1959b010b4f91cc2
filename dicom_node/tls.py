"""SSL contexts for DICOM TLS, built from ``TlsSettings``: one for the SCP, one for the SCU."""

from __future__ import annotations

import ssl

from dicom_node.config import TlsSettings
from dicom_node.errors import ConfigError

__all__ = ["server_context", "client_context"]


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(settings.certificate), str(settings.private_key))
        if settings.ca_certificates is not None:
            context.load_verify_locations(cafile=str(settings.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate, key or CA: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_NONE
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """Verifies the destination against ``ca_certificates``; presents our certificate if given."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_certificates) if settings.ca_certificates else None
        )
        context.check_hostname = False  # DICOM peers are identified by AE title and CA, not host name
        if settings.certificate is not None and settings.private_key is not None:
            context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination.tls: cannot load certificate, key or CA: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
