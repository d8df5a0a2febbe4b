"""DICOM TLS (PS3.15 B.9 and the BCP 195 profile): the contexts of the gateway's TLS port and of
pushes to TLS destinations, and client certificates named by their SHA-256 fingerprints.

Relay has one certificate and key (DICOM_TLS_CERTIFICATE, DICOM_TLS_KEY, PEM files): the
gateway's server certificate, and the client certificate it presents to a PACS that asks for
one. TLS 1.2 is the floor, as BCP 195 asks; Python's defaults choose the ciphers.

A sender's client certificate is checked against DICOM_GATEWAY_TLS_CLIENT_CA (a PEM bundle of
the CAs, or self-signed certificates, the operator trusts); a facility then lists the
fingerprints of the certificates allowed to send under its AE title.
"""

from __future__ import annotations

import hashlib
import re
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----"
)
HEX_FINGERPRINT = re.compile(r"^(?:sha-?256\s*(?:fingerprint)?\s*[=:]?\s*)?([0-9a-f:]+)$", re.I)


class CertificateError(ValueError):
    """Text that is neither a PEM certificate nor a SHA-256 fingerprint."""


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint as `openssl x509 -fingerprint -sha256` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def fingerprints_parse(text: str) -> list[str]:
    """The fingerprints in what an admin pasted: PEM certificates, fingerprints (with or without
    colons, as openssl prints them), or both. Raises CertificateError on anything else."""
    found: list[str] = []
    for pem in PEM_CERTIFICATE.findall(text):
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
        except ValueError as exc:
            raise CertificateError("A pasted certificate could not be read.") from exc
        found.append(fingerprint(certificate.public_bytes(Encoding.DER)))
    rest = PEM_CERTIFICATE.sub(" ", text)
    for line in re.split(r"[\n,;]+", rest):
        line = line.strip()
        if not line:
            continue
        match = HEX_FINGERPRINT.match(line.replace(" ", ""))
        digits = match.group(1).replace(":", "").upper() if match else ""
        if len(digits) != 64 or not all(c in "0123456789ABCDEF" for c in digits):
            raise CertificateError(
                f"{line[:40]!r} is not a PEM certificate or a SHA-256 fingerprint."
            )
        found.append(":".join(digits[i : i + 2] for i in range(0, 64, 2)))
    return list(dict.fromkeys(found))


def _relay_certificate(context: ssl.SSLContext) -> bool:
    """Load Relay's certificate and key into the context, when configured."""
    certificate, key = settings.DICOM_TLS_CERTIFICATE, settings.DICOM_TLS_KEY
    if not certificate and not key:
        return False
    if not (certificate and key):
        raise ImproperlyConfigured("DICOM_TLS_CERTIFICATE and DICOM_TLS_KEY go together.")
    context.load_cert_chain(certificate, key)
    return True


def gateway_context() -> ssl.SSLContext | None:
    """The TLS port's context, or None when Relay has no certificate (no TLS port then)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not _relay_certificate(context):
        return None
    if settings.DICOM_GATEWAY_TLS_CLIENT_CA:
        # A sender may present a certificate; it must then chain to one of these. Whether the
        # facility it calls needs one is the facility's own setting.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=settings.DICOM_GATEWAY_TLS_CLIENT_CA)
    return context


def push_context(ca_certificates: str) -> ssl.SSLContext:
    """The context of one association to a TLS destination: its certificate must chain to the
    destination's CA certificates (or the system's, when none is given) and name its host."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_certificates.strip():
        context.load_verify_locations(cadata=ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _relay_certificate(context)
    return context


def ca_certificates_check(text: str) -> str:
    """The CA certificates an admin pasted for a destination, checked to load; "" stays ""."""
    if not text.strip():
        return ""
    pems = PEM_CERTIFICATE.findall(text)
    if not pems:
        raise CertificateError("Paste the CA certificates in PEM form (BEGIN CERTIFICATE).")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata="\n".join(pems))
    except ssl.SSLError as exc:
        raise CertificateError("A pasted certificate could not be read.") from exc
    return "\n".join(pems) + "\n"
