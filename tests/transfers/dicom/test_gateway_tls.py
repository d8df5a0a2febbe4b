"""DICOM TLS and deny-by-default gateway access, against dcmtk's TLS options: the gateway's TLS
port with client certificates a facility lists, and pushes into a storescp that speaks TLS.

The certificates (a CA, Relay's, two PACS client certificates from the CA, one self-signed) are
made by the test with `cryptography`, as an operator's own CA would issue them.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.servers import free_port, stop_process_tree
from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, gateway_allow, require_peer
from tests.transfers.dicom.test_pacs_push import FakeRequest, shared  # noqa: F401  (fixture)
from transfers.access import study_access
from transfers.dicom.gateway import Gateway
from transfers.dicom.push import destination_echo, push_create, push_send
from transfers.dicom.tls import fingerprint, gateway_context
from transfers.models import Instance, PacsDestination, PushStatus, Study

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    key: Path
    certificate: Path

    @property
    def fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.certificate.read_bytes())
        return fingerprint(cert.public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class Pki:
    ca: Path
    relay: Credential
    pacs: Credential
    other_pacs: Credential
    stranger: Credential


def _issue(
    folder: Path,
    name: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Credential]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, Credential(key_path, cert_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca = _issue(folder, "ca", issuer=None, ca=True)
    issued = {
        name: _issue(folder, name, issuer=(ca_cert, ca_key))[2]
        for name in ("relay", "pacs", "other-pacs")
    }
    stranger = _issue(folder, "stranger", issuer=None)[2]
    return Pki(ca.certificate, issued["relay"], issued["pacs"], issued["other-pacs"], stranger)


# --- the gateway's TLS port ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    plain: int
    tls: int


@pytest.fixture
def relay_certificate(pki: Pki, settings: Any) -> Credential:
    """Relay configured with its DICOM TLS certificate and key."""
    settings.DICOM_TLS_CERTIFICATE = str(pki.relay.certificate)
    settings.DICOM_TLS_KEY = str(pki.relay.key)
    return pki.relay


@pytest.fixture
def gateway(
    krmc: Facility, pki: Pki, relay_certificate: Credential, settings: Any
) -> Iterator[Ports]:
    settings.DICOM_GATEWAY_TLS_CLIENT_CA = str(pki.ca)
    listening = Gateway(ae_title="RELAY")
    ports = Ports(free_port(), free_port())
    context = gateway_context()
    assert context is not None
    servers = [
        listening.start(host="127.0.0.1", port=ports.plain),
        listening.start(host="127.0.0.1", port=ports.tls, tls_context=context),
    ]
    try:
        yield ports
    finally:
        for server in servers:
            server.shutdown()


def _run(*args: str | Path) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def _tls_client(pki: Pki, credential: Credential | None) -> list[str | Path]:
    """dcmtk's options for a TLS sender that checks the gateway's certificate against the CA,
    with a client certificate or anonymously."""
    who: list[str | Path] = (
        ["+tls", credential.key, credential.certificate] if credential else ["+tla"]
    )
    return [*who, "+cf", pki.ca]


def _store(port: int, file: Path, *tls: str | Path, calling: str = "PACS1") -> str:
    storescu = require_peer("storescu")
    return _run(storescu, *tls, "-aet", calling, "-aec", "KRMC", "127.0.0.1", str(port), file)


def _a_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "ct.dcm"
    path.write_bytes(dicom_bytes("CT_small.dcm"))
    return path, str(pydicom.dcmread(path).SOPInstanceUID)


def _refusals() -> list[str]:
    events = AuditEvent.objects.filter(action=AuditAction.DICOM_REFUSED).order_by("id")
    return [event.detail["reason"] for event in events]


def test_nobody_gets_in_until_the_admin_lists_a_sender(
    gateway: Ports, tmp_path: Path, krmc: Facility
) -> None:
    file, uid = _a_file(tmp_path)

    output = _store(gateway.plain, file)

    assert "rc=0" not in output and "Calling AE Title Not Recognized" in output, output
    assert not Instance.objects.exists()
    assert _refusals() == ["krmc allows no calling AE title yet"]
    # A listed calling title alone is not enough: it must come from a listed address, too.
    gateway_allow(krmc, "PACS1", addresses="")
    assert "rc=0" not in _store(gateway.plain, file)
    assert _refusals()[-1] == "address 127.0.0.1 is not allowed for krmc"
    gateway_allow(krmc, "PACS1")
    assert "rc=0" in _store(gateway.plain, file)
    assert Instance.objects.filter(sop_instance_uid=uid).exists()


def test_a_listed_client_certificate_lets_a_sender_in_from_anywhere(
    gateway: Ports, tmp_path: Path, krmc: Facility, pki: Pki
) -> None:
    file, uid = _a_file(tmp_path)
    # The PACS's title is listed, no address is: only its certificate vouches for it.
    gateway_allow(krmc, "PACS1", addresses="")
    Facility.objects.filter(pk=krmc.pk).update(gateway_client_certificates=pki.pacs.fingerprint)

    echoscu = require_peer("echoscu")
    echoed = _run(
        echoscu, *_tls_client(pki, pki.pacs), "-aet", "PACS1", "-aec", "KRMC", "127.0.0.1",
        str(gateway.tls),
    )  # fmt: skip
    assert echoed.startswith("rc=0"), echoed
    stored = _store(gateway.tls, file, *_tls_client(pki, pki.pacs))
    assert stored.startswith("rc=0"), stored

    assert Instance.objects.get(sop_instance_uid=uid).facility == krmc
    upload = AuditEvent.objects.get(action=AuditAction.UPLOAD)
    # The audit trail says it came over TLS.
    assert upload.detail["source"] == "dicoms:PACS1@127.0.0.1"


def test_other_certificates_and_plain_connections_are_refused_and_audited(
    gateway: Ports, tmp_path: Path, krmc: Facility, pki: Pki
) -> None:
    file, _ = _a_file(tmp_path)
    gateway_allow(krmc, "PACS1", addresses="")
    Facility.objects.filter(pk=krmc.pk).update(gateway_client_certificates=pki.pacs.fingerprint)

    # Another certificate from the same CA: the handshake succeeds, the facility says no.
    refused = _store(gateway.tls, file, *_tls_client(pki, pki.other_pacs))
    assert not refused.startswith("rc=0"), refused
    assert _refusals()[-1] == (
        "address 127.0.0.1 with an unlisted client certificate is not allowed for krmc"
    )
    # A certificate from no CA the operator trusts: the handshake itself fails.
    before = len(_refusals())
    assert not _store(gateway.tls, file, *_tls_client(pki, pki.stranger)).startswith("rc=0")
    # The sender learns of the failed handshake before the gateway's thread records it.
    for _ in range(50):
        if len(_refusals()) > before:
            break
        time.sleep(0.1)
    assert len(_refusals()) == before + 1
    assert _refusals()[-1].startswith("TLS handshake failed"), _refusals()[-1]
    # No certificate at all, and plain TCP: refused.
    assert not _store(gateway.tls, file, *_tls_client(pki, None)).startswith("rc=0")
    assert not _store(gateway.plain, file).startswith("rc=0")
    assert not Instance.objects.exists()
    refused_events = AuditEvent.objects.filter(action=AuditAction.DICOM_REFUSED)
    assert refused_events.filter(facility=krmc).count() == 3


def test_a_facility_may_accept_tls_only(
    gateway: Ports, tmp_path: Path, krmc: Facility, pki: Pki
) -> None:
    file, uid = _a_file(tmp_path)
    gateway_allow(krmc, "PACS1")
    Facility.objects.filter(pk=krmc.pk).update(gateway_tls_required=True)

    plain = _store(gateway.plain, file)
    assert not plain.startswith("rc=0"), plain
    assert _refusals() == ["krmc accepts senders over TLS only"]
    # Over TLS without a client certificate, from a listed address: let in.
    anonymous = _store(gateway.tls, file, *_tls_client(pki, None))
    assert anonymous.startswith("rc=0"), anonymous
    assert Instance.objects.filter(sop_instance_uid=uid).exists()


def test_a_silent_connection_does_not_keep_other_senders_out(
    gateway: Ports, tmp_path: Path, krmc: Facility, pki: Pki
) -> None:
    """The handshake happens in the connection's own thread: a sender that opens the TLS port
    and says nothing holds up nobody else."""
    file, uid = _a_file(tmp_path)
    gateway_allow(krmc, "PACS1")
    with socket.create_connection(("127.0.0.1", gateway.tls)):
        time.sleep(0.2)
        stored = _store(gateway.tls, file, *_tls_client(pki, pki.pacs))
    assert stored.startswith("rc=0"), stored
    assert Instance.objects.filter(sop_instance_uid=uid).exists()


def test_the_admin_lists_certificates_by_pasting_them(
    alice: User, krmc: Facility, pki: Pki
) -> None:
    client = client_for(alice)
    url = f"/facilities/{krmc.slug}/dicom/gateway/"
    pasted = pki.pacs.certificate.read_text() + "\n" + pki.other_pacs.fingerprint.replace(":", "")

    response = client.post(
        url,
        {
            "gateway_calling_aes": "PACS1",
            "gateway_addresses": "",
            "gateway_client_certificates": pasted,
            "gateway_tls_required": "on",
        },
    )

    assert response.status_code == 302
    krmc.refresh_from_db()
    assert krmc.gateway_client_certificates.split() == [
        pki.pacs.fingerprint,
        pki.other_pacs.fingerprint,
    ]
    assert krmc.gateway_tls_required
    event = AuditEvent.objects.get(action=AuditAction.GATEWAY_CHANGE)
    assert event.detail["after"]["tls_required"] is True
    # Text that is neither is refused by the field, and nothing changes.
    bad = client.post(
        url,
        {"gateway_calling_aes": "PACS1", "gateway_client_certificates": "not a certificate"},
    )
    assert bad.status_code == 200
    assert "is not a PEM certificate or a SHA-256 fingerprint" in bad.content.decode()
    bad = client.post(url, {"gateway_calling_aes": "PACS1", "gateway_addresses": "10.0.0.300"})
    assert "is not an IP address or network" in bad.content.decode()
    krmc.refresh_from_db()
    assert krmc.gateway_tls_required


# --- pushes into a PACS that speaks TLS ---------------------------------------------------------


@pytest.fixture
def tls_pacs(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp with TLS, which requires and checks a client certificate."""
    program = require_peer("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [
            program, "+tls", str(pki.pacs.key), str(pki.pacs.certificate), "+cf", str(pki.ca),
            "-rc", "-aet", "GFCPACS", "-od", str(received), str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    try:
        yield port, received
    finally:
        stop_process_tree(proc)  # type: ignore[arg-type]


def _tls_destination(facility: Facility, port: int, ca: str) -> PacsDestination:
    return PacsDestination.objects.create(
        facility=facility,
        name="GFC PACS",
        ae_title="GFCPACS",
        host="127.0.0.1",
        port=port,
        tls=True,
        tls_ca_certificates=ca,
    )


def test_a_push_to_a_tls_pacs_checks_its_certificate_and_presents_relays(
    shared: Any,  # noqa: F811
    dana: User,
    gfc: Facility,
    tls_pacs: tuple[int, Path],
    pki: Pki,
    relay_certificate: Credential,
) -> None:
    port, folder = tls_pacs
    destination = _tls_destination(gfc, port, pki.ca.read_text())

    assert destination_echo(destination=destination).ok
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=destination, by=dana)
    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, 3, 0)
    arrived = {str(pydicom.dcmread(p).SOPInstanceUID) for p in folder.iterdir()}
    assert arrived == set(Instance.objects.values_list("sop_instance_uid", flat=True))


def test_a_tls_pacs_with_a_certificate_from_another_ca_is_not_sent_to(
    gfc: Facility, tls_pacs: tuple[int, Path], pki: Pki, relay_certificate: Credential
) -> None:
    port, folder = tls_pacs
    # The admin pasted the wrong CA: the PACS's certificate does not chain to it.
    destination = _tls_destination(gfc, port, pki.stranger.certificate.read_text())

    result = destination_echo(destination=destination)

    assert not result.ok
    assert "over TLS" in result.message
    assert not any(folder.iterdir())


def test_without_relays_certificate_the_tls_pacs_refuses(
    gfc: Facility,
    tls_pacs: tuple[int, Path],
    pki: Pki,
    settings: Any,
) -> None:
    settings.DICOM_TLS_CERTIFICATE = settings.DICOM_TLS_KEY = ""
    port, _ = tls_pacs
    destination = _tls_destination(gfc, port, pki.ca.read_text())

    assert not destination_echo(destination=destination).ok
