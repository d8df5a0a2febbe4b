"""The audit trail's live feed to a hospital SIEM or IHE Audit Record Repository.

Each AuditEvent becomes one DICOM Audit Message (PS3.15 A.5, the XML IHE ATNA uses), framed as
an RFC 5424 syslog message the way IHE ITI-20 (Record Audit Event) asks, and sent over TLS with
RFC 5425 octet counting. `audit_forward` sends what the collector has not had yet, in id order,
and moves the cursor ("syslog" AuditForwardCursor) only after a batch was written, so a
collector that is down or refuses the connection loses nothing: the next run sends from there.

The messages carry the patient ID by design (that is what an audit repository is for), so they
travel only over TLS with the server certificate verified, and their bodies are never logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import AuditAction, AuditEvent, AuditForwardCursor, Outcome

logger = logging.getLogger(__name__)

CURSOR_NAME = "syslog"
DEFAULT_PORT = 6514  # RFC 5425 section 4.1
APP_NAME = "relay"
# IHE ITI TF-2 3.20.4.1.2: MSGID "IHE+RFC-3881", facility 10 (security/authorization), severity
# 5 (notice) or 4 (warning). (dcm4che's "DICOM+RFC3881" is that product's default, not IHE's.)
MSGID = "IHE+RFC-3881"
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
BOM = b"\xef\xbb\xbf"  # RFC 5424 MSG-UTF8 starts with a byte order mark

# A coded value of the schema: (csd-code, codeSystemName, originalText).
Code = tuple[str, str, str]

# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
AUDIT_LOG_USED: Code = ("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
EXPORT: Code = ("110106", "DCM", "Export")
IMPORT: Code = ("110107", "DCM", "Import")
PATIENT_RECORD: Code = ("110110", "DCM", "Patient Record")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
# PS3.16 CID 401 Audit Event Type Code
LOGIN: Code = ("110122", "DCM", "Login")
LOGOUT: Code = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION: Code = ("110128", "DCM", "Network Configuration")
SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")
OBJECT_SECURITY_CHANGED: Code = ("110135", "DCM", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED: Code = ("110136", "DCM", "Security Roles Changed")
USER_SECURITY_CHANGED: Code = ("110137", "DCM", "User security Attributes Changed")
# PS3.16 CID 402 Audit Active Participant Role ID
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
# PS3.16 CID 403 / PS3.15 A.5.1.2.4 Participant Object ID Type
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
# Relay's own action, added as a second EventTypeCode so a SIEM can tell a share from its
# revocation; "99" marks a private coding scheme designator (PS3.16 section 8).
RELAY_SCHEME = "99RELAY"


@dataclass(frozen=True)
class Kind:
    """How one AuditAction reads as a DICOM audit message (PS3.15 A.5.3)."""

    event_id: Code
    action_code: str  # EventActionCode: C, R, U, D or E
    type_code: Code | None = None
    person_role: Code | None = None  # the person's RoleIDCode, where the message defines one
    relay_role: Code | None = None  # Relay's RoleIDCode
    failure: str = "4"  # EventOutcomeIndicator of a failed event: minor failure


def _security(type_code: Code) -> Kind:
    return Kind(SECURITY_ALERT, "E", type_code)  # A.5.3.11: EventActionCode E


def _login(type_code: Code = LOGIN, failure: str = "4") -> Kind:
    return Kind(USER_AUTHENTICATION, "E", type_code, failure=failure)  # A.5.3.12


A = AuditAction
KINDS: dict[str, Kind] = {
    A.LOGIN: _login(),
    A.LOGOUT: _login(LOGOUT),
    A.SESSION_EXPIRED: _login(LOGOUT),
    A.LOGIN_FAILED: _login(),
    A.REAUTH: _login(),
    A.MFA_FAILED: _login(),
    A.TOKEN_REFUSED: _login(),
    A.PATIENT_FACTOR: _login(),
    # A guest link's e-mailed code: asked for, and entered (right, wrong or refused).
    A.GUEST_CODE_SEND: _login(),
    A.GUEST_CODE: _login(),
    # Locked out after too many attempts: PS3.15's own example of a serious failure (8).
    A.LOCKOUT: _login(failure="8"),
    A.UPLOAD: Kind(INSTANCES_TRANSFERRED, "C", None, ROLE_SOURCE, ROLE_DESTINATION),
    A.STUDY_PUSH: Kind(INSTANCES_TRANSFERRED, "R", None, None, ROLE_SOURCE),
    # A push stopped before it sent anything more: the transfer that was asked for, withdrawn.
    A.PUSH_CANCEL: Kind(INSTANCES_TRANSFERRED, "U", None, None, ROLE_SOURCE),
    A.DICOM_RETRIEVE: Kind(INSTANCES_TRANSFERRED, "R", None, None, ROLE_SOURCE),
    A.DICOM_QUERY: Kind(QUERY, "E"),  # A.5.3.15: EventActionCode E
    A.DICOM_COMMIT: Kind(INSTANCES_ACCESSED, "R"),
    A.STUDY_VIEW: Kind(INSTANCES_ACCESSED, "R"),
    A.SHARE_OPEN: Kind(INSTANCES_ACCESSED, "R"),
    # A refused look at a study is the access that was tried, with a failed outcome.
    A.ACCESS_DENIED: Kind(INSTANCES_ACCESSED, "R"),
    A.STUDY_LIST: Kind(PATIENT_RECORD, "R"),
    A.REPORT_VIEW: Kind(PATIENT_RECORD, "R"),
    A.REPORT_ATTACH: Kind(PATIENT_RECORD, "C"),
    A.PATIENT_RECONCILE: Kind(PATIENT_RECORD, "U"),
    A.STUDY_COMPLETE: Kind(PATIENT_RECORD, "U"),
    A.STUDY_DOWNLOAD: Kind(EXPORT, "R", None, ROLE_DESTINATION, ROLE_SOURCE),  # A.5.3.4
    # The original is read to write a de-identified copy for a share: an export of its data.
    A.DEIDENTIFY: Kind(EXPORT, "R", None, ROLE_DESTINATION, ROLE_SOURCE),
    A.PURGE: Kind(STUDY_DELETED, "D"),  # A.5.3.8
    A.AUDIT_EXPORT: Kind(AUDIT_LOG_USED, "R"),  # A.5.3.2
    # Who may open a study: a share, its end, its extension, a patient link's lock.
    A.SHARE_CREATE: _security(OBJECT_SECURITY_CHANGED),
    A.SHARE_REVOKE: _security(OBJECT_SECURITY_CHANGED),
    A.SHARE_EXTEND: _security(OBJECT_SECURITY_CHANGED),
    A.PATIENT_LINK_LOCK: _security(OBJECT_SECURITY_CHANGED),
    A.PATIENT_LINK_UNLOCK: _security(OBJECT_SECURITY_CHANGED),
    # Who holds which role at a facility.
    A.MEMBER_INVITE: _security(SECURITY_ROLES_CHANGED),
    A.INVITATION_REVOKE: _security(SECURITY_ROLES_CHANGED),
    A.MEMBER_JOIN: _security(SECURITY_ROLES_CHANGED),
    A.MEMBER_CHANGE: _security(SECURITY_ROLES_CHANGED),
    A.MEMBER_REMOVE: _security(SECURITY_ROLES_CHANGED),
    # A person's own credentials.
    A.TOKEN_CREATE: _security(USER_SECURITY_CHANGED),
    A.TOKEN_REVOKE: _security(USER_SECURITY_CHANGED),
    A.PASSWORD_CHANGE: _security(USER_SECURITY_CHANGED),
    A.PASSWORD_RESET_ASK: _security(USER_SECURITY_CHANGED),
    A.PASSWORD_RESET: _security(USER_SECURITY_CHANGED),
    A.MFA_ADD: _security(USER_SECURITY_CHANGED),
    A.MFA_REMOVE: _security(USER_SECURITY_CHANGED),
    A.UNLOCK: _security(USER_SECURITY_CHANGED),
    # The facility's security and network configuration.
    A.FACILITY_CHANGE: _security(SECURITY_CONFIGURATION),
    # A session starts working for another of its facilities: as a sign-in into that facility.
    A.FACILITY_SWITCH: _login(),
    A.SSO_CHANGE: _security(SECURITY_CONFIGURATION),
    A.GATEWAY_CHANGE: _security(SECURITY_CONFIGURATION),
    A.DESTINATION_ADD: _security(NETWORK_CONFIGURATION),
    A.DESTINATION_REMOVE: _security(NETWORK_CONFIGURATION),
    A.DESTINATION_CHANGE: _security(NETWORK_CONFIGURATION),
    A.DESTINATION_ECHO: _security(NETWORK_CONFIGURATION),
    A.ROUTING_RULE_ADD: _security(NETWORK_CONFIGURATION),
    A.ROUTING_RULE_REMOVE: _security(NETWORK_CONFIGURATION),
    A.DICOM_REFUSED: _security(NODE_AUTHENTICATION),
    # A stored copy read back damaged: the access that failed, as a serious failure (8).
    A.INTEGRITY_FAILED: Kind(INSTANCES_ACCESSED, "R", failure="8"),
    # A backup copies every patient's data out (A.5.3.4); a restore brings a whole database in
    # (A.5.3.5), a failure when objects it refers to are missing from storage.
    A.BACKUP: Kind(EXPORT, "R"),
    A.RESTORE: Kind(IMPORT, "C"),
}
# An action retired since its events were written still reaches the SIEM.
FALLBACK = Kind(APPLICATION_ACTIVITY, "E")

# Characters XML 1.0 cannot carry at all, even escaped; ElementTree would write them as they are.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: object) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    csd_code, system, meaning = code
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": _text(csd_code), "codeSystemName": system, "originalText": _text(meaning)},
    )


def source_id() -> str:
    """AuditSourceID: RELAY_AUDIT_SOURCE_ID, else the host of SITE_URL."""
    configured = getattr(settings, "RELAY_AUDIT_SOURCE_ID", "")
    if configured:
        return str(configured)
    return urlsplit(getattr(settings, "SITE_URL", "")).hostname or "relay"


def _label(action: str) -> str:
    try:
        return str(AuditAction(action).label)
    except ValueError:
        return action


def _event_time(at: dt.datetime) -> str:
    # UTC with the zone written out (PS3.15 A.5.2.5); at most six fraction digits (RFC 5424).
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def atna_message(event: AuditEvent) -> bytes:
    """The DICOM Audit Message (PS3.15 A.5.1 schema) of one event, as UTF-8 XML."""
    kind = KINDS.get(event.action, FALLBACK)
    failed = event.outcome != Outcome.SUCCESS
    root = ET.Element("AuditMessage")

    # Attributes of the schema are unordered; the order of the elements is the schema's.
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action_code,
            "EventDateTime": _event_time(event.at),
            "EventOutcomeIndicator": kind.failure if failed else "0",
        },
    )
    _coded(identification, "EventID", kind.event_id)
    if kind.type_code is not None:
        _coded(identification, "EventTypeCode", kind.type_code)
    _coded(identification, "EventTypeCode", (event.action, RELAY_SCHEME, _label(event.action)))
    if failed:
        ET.SubElement(identification, "EventOutcomeDescription").text = _text(_label(event.action))

    # The person who acted (A.5.2.1: their login name, which in Relay is the e-mail address).
    person = ET.SubElement(root, "ActiveParticipant")
    if kind.person_role is not None:
        _coded(person, "RoleIDCode", kind.person_role)
    person.set("UserID", _text(event.actor_email or "anonymous"))
    full_name = getattr(event.actor, "full_name", "") if event.actor_id else ""
    if full_name:
        person.set("UserName", _text(full_name))
    person.set("UserIsRequestor", "true")
    if event.client_ip:
        person.set("NetworkAccessPointID", _text(event.client_ip))
        person.set("NetworkAccessPointTypeCode", "2")  # IP address

    # Relay, the application the person used.
    relay = ET.SubElement(root, "ActiveParticipant")
    if kind.relay_role is not None:
        _coded(relay, "RoleIDCode", kind.relay_role)
    audit_source = source_id()
    relay.set("UserID", _text(audit_source))
    relay.set("UserName", APP_NAME)
    relay.set("UserIsRequestor", "false")
    relay.set("NetworkAccessPointID", _text(audit_source))
    relay.set("NetworkAccessPointTypeCode", "1")  # machine (DNS) name

    source = ET.SubElement(root, "AuditSourceIdentification")
    facility = event.facility or event.actor_facility
    if facility is not None:
        source.set("AuditEnterpriseSiteID", _text(facility.slug))
    source.set("AuditSourceID", _text(audit_source))
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "3"})  # web server process

    if event.patient_id:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _text(event.patient_id),
                "ParticipantObjectTypeCode": "1",  # person
                "ParticipantObjectTypeCodeRole": "1",  # patient
            },
        )
        _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if event.study_instance_uid:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _text(event.study_instance_uid),
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _coded(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)

    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _header_field(value: str, limit: int) -> str:
    # RFC 5424 section 6: header fields are 1 to `limit` printable US-ASCII characters, or "-".
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(event: AuditEvent) -> bytes:
    """One RFC 5424 SYSLOG-MSG: header, no structured data, the audit message with a BOM."""
    failed = event.outcome != Outcome.SUCCESS
    pri = FACILITY_AUTHPRIV * 8 + (SEVERITY_WARNING if failed else SEVERITY_NOTICE)
    header = " ".join(
        [
            f"<{pri}>1",
            _event_time(event.at),
            _header_field(socket.getfqdn(), 255),
            APP_NAME,
            _header_field(str(os.getpid()), 128),
            MSGID,
            "-",
        ]
    )
    return header.encode("ascii") + b" " + BOM + atna_message(event)


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class Collector:
    host: str
    port: int


def collector() -> Collector | None:
    """Where the feed goes, from RELAY_AUDIT_SYSLOG ("tls://host:port"); None when it is off."""
    address = str(getattr(settings, "RELAY_AUDIT_SYSLOG", "") or "").strip()
    if not address:
        return None
    parts = urlsplit(address)
    # Plain TCP or UDP would put patient IDs on the wire in the clear: only TLS is offered.
    if parts.scheme != "tls" or not parts.hostname:
        raise ValueError("RELAY_AUDIT_SYSLOG must read tls://host:port")
    return Collector(parts.hostname, parts.port or DEFAULT_PORT)


def tls_context() -> ssl.SSLContext:
    """Verifies the collector's certificate and name against RELAY_AUDIT_SYSLOG_CA (the system's
    trusted CAs when unset); presents RELAY_AUDIT_SYSLOG_CERT / _KEY when mutual TLS is asked."""
    cafile = getattr(settings, "RELAY_AUDIT_SYSLOG_CA", "") or None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = getattr(settings, "RELAY_AUDIT_SYSLOG_CERT", "")
    if cert:
        context.load_cert_chain(cert, getattr(settings, "RELAY_AUDIT_SYSLOG_KEY", "") or None)
    return context


@contextmanager
def connect(target: Collector) -> Iterator[ssl.SSLSocket]:
    """One TLS connection to the collector. Raises OSError (ssl.SSLError included) when it cannot
    be reached, refuses the connection, or shows a certificate the CA file does not vouch for."""
    timeout = float(getattr(settings, "RELAY_AUDIT_SYSLOG_TIMEOUT", 10))
    with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
        with tls_context().wrap_socket(raw, server_hostname=target.host) as tls:
            yield tls


def close(tls: ssl.SSLSocket) -> None:
    """Ends the session with close_notify and reads the collector's answer.

    RFC 5425 has no acknowledgement, and with TLS 1.3 a collector refuses a client certificate
    only after the handshake, so a refusal may first show here, as a TLS alert: that raises
    (ssl.SSLError) and the batch is not counted as sent. A collector that answers with
    close_notify, or just closes the connection, or is slow to answer, has had what was written.
    """
    try:
        tls.unwrap()
    except ssl.SSLError as exc:
        if not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            raise
    except OSError:
        pass  # closed before our close_notify reached it, or no answer within the timeout


def _sendable(events: list[AuditEvent], after: int, now: dt.datetime) -> list[AuditEvent]:
    """The events to send now: stop before a hole in the ids that may still fill.

    Ids are handed out when a row is inserted, not when its transaction commits, so on
    PostgreSQL event 41 can become visible after event 42. Jumping over 41 would lose it for
    good; a hole is passed only once the event after it is older than the grace period (by then
    the missing id belongs to a transaction that was rolled back).
    """
    grace = dt.timedelta(seconds=int(getattr(settings, "RELAY_AUDIT_SYSLOG_GAP_SECONDS", 60)))
    ready: list[AuditEvent] = []
    # A new cursor (0) has no hole to wait for: ids below the first event are history.
    expected = after + 1 if after else None
    for event in events:
        if expected is not None and event.pk != expected and event.at > now - grace:
            break
        ready.append(event)
        expected = event.pk + 1
    return ready


def audit_forward(batch: int = 500) -> int:
    """Sends the events after the "syslog" cursor to the collector, in id order, and moves the
    cursor past them once they were written. Returns how many were sent; 0 when the feed is off.

    The cursor row is claimed with an UPDATE before it is read, so a second worker waits until
    the first has committed and then starts after what the first sent (a row lock on
    PostgreSQL, the database's write lock on SQLite). An error while connecting or sending
    propagates (OSError) and rolls the transaction back: the cursor stays where it was.
    """
    target = collector()
    if target is None:
        return 0
    cursor, _ = AuditForwardCursor.objects.get_or_create(name=CURSOR_NAME)
    if not AuditEvent.objects.filter(pk__gt=cursor.last_event_id).exists():
        return 0  # nothing new: no connection every few seconds just to say so
    sent: list[AuditEvent] = []
    try:
        # Connected (and the certificate checked) before the cursor is locked: an unreachable
        # collector never holds the lock, nor, on SQLite, the database's write lock.
        with connect(target) as tls, transaction.atomic():
            AuditForwardCursor.objects.filter(name=CURSOR_NAME).update(updated_at=timezone.now())
            cursor = AuditForwardCursor.objects.select_for_update().get(name=CURSOR_NAME)
            events = list(
                AuditEvent.objects.filter(pk__gt=cursor.last_event_id)
                .select_related("actor", "facility", "actor_facility")
                .order_by("pk")[:batch]
            )
            for event in _sendable(events, cursor.last_event_id, timezone.now()):
                tls.sendall(frame(syslog_message(event)))
                sent.append(event)
            close(tls)
            if sent:
                cursor.last_event_id = sent[-1].pk
                cursor.save(update_fields=["last_event_id", "updated_at"])
    except OSError as exc:
        # The reason and the position, never a message body: those carry patient IDs.
        logger.warning(
            "audit feed: %s:%s took nothing (%s: %s); events wait after #%d",
            target.host,
            target.port,
            type(exc).__name__,
            exc,
            cursor.last_event_id,
        )
        raise
    if sent:
        logger.info("audit feed: sent %d events up to #%d", len(sent), sent[-1].pk)
    return len(sent)
