"""Patient links: finding a share by its token, checking the second factor, and the session.

A patient link is a Share of kind "patient" whose random token is stored only as its SHA-256.
Opening it asks a second factor (the birth date on the studies, or a PIN the sender set). Five
wrong answers lock the link for 30 minutes; every attempt, right, wrong or refused while locked,
is audited once per study of the share. A right answer marks this browser session as verified
for that one share; every page after that still asks for an active share, so revoking or expiry
stops a verified session at once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from django.contrib.auth.hashers import check_password
from django.db.models import Case, DateTimeField, F, PositiveIntegerField, Q, Value, When
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, Outcome

from ..access import PATIENT_SESSION_KEY
from ..models import SecondFactor, Share
from ..sharing.services import share_open

MAX_FAILED_ATTEMPTS = 5
LOCK_DURATION = timedelta(minutes=30)


@dataclass(frozen=True)
class FactorResult:
    """What the patient is told after an answer."""

    ok: bool
    locked_until: datetime | None = None
    attempts_left: int = 0


def patient_share_locked_until(*, share: Share) -> datetime | None:
    """When the link unlocks, or None when it is not locked (read fresh from the database)."""
    locked_until = Share.objects.filter(pk=share.pk).values_list("locked_until", flat=True).first()
    if locked_until is not None and locked_until > timezone.now():
        return locked_until
    return None


def patient_factor_check(
    *,
    share: Share,
    request: HttpRequest | None,
    birth_date: date | None = None,
    pin: str = "",
) -> FactorResult:
    """Check one answer to the share's second factor, counting it against the lock.

    The attempt is claimed with one conditional UPDATE *before* the answer is looked at: it
    succeeds only while the link is unlocked (or its lock has lapsed, which starts a fresh count)
    and it sets the lock itself when this is the fifth attempt. So parallel requests cannot
    squeeze in more than five answers, and a locked link never has an answer checked, not even
    a right one. A right answer then clears the count again.
    """
    now = timezone.now()
    lapsed = Q(locked_until__isnull=False, locked_until__lte=now)
    claimed = Share.objects.filter(
        Q(pk=share.pk)
        & (Q(locked_until__isnull=True, failed_attempts__lt=MAX_FAILED_ATTEMPTS) | lapsed)
    ).update(
        failed_attempts=Case(
            When(lapsed, then=Value(1)),
            default=F("failed_attempts") + 1,
            output_field=PositiveIntegerField(),
        ),
        locked_until=Case(
            When(
                Q(locked_until__isnull=True, failed_attempts__gte=MAX_FAILED_ATTEMPTS - 1),
                then=Value(now + LOCK_DURATION),
            ),
            default=Value(None),
            output_field=DateTimeField(),
        ),
    )
    if not claimed:
        # Refused unread. The fallback covers a lock that lapsed between the UPDATE and now.
        until = patient_share_locked_until(share=share) or now + LOCK_DURATION
        _audit_factor(share, request, Outcome.FAILURE, reason="locked")
        return FactorResult(ok=False, locked_until=until)

    if _answer_matches(share, birth_date=birth_date, pin=pin):
        # The answer was checked inside a claimed attempt, so it also lifts a lock that a
        # concurrent wrong answer may have set meanwhile: whoever sent it knows the answer.
        Share.objects.filter(pk=share.pk).update(failed_attempts=0, locked_until=None)
        _audit_factor(share, request, Outcome.SUCCESS)
        return FactorResult(ok=True)

    failed, locked_until = (
        Share.objects.filter(pk=share.pk).values_list("failed_attempts", "locked_until").get()
    )
    _audit_factor(share, request, Outcome.FAILURE, reason="wrong answer", failed_attempts=failed)
    return FactorResult(
        ok=False,
        locked_until=locked_until,
        attempts_left=max(MAX_FAILED_ATTEMPTS - failed, 0),
    )


def _answer_matches(share: Share, *, birth_date: date | None, pin: str) -> bool:
    if share.second_factor == SecondFactor.PIN:
        # check_password compares in constant time; an empty hash never matches.
        return bool(pin) and bool(share.pin_hash) and check_password(pin, share.pin_hash)
    if share.second_factor == SecondFactor.BIRTH_DATE and birth_date is not None:
        births = {s.patient_birth_date for s in share.studies.all()}
        if len(births) != 1 or None in births:
            return False  # share_create refuses this; never let an empty date match
        (expected,) = births
        assert expected is not None
        return secrets.compare_digest(birth_date.isoformat(), expected.isoformat())
    return False


def _audit_factor(
    share: Share, request: HttpRequest | None, outcome: str, **detail: object
) -> None:
    # One event per study: the audit trail is searched by patient and by study.
    for study in share.studies.all():
        audit_record(
            action=AuditAction.PATIENT_FACTOR,
            request=request,
            study=study,
            outcome=outcome,
            detail={"share": str(share.uuid), "factor": share.second_factor, **detail},
        )


def patient_session_grant(*, request: HttpRequest, share: Share) -> None:
    """Mark this browser session as verified for this one share, and record the opening."""
    # A new session key after the factor, so a session id planted before it is worth nothing.
    request.session.cycle_key()
    verified = [pk for pk in request.session.get(PATIENT_SESSION_KEY, []) if pk != share.pk]
    request.session[PATIENT_SESSION_KEY] = [*verified, share.pk]
    share_open(share=share, who="patient link", request=request)


def patient_studies_view(*, share: Share, request: HttpRequest) -> None:
    """Audit the patient's look at the list of their studies."""
    for study in share.studies.filter(purged_at__isnull=True):
        audit_record(
            action=AuditAction.STUDY_VIEW,
            request=request,
            study=study,
            detail={"share": str(share.uuid), "via": "patient link"},
        )
