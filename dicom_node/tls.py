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
    """Verifies the destination's certificate against ``ca_certificates`` (else the
    system's CAs) and that it names the host connected to (the caller gives the host as
    ``server_hostname``), unless ``check_hostname`` is false, which the config allows only
    with a CA of the site's own; presents our certificate if given.

    Why the name is checked: a CA vouches for a name, not for a peer. The system's CAs
    sign certificates for any public host name, so without the check any such
    certificate would pass for the PACS; and a site CA that signs every machine of the
    site would let any of them pass for it.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_certificates) if settings.ca_certificates else None
        )
        context.check_hostname = settings.check_hostname
        if settings.certificate is not None and settings.private_key is not None:
            context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destinations[].tls: cannot load certificate, key or CA: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
