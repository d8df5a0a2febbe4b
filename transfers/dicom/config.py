"""A facility admin's DICOM configuration: who may send to the gateway, PACS destinations, and
routing rules. Each change is one service, written in one transaction with an audit event that
carries the values before and after (routing rules share patient data automatically, and the
gateway allow-lists decide who may send it: a security officer wants to see who changed them).

The forms check the input; these services trust it and only apply and record it.
"""

from __future__ import annotations

import ssl
from typing import Any

from django.db import transaction
from django.db.models import ProtectedError
from django.http import HttpRequest

from portal.audit import audit_record
from portal.models import AuditAction, Facility, Outcome, User

from ..models import PacsDestination, RoutingRule
from .outbound import OutboundRefused, outbound_address
from .push import EchoResult, destination_echo
from .tls import PEM_CERTIFICATE, fingerprint


class ConfigError(Exception):
    """A change that cannot be made, with the reason to show."""


def _audit(
    action: str,
    facility: Facility,
    by: User,
    request: HttpRequest | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    **detail: Any,
) -> None:
    """One event of a configuration change: who, which facility, the values before and after
    (None for a thing added or removed)."""
    detail = {**detail, "before": before, "after": after}
    audit_record(action=action, request=request, actor=by, facility=facility, detail=detail)


def gateway_access_change(
    *,
    facility: Facility,
    by: User,
    calling_aes: str,
    addresses: str,
    client_certificates: str = "",
    tls_required: bool = False,
    request: HttpRequest | None = None,
) -> None:
    """Set who may use the facility's AE title at the gateway: calling AE titles, addresses or
    networks, client certificates (SHA-256 fingerprints), and whether only TLS is accepted."""
    fields = {
        "gateway_calling_aes": calling_aes,
        "gateway_addresses": addresses,
        "gateway_client_certificates": client_certificates,
        "gateway_tls_required": tls_required,
    }
    with transaction.atomic():
        locked = Facility.objects.select_for_update().get(pk=facility.pk)
        before = {name: getattr(locked, name) for name in fields}
        if before == fields:
            return
        for name, value in fields.items():
            setattr(locked, name, value)
            setattr(facility, name, value)
        locked.save(update_fields=list(fields))
        _audit(
            AuditAction.GATEWAY_CHANGE,
            facility,
            by,
            request,
            _gateway_values(before),
            _gateway_values(fields),
        )


def _gateway_values(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "calling_aes": fields["gateway_calling_aes"],
        "addresses": fields["gateway_addresses"],
        "client_certificates": fields["gateway_client_certificates"],
        "tls_required": fields["gateway_tls_required"],
    }


def _destination_values(destination: PacsDestination) -> dict[str, Any]:
    return {
        "destination": str(destination.uuid),
        "name": destination.name,
        "ae_title": destination.ae_title,
        "host": destination.host,
        "port": destination.port,
        "tls": destination.tls,
        # The CA certificates by fingerprint: what changed, not the whole PEM.
        "tls_ca": [
            fingerprint(ssl.PEM_cert_to_DER_cert(pem))
            for pem in PEM_CERTIFICATE.findall(destination.tls_ca_certificates)
        ],
    }


def _outbound_check(
    action: str,
    facility: Facility,
    by: User,
    request: HttpRequest | None,
    host: str,
    port: int,
    **detail: Any,
) -> None:
    """Refuse (audited, as a failure of `action`) a host and port Relay will not connect to."""
    try:
        outbound_address(host, port)
    except OutboundRefused as exc:
        audit_record(
            action=action,
            request=request,
            actor=by,
            facility=facility,
            outcome=Outcome.FAILURE,
            detail={**detail, "host": host[:255], "port": port, "reason": str(exc)},
        )
        raise ConfigError(f"Relay will not connect there: {exc}.") from exc


def destination_add(
    *,
    facility: Facility,
    by: User,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    tls: bool = False,
    tls_ca_certificates: str = "",
    request: HttpRequest | None = None,
) -> PacsDestination:
    _outbound_check(AuditAction.DESTINATION_ADD, facility, by, request, host, port)
    with transaction.atomic():
        destination = PacsDestination.objects.create(
            facility=facility,
            name=name,
            ae_title=ae_title,
            host=host,
            port=port,
            tls=tls,
            tls_ca_certificates=tls_ca_certificates if tls else "",
        )
        after = _destination_values(destination)
        _audit(AuditAction.DESTINATION_ADD, facility, by, request, None, after)
    return destination


def destination_change(
    *,
    destination: PacsDestination,
    by: User,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    tls: bool = False,
    tls_ca_certificates: str = "",
    request: HttpRequest | None = None,
) -> bool:
    """Change a destination (a PACS moved, got a new AE title, turned TLS on); False when
    nothing changed. Pushes on record keep naming it; the next ones go to the new address."""
    facility = destination.facility
    _outbound_check(
        AuditAction.DESTINATION_CHANGE,
        facility,
        by,
        request,
        host,
        port,
        destination=str(destination.uuid),
    )
    fields = {
        "name": name,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "tls": tls,
        "tls_ca_certificates": tls_ca_certificates if tls else "",
    }
    with transaction.atomic():
        locked = PacsDestination.objects.select_for_update().get(pk=destination.pk)
        before = _destination_values(locked)
        if all(getattr(locked, field) == value for field, value in fields.items()):
            return False
        for field, value in fields.items():
            setattr(locked, field, value)
            setattr(destination, field, value)
        # A test of the old address says nothing about the new one.
        locked.last_echo_at, locked.last_echo_ok, locked.last_echo_message = None, False, ""
        locked.save()
        after = _destination_values(locked)
        _audit(AuditAction.DESTINATION_CHANGE, facility, by, request, before, after)
    return True


def destination_remove(
    *, destination: PacsDestination, by: User, request: HttpRequest | None = None
) -> None:
    """Remove a destination; one with pushes on record stays (they name it)."""
    before = _destination_values(destination)
    try:
        with transaction.atomic():
            destination.delete()
            _audit(AuditAction.DESTINATION_REMOVE, destination.facility, by, request, before, None)
    except ProtectedError:
        raise ConfigError(f"{destination.name} has pushes on record; it stays.") from None


def destination_test(
    *, destination: PacsDestination, by: User, request: HttpRequest | None = None
) -> EchoResult:
    """The "Test connection" button: a C-ECHO, its result kept on the destination and audited."""
    before = {"ok": destination.last_echo_ok, "message": destination.last_echo_message}
    result = destination_echo(destination=destination)
    _audit(
        AuditAction.DESTINATION_ECHO,
        destination.facility,
        by,
        request,
        before,
        {"ok": result.ok, "message": result.message},
        destination=str(destination.uuid),
    )
    return result


def _rule_values(rule: RoutingRule) -> dict[str, Any]:
    return {
        "rule": str(rule.uuid),
        "calling_ae": rule.calling_ae,
        "referring_physician": rule.referring_physician,
        "modality": rule.modality,
        "recipient_facility": rule.recipient_facility.slug if rule.recipient_facility else "",
        "recipient_email": rule.recipient_email,
        "can_download": rule.can_download,
        "can_import": rule.can_import,
    }


def routing_rule_add(
    *,
    facility: Facility,
    by: User,
    calling_ae: str = "",
    referring_physician: str = "",
    modality: str = "",
    recipient_facility: Facility | None = None,
    recipient_email: str = "",
    can_download: bool = True,
    can_import: bool = True,
    request: HttpRequest | None = None,
) -> RoutingRule:
    """A standing order: matching studies from the gateway are shared once they complete, in
    the name of `by`."""
    with transaction.atomic():
        rule = RoutingRule.objects.create(
            facility=facility,
            created_by=by,
            calling_ae=calling_ae.strip(),
            referring_physician=referring_physician.strip(),
            modality=modality.strip().upper(),
            recipient_facility=recipient_facility,
            recipient_email=recipient_email,
            can_download=can_download,
            can_import=can_import,
        )
        _audit(AuditAction.ROUTING_RULE_ADD, facility, by, request, None, _rule_values(rule))
    return rule


def routing_rule_remove(
    *, facility: Facility, rule_uuid: str, by: User, request: HttpRequest | None = None
) -> bool:
    """Remove one of the facility's rules; False when it has none by that id. Shares the rule
    made stay until they expire."""
    with transaction.atomic():
        rule = (
            RoutingRule.objects.select_for_update(of=("self",))
            .select_related("recipient_facility")
            .filter(facility=facility, uuid=rule_uuid)
            .first()
        )
        if rule is None:
            return False
        before = _rule_values(rule)
        rule.delete()
        _audit(AuditAction.ROUTING_RULE_REMOVE, facility, by, request, before, None)
    return True
