"""The audit trail's feed to a SIEM: DICOM audit messages (PS3.15 A.5) in RFC 5424 syslog over
TLS (RFC 5425), received here by a real TLS syslog listener on loopback with its own CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socketserver
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.test import Client
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, AuditEvent, AuditForwardCursor, Outcome, User
from portal.siem import KINDS, atna_message, audit_forward
from portal.tasks import audit_forward_task
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Study, StudyStatus

pytestmark = pytest.mark.django_db

HOST = "127.0.0.1"
HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"(?P<msgid>\S+) (?P<sd>-|\[.*?\]) (?P<msg>.*)\Z",
    re.DOTALL,
)


# --- certificates -------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and what it signed, written as PEM files."""

    folder: Path
    name: str
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.folder / f"{self.name}-ca.pem"

    def issue(self, name: str, *, server: bool = True, ip: str = HOST) -> tuple[Path, Path]:
        """A leaf certificate (server for `ip`, or client) and its key, as (cert, key) files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.folder / f"{self.name}-{name}.pem"
        key_file = self.folder / f"{self.name}-{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


# --- the receiver -------------------------------------------------------------------------------


class Frames(socketserver.StreamRequestHandler):
    """Reads RFC 5425 frames ("MSG-LEN SP SYSLOG-MSG") until the sender closes."""

    server: Receiver

    def handle(self) -> None:
        while True:
            length = b""
            while (ch := self.rfile.read(1)) not in (b" ", b""):
                assert ch.isdigit() and len(length) < 10, "not an octet-counted frame"
                length += ch
            if not length:
                break
            self.server.received(self.rfile.read(int(length)))
        try:
            self.request.unwrap()  # answer the sender's close_notify
        except (OSError, ValueError):
            pass


class Receiver(socketserver.ThreadingTCPServer):
    """A TLS syslog collector. Bound at once (a connection to it is refused) and listening only
    from `listen()`, so a test can show the collector down, then up, on one address."""

    daemon_threads = True

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        super().__init__((HOST, 0), Frames, bind_and_activate=False)
        self.allow_reuse_address = True
        self.server_bind()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.messages: list[bytes] = []
        self.handshake_errors: list[str] = []
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"tls://{HOST}:{self.server_address[1]}"

    def listen(self) -> None:
        self.server_activate()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def get_request(self) -> tuple[Any, Any]:
        raw, peer = self.socket.accept()
        try:
            return self.context.wrap_socket(raw, server_side=True), peer
        except (ssl.SSLError, OSError) as exc:
            with self.changed:
                self.handshake_errors.append(type(exc).__name__)
                self.changed.notify_all()
            raw.close()
            raise

    def received(self, message: bytes) -> None:
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    def wait_for(self, count: int, deadline: float = 10) -> list[bytes]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.messages) >= count, deadline), (
                f"{len(self.messages)} of {count} messages arrived"
            )
            return list(self.messages)

    def stop(self) -> None:
        if self.thread is not None:
            self.shutdown()
        self.server_close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, "hospital")


@pytest.fixture
def receiver(pki: Pki, settings: Any) -> Iterator[Receiver]:
    server = Receiver(*pki.issue("siem"))
    server.listen()
    settings.RELAY_AUDIT_SYSLOG = server.address
    settings.RELAY_AUDIT_SYSLOG_CA = str(pki.ca_file)
    settings.SITE_URL = "https://relay.example.org"
    yield server
    server.stop()


def cursor() -> int:
    row = AuditForwardCursor.objects.filter(name="syslog").first()
    return row.last_event_id if row else 0


def parse(message: bytes) -> tuple[dict[str, bytes], ET.Element]:
    match = HEADER.match(message)
    assert match is not None, message[:120]
    parts = match.groupdict()
    assert parts["msg"].startswith(b"\xef\xbb\xbf"), "MSG is UTF-8 with a BOM (RFC 5424 6.4)"
    # Relay's own output, received on loopback: not untrusted input.
    return parts, ET.fromstring(parts["msg"][3:])  # noqa: S314


def coded(element: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    assert element is not None
    return (
        element.get("csd-code"),
        element.get("codeSystemName"),
        element.get("originalText"),
    )


# --- tests --------------------------------------------------------------------------------------


def test_a_study_view_reaches_the_siem_as_a_dicom_audit_message(
    receiver: Receiver, client: Client, bob: User, bob_token: str
) -> None:
    data = dicom_bytes("CT_small.dcm", PatientID="KR-<5>&'\"", PatientName="AUDIT^ME")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    viewer = client_for(bob)
    assert viewer.get(f"/studies/{study.uuid}/", REMOTE_ADDR="10.20.30.40").status_code == 200
    view = AuditEvent.objects.get(action=AuditAction.STUDY_VIEW)

    sent = audit_forward()

    assert sent == AuditEvent.objects.count() >= 2  # the upload and the view, at least
    assert cursor() == AuditEvent.objects.order_by("pk").last().pk  # type: ignore[union-attr]
    messages = receiver.wait_for(sent)
    header, root = parse(messages[-1])

    # RFC 5424 header as IHE ITI-20 asks: facility 10 (authpriv), severity 5 (notice).
    assert int(header["pri"]) == 10 * 8 + 5
    assert header["app"] == b"relay"
    assert header["msgid"] == b"IHE+RFC-3881"
    assert header["sd"] == b"-"
    assert header["procid"].isdigit()
    assert header["hostname"] != b"-"
    stamp = dt.datetime.fromisoformat(header["timestamp"].decode().replace("Z", "+00:00"))
    assert stamp == view.at

    # PS3.15 A.5.1: the message's parts in the schema's order.
    assert root.tag == "AuditMessage"
    assert [child.tag for child in root] == [
        "EventIdentification",
        "ActiveParticipant",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
        "ParticipantObjectIdentification",
    ]
    event_id = root.find("EventIdentification")
    assert event_id is not None
    assert event_id.get("EventActionCode") == "R"
    assert event_id.get("EventOutcomeIndicator") == "0"
    assert dt.datetime.fromisoformat(event_id.get("EventDateTime", "")) == view.at
    assert coded(event_id.find("EventID")) == ("110103", "DCM", "DICOM Instances Accessed")
    assert ("study_view", "99RELAY", "Viewed a study") in map(
        coded, event_id.findall("EventTypeCode")
    )
    assert [child.tag for child in event_id][0] == "EventID"

    person, relay = root.findall("ActiveParticipant")
    assert person.get("UserID") == "bob@krmc.example"
    assert person.get("UserIsRequestor") == "true"
    assert person.get("NetworkAccessPointID") == "10.20.30.40"
    assert person.get("NetworkAccessPointTypeCode") == "2"
    assert relay.get("UserIsRequestor") == "false"
    assert relay.get("UserID") == "relay.example.org"

    source = root.find("AuditSourceIdentification")
    assert source is not None
    assert source.get("AuditSourceID") == "relay.example.org"
    assert source.get("AuditEnterpriseSiteID") == "krmc"

    patient, studied = root.findall("ParticipantObjectIdentification")
    # The patient ID with XML's special characters comes back exactly (escaped, not broken).
    assert patient.get("ParticipantObjectID") == "KR-<5>&'\""
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert coded(patient.find("ParticipantObjectIDTypeCode")) == (
        "2",
        "RFC-3881",
        "Patient Number",
    )
    assert studied.get("ParticipantObjectID") == study.study_instance_uid
    assert studied.get("ParticipantObjectTypeCode") == "2"
    assert studied.get("ParticipantObjectTypeCodeRole") == "3"
    assert coded(studied.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    # The patient's name is not in the trail, so it is not in the feed either.
    assert b"AUDIT^ME" not in b"".join(messages)


def test_a_collector_that_is_down_loses_nothing_and_gets_everything_once_in_order(
    pki: Pki, settings: Any
) -> None:
    collector = Receiver(*pki.issue("siem"))  # bound, not listening: connections are refused
    settings.RELAY_AUDIT_SYSLOG = collector.address
    settings.RELAY_AUDIT_SYSLOG_CA = str(pki.ca_file)
    try:
        emails = [f"user{i}@example.org" for i in range(5)]
        for email in emails:
            audit_record(
                action=AuditAction.LOGIN_FAILED, outcome=Outcome.FAILURE, detail={"email": email}
            )

        with pytest.raises(ConnectionRefusedError):
            audit_forward()
        assert cursor() == 0
        # The Celery task takes the refusal in its stride: the next beat is the retry.
        assert audit_forward_task.delay().get() == 0
        assert cursor() == 0

        collector.listen()
        assert audit_forward(batch=3) == 3
        assert audit_forward(batch=3) == 2
        assert audit_forward() == 0  # nothing twice
        assert cursor() == AuditEvent.objects.order_by("pk").last().pk  # type: ignore[union-attr]

        messages = collector.wait_for(5)
        assert len(messages) == 5
        users = [parse(m)[1].find("ActiveParticipant").get("UserID") for m in messages]  # type: ignore[union-attr]
        assert users == emails
    finally:
        collector.stop()


def test_a_collector_whose_certificate_the_ca_did_not_sign_gets_nothing(
    pki: Pki, tmp_path: Path, settings: Any
) -> None:
    impostor = Receiver(*Pki(tmp_path, "impostor").issue("siem"))
    impostor.listen()
    settings.RELAY_AUDIT_SYSLOG = impostor.address
    settings.RELAY_AUDIT_SYSLOG_CA = str(pki.ca_file)
    try:
        audit_record(action=AuditAction.LOGIN_FAILED, outcome=Outcome.FAILURE)
        with pytest.raises(ssl.SSLCertVerificationError):
            audit_forward()
        assert cursor() == 0
        with impostor.changed:
            assert impostor.changed.wait_for(lambda: impostor.handshake_errors, 10)
        assert impostor.messages == []
    finally:
        impostor.stop()


def test_a_certificate_for_another_host_is_refused_too(pki: Pki, settings: Any) -> None:
    elsewhere = Receiver(*pki.issue("siem", ip="192.0.2.7"))
    elsewhere.listen()
    settings.RELAY_AUDIT_SYSLOG = elsewhere.address
    settings.RELAY_AUDIT_SYSLOG_CA = str(pki.ca_file)
    try:
        audit_record(action=AuditAction.LOGIN_FAILED, outcome=Outcome.FAILURE)
        with pytest.raises(ssl.SSLCertVerificationError):
            audit_forward()
        assert cursor() == 0 and elsewhere.messages == []
    finally:
        elsewhere.stop()


def test_mutual_tls_presents_the_client_certificate(pki: Pki, settings: Any) -> None:
    strict = Receiver(*pki.issue("siem"), client_ca=pki.ca_file)
    strict.listen()
    settings.RELAY_AUDIT_SYSLOG = strict.address
    settings.RELAY_AUDIT_SYSLOG_CA = str(pki.ca_file)
    try:
        audit_record(action=AuditAction.LOGIN_FAILED, outcome=Outcome.FAILURE)
        # Without a client certificate the collector refuses: the event waits.
        with pytest.raises(ssl.SSLError):
            audit_forward()
        assert cursor() == 0 and strict.messages == []

        cert, key = pki.issue("relay", server=False)
        settings.RELAY_AUDIT_SYSLOG_CERT = str(cert)
        settings.RELAY_AUDIT_SYSLOG_KEY = str(key)
        assert audit_forward() == 1
        assert len(strict.wait_for(1)) == 1
    finally:
        strict.stop()


def test_a_refused_look_and_a_failed_login_are_failures_on_the_siem(
    receiver: Receiver, client: Client, bob_token: str, charlie: User
) -> None:
    assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    assert client_for(charlie).get(f"/studies/{study.uuid}/").status_code == 404
    # The sign-in page's field is "login" (allauth), "username" before it: both are given.
    email = "charlie@gfc.example"
    Client(REMOTE_ADDR="10.9.8.7").post(
        "/accounts/login/", {"login": email, "username": email, "password": "wrong"}
    )
    denied = AuditEvent.objects.get(action=AuditAction.ACCESS_DENIED)
    failed = AuditEvent.objects.get(action=AuditAction.LOGIN_FAILED)

    sent = audit_forward()
    messages = {
        coded(root.find("EventIdentification/EventTypeCode[@codeSystemName='99RELAY']"))[0]: (
            header,
            root,
        )
        for header, root in map(parse, receiver.wait_for(sent))
    }

    header, root = messages[denied.action]
    assert int(header["pri"]) == 10 * 8 + 4  # warning
    event_id = root.find("EventIdentification")
    assert event_id is not None
    assert event_id.get("EventOutcomeIndicator") == "4"
    assert coded(event_id.find("EventID"))[0] == "110103"
    assert root.find("ActiveParticipant").get("UserID") == "charlie@gfc.example"  # type: ignore[union-attr]
    studied = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")
    assert studied is not None and studied.get("ParticipantObjectID") == study.study_instance_uid

    header, root = messages[failed.action]
    assert int(header["pri"]) == 10 * 8 + 4
    event_id = root.find("EventIdentification")
    assert event_id is not None
    assert coded(event_id.find("EventID")) == ("110114", "DCM", "User Authentication")
    assert coded(event_id.find("EventTypeCode")) == ("110122", "DCM", "Login")
    assert event_id.get("EventActionCode") == "E"
    assert event_id.get("EventOutcomeIndicator") == "4"
    person = root.find("ActiveParticipant")
    assert person is not None
    assert person.get("UserID") == "charlie@gfc.example"
    assert person.get("NetworkAccessPointID") == "10.9.8.7"
    assert b"wrong" not in b"".join(receiver.messages)


def test_an_id_that_may_still_commit_is_waited_for_not_skipped(
    receiver: Receiver, settings: Any
) -> None:
    # Ids are taken at INSERT, visible at COMMIT: a later id can show up first.
    settings.RELAY_AUDIT_SYSLOG_GAP_SECONDS = 60
    first = audit_record(action=AuditAction.LOGIN, detail={"email": "a@example.org"})
    third = AuditEvent.objects.create(pk=first.pk + 2, action="login", actor_email="c@example.org")
    assert audit_forward() == 1
    assert cursor() == first.pk

    second = AuditEvent.objects.create(pk=first.pk + 1, action="login", actor_email="b@example.org")
    assert audit_forward() == 2
    assert cursor() == third.pk

    # A hole older than the grace period is a rolled-back id: passed, not waited for forever.
    AuditEvent.objects.create(
        pk=third.pk + 2,
        action="login",
        actor_email="e@example.org",
        at=timezone.now() - dt.timedelta(minutes=5),
    )
    assert audit_forward() == 1
    users = [
        parse(m)[1].find("ActiveParticipant").get("UserID")  # type: ignore[union-attr]
        for m in receiver.wait_for(4)
    ]
    assert users == ["a@example.org", "b@example.org", "c@example.org", "e@example.org"]
    assert second.pk < third.pk


def test_the_feed_is_off_until_configured(settings: Any) -> None:
    settings.RELAY_AUDIT_SYSLOG = ""
    audit_record(action=AuditAction.LOGIN, detail={"email": "a@example.org"})
    assert audit_forward() == 0
    assert not AuditForwardCursor.objects.exists()


@pytest.mark.parametrize("address", ["tcp://siem.example.org:514", "udp://siem.example.org"])
def test_the_feed_will_not_send_in_the_clear(settings: Any, address: str) -> None:
    settings.RELAY_AUDIT_SYSLOG = address
    audit_record(action=AuditAction.LOGIN, detail={"email": "a@example.org"})
    with pytest.raises(ValueError, match="tls://"):
        audit_forward()


@pytest.mark.parametrize("action", list(AuditAction))
def test_every_action_has_a_dicom_event_and_a_well_formed_message(action: AuditAction) -> None:
    assert action.value in KINDS
    event = AuditEvent(
        action=action.value,
        outcome=Outcome.FAILURE,
        actor_email="x@example.org",
        at=timezone.now(),
        patient_id="P\x01-1",
        study_instance_uid="1.2.3",
    )
    root = ET.fromstring(atna_message(event))  # noqa: S314 - Relay's own output
    event_id = root.find("EventIdentification")
    assert event_id is not None
    assert event_id.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event_id.get("EventOutcomeIndicator") in {"4", "8"}
    assert coded(event_id.find("EventID"))[1] == "DCM"
    # A control character a DICOM file may carry cannot break the XML.
    patient = root.find("ParticipantObjectIdentification")
    assert patient is not None and patient.get("ParticipantObjectID") == "P\ufffd-1"


@pytest.mark.django_db(transaction=True)
def test_two_workers_at_once_send_each_event_once(receiver: Receiver) -> None:
    from django.db import connection

    emails = [f"user{i}@example.org" for i in range(300)]
    AuditEvent.objects.bulk_create(
        AuditEvent(action="login_failed", outcome="failure", actor_email=email) for email in emails
    )
    start = threading.Barrier(2)
    counts: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait(10)
            counts.append(audit_forward(batch=100) + audit_forward(batch=100))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    while audit_forward(batch=100):
        pass

    users = [
        parse(m)[1].find("ActiveParticipant").get("UserID")  # type: ignore[union-attr]
        for m in receiver.wait_for(len(emails))
    ]
    assert users == emails  # each once, in order
    assert sum(counts) <= len(emails)
