"""Writing the audit trail.

`audit_record` is the one way an event is written. The receivers at the bottom exist because
Django reports logins, logouts and failed logins (including the admin's) only through signals.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from .models import AuditAction, AuditEvent, Facility, Outcome, User


class AuditedStudy(Protocol):
    """What the trail copies from a study (transfers' Study has it; portal does not import it)."""

    study_instance_uid: str
    patient_id: str

    @property
    def facility(self) -> Facility: ...


def client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR is what the server saw; behind the TLS proxy gunicorn is started with
    # --forwarded-allow-ips so that this is the client's address, not the proxy's.
    raw = request.META.get("REMOTE_ADDR", "")
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return None


def audit_record(
    *,
    action: str,
    request: HttpRequest | None = None,
    actor: User | None = None,
    facility: Facility | None = None,
    study: AuditedStudy | None = None,
    study_instance_uid: str = "",
    patient_id: str = "",
    outcome: str = Outcome.SUCCESS,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    # Refuses a misspelt or unknown action: the trail is searched by these values.
    action = AuditAction(action).value
    if actor is None and request is not None and getattr(request, "user", None) is not None:
        if request.user.is_authenticated:
            actor = request.user  # type: ignore[assignment]
    if study is not None:
        study_instance_uid = study.study_instance_uid
        patient_id = study.patient_id
        facility = facility or study.facility
    return AuditEvent.objects.create(
        action=action,
        outcome=outcome,
        actor=actor,
        actor_email=actor.email if actor else (detail or {}).get("email", ""),
        facility=facility,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id[:64],
        client_ip=client_ip(request) if request is not None else None,
        user_agent=(request.META.get("HTTP_USER_AGENT", "")[:300] if request is not None else ""),
        detail=detail or {},
    )


@receiver(user_logged_in)
def _on_login(sender: Any, request: HttpRequest, user: User, **kwargs: Any) -> None:
    audit_record(action=AuditAction.LOGIN, request=request, actor=user)


@receiver(user_logged_out)
def _on_logout(sender: Any, request: HttpRequest, user: User | None, **kwargs: Any) -> None:
    if user is not None:
        audit_record(action=AuditAction.LOGOUT, request=request, actor=user)


@receiver(user_login_failed)
def _on_login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    # The attempted address is kept (it is what an investigator searches for); never the password.
    email = str(credentials.get("username") or credentials.get("email") or "")[:254]
    audit_record(
        action=AuditAction.LOGIN_FAILED,
        request=request,
        outcome=Outcome.FAILURE,
        detail={"email": email},
    )
