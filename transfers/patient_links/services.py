"""Patient links: finding a share by its token, checking the second factor, the locks, the
sender's unlock and re-issue, and the session.

A patient link is a Share of kind "patient" whose random token is stored only as its SHA-256.
Opening it asks a second factor (the birth date on the studies, or a PIN the sender set). Wrong
answers lock the link in rounds (transfers.models.sharing): five wrong lock it for 30 minutes,
five more for 4 hours, five more for good, until the sender unlocks or re-issues it. Waiting
does not reset the rounds; a right answer does. Each lock is audited, put on the share's
timeline and e-mailed to the sender (notify.py). Wrong answers also count per client address,
across links (throttle.py). Every attempt, right, wrong or refused, is audited once per study
of the share. A right answer marks this browser session as verified for that one share; every
page after that still asks for an active share, so revoking, expiry or re-issue stops a verified
session at once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date, timedelta

from django.contrib.auth.hashers import check_password, make_password
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.models import AuditAction, Outcome, User, hash_token

from ..access import PATIENT_SESSION_KEY, PATIENT_SESSION_LINKS_KEY, patient_link_mark
from ..models import SecondFactor, Share, ShareEvent, ShareEventKind, ShareKind
from ..models.sharing import PATIENT_LINK_LOCKS, PATIENT_LINK_ROUNDS, PATIENT_LINK_TRIES, LinkLock
from ..sharing.services import ShareError, pin_check, share_open, share_revoke
from .notify import patient_link_locked_notify
from .throttle import address_failure_count


@dataclass(frozen=True)
class FactorResult:
    """What the patient is told after an answer (never how close it was)."""

    ok: bool
    # The link is locked: by this answer, or it was already and the answer went unread.
    lock: LinkLock | None = None
    tries_left: int = 0
    # How long the lock at the end of this round lasts ("" when it is for good).
    next_lock: str = ""


def duration_text(duration: timedelta) -> str:
    minutes = int(duration.total_seconds() // 60)
    if minutes % 60:
        return f"{minutes} minutes"
    hours = minutes // 60
    return f"{hours} hour{'s' if hours != 1 else ''}"


def patient_link_lock(*, share: Share) -> LinkLock | None:
    """The link's lock now, read fresh from the database; None when it takes answers."""
    fresh = Share.objects.only("failed_attempts", "locked_until", "lock_rounds").get(pk=share.pk)
    return fresh.patient_lock()


def patient_factor_check(
    *,
    share: Share,
    request: HttpRequest | None,
    birth_date: date | None = None,
    pin: str = "",
    code: str = "",
) -> FactorResult:
    """Check one answer to the share's second factor, counting it against the lock.

    The attempt is claimed under a row lock *before* the answer is looked at
    (Share.patient_attempt_claim): a locked link never has an answer checked, not even a right
    one, and parallel answers cannot exceed a round. A right answer then clears the count and
    the rounds; it also lifts a lock that a concurrent wrong answer may have set meanwhile,
    since whoever sent it knows the answer.
    """
    claim = share.patient_attempt_claim()
    if claim.refused is not None:
        patient_factor_refused(share=share, request=request, reason="locked")
        return FactorResult(ok=False, lock=claim.refused)

    if _answer_matches(share, birth_date=birth_date, pin=pin, code=code) and _code_consumed(share):
        share.patient_lock_clear()
        _audit_factor(share, request, Outcome.SUCCESS)
        return FactorResult(ok=True)

    _audit_factor(
        share, request, Outcome.FAILURE, reason="wrong answer", failed_attempts=claim.failed
    )
    if claim.locks is not None:
        _lock_announce(share, claim.locks, request)
    if request is not None:
        blocked_until = address_failure_count(request)
        if blocked_until is not None:
            # The address, not one link: recorded with the client's address by audit_record.
            audit_record(
                action=AuditAction.LOCKOUT,
                request=request,
                facility=share.facility,
                outcome=Outcome.FAILURE,
                detail={
                    "what": "patient link answers from this address",
                    "share": str(share.uuid),
                    "until": blocked_until.isoformat(),
                },
            )
    upcoming = claim.rounds if claim.locks is None else claim.rounds + 1
    return FactorResult(
        ok=False,
        lock=claim.locks,
        tries_left=max(PATIENT_LINK_TRIES - claim.failed, 0),
        next_lock=(
            duration_text(PATIENT_LINK_LOCKS[upcoming])
            if upcoming < len(PATIENT_LINK_LOCKS)
            else ""
        ),
    )


def patient_factor_refused(*, share: Share, request: HttpRequest | None, reason: str) -> None:
    """Audit an answer refused unread (the link or the address is locked)."""
    _audit_factor(share, request, Outcome.FAILURE, reason=reason)


def _lock_announce(share: Share, lock: LinkLock, request: HttpRequest | None) -> None:
    """A wrong answer locked the link: the audit trail, the timeline, the sender's e-mail."""
    until = lock.until.isoformat() if lock.until is not None else None
    for study in share.studies.all():
        audit_record(
            action=AuditAction.PATIENT_LINK_LOCK,
            request=request,
            facility=share.facility,
            study=study,
            outcome=Outcome.FAILURE,
            detail={
                "share": str(share.uuid),
                "round": lock.round,
                "rounds": PATIENT_LINK_ROUNDS,
                "until": until,
                "for_good": lock.for_good,
            },
        )
    ShareEvent.objects.create(
        share=share,
        kind=ShareEventKind.LOCKED,
        actor_label=share.link_label,
        detail=_lock_text(lock),
    )
    patient_link_locked_notify(share=share, lock=lock)


def _lock_text(lock: LinkLock) -> str:
    if lock.until is None:
        return f"lock {lock.round} of {PATIENT_LINK_ROUNDS}: until unlocked or re-issued"
    return f"lock {lock.round} of {PATIENT_LINK_ROUNDS}: until {timezone.localtime(lock.until):%Y-%m-%d %H:%M}"


def _code_consumed(share: Share) -> bool:
    """An e-mailed code opens once: it is used up by one conditional UPDATE, so of two answers
    sent together with the same code only one gets in. Other factors: always True."""
    if share.second_factor != SecondFactor.EMAIL_CODE:
        return True
    fresh = Share.objects.only("code_hash").get(pk=share.pk)
    if not fresh.code_hash:
        return False
    used = Share.objects.filter(pk=share.pk, code_hash=fresh.code_hash).update(
        code_hash="", code_expires_at=None
    )
    return used == 1


def _answer_matches(share: Share, *, birth_date: date | None, pin: str, code: str = "") -> bool:
    if share.second_factor == SecondFactor.EMAIL_CODE:
        # Read fresh: the code was set by another request. An expired or used code never matches.
        fresh = Share.objects.only("code_hash", "code_expires_at").get(pk=share.pk)
        return (
            bool(code)
            and bool(fresh.code_hash)
            and fresh.code_expires_at is not None
            and fresh.code_expires_at > timezone.now()
            and check_password(code, fresh.code_hash)
        )
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
            action=AuditAction.GUEST_CODE if share.is_guest_link else AuditAction.PATIENT_FACTOR,
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
    links = dict(request.session.get(PATIENT_SESSION_LINKS_KEY, {}))
    links[str(share.pk)] = patient_link_mark(share)
    request.session[PATIENT_SESSION_LINKS_KEY] = links
    share_open(share=share, who=share.link_label, request=request)


def patient_studies_view(*, share: Share, request: HttpRequest) -> None:
    """Audit the patient's look at the list of their studies."""
    for study in share.studies.filter(purged_at__isnull=True):
        audit_record(
            action=AuditAction.STUDY_VIEW,
            request=request,
            study=study,
            detail={
                "share": str(share.uuid),
                "via": "guest link" if share.is_guest_link else "patient link",
            },
        )


def patient_link_unlock(*, share: Share, by: User, request: HttpRequest | None = None) -> None:
    """The sender lifts the lock and resets the rounds; the link and its answer stay the same."""
    if not (share.kind == ShareKind.PATIENT or share.is_guest_link) or not share.is_active:
        raise ShareError("Only an active patient or guest link can be unlocked.")
    with transaction.atomic():
        share.patient_lock_clear()
        ShareEvent.objects.create(share=share, kind=ShareEventKind.UNLOCKED, actor_label=by.email)
        _audit_sender(share, request, by, how="unlock")


def patient_link_reissue(
    *, share: Share, by: User, request: HttpRequest | None = None
) -> tuple[str, str]:
    """The sender replaces a link that may have leaked: a new token and, for a PIN link, a new
    PIN, with the lock and rounds reset. The old link answers 404 at once. Returns the raw token
    and the PIN ("" for a birth-date link), to be shown to the sender once, like at creation.
    """
    if share.kind != ShareKind.PATIENT or not share.is_active:
        raise ShareError("Only an active patient link can be re-issued; share the study again.")
    raw_token = secrets.token_urlsafe(24)  # 192 bits, as share_create
    pin = _pin_new(share) if share.second_factor == SecondFactor.PIN else ""
    changes: dict[str, object] = {
        "token_hash": hash_token(raw_token),
        "failed_attempts": 0,
        "lock_rounds": 0,
        "locked_until": None,
    }
    if pin:
        changes["pin_hash"] = make_password(pin)
    with transaction.atomic():
        Share.objects.filter(pk=share.pk).update(**changes)
        # Whoever got in through the old link may have forwarded it to themselves: what was
        # forwarded through it stops too (the patient can forward again with the new link).
        for forward in Share.objects.filter(forwarded_from=share, revoked_at__isnull=True):
            share_revoke(share=forward, by=by, request=request)
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.REISSUED,
            actor_label=by.email,
            detail="new link and PIN" if pin else "new link",
        )
        _audit_sender(share, request, by, how="reissue", new_pin=bool(pin))
    share.refresh_from_db()
    return raw_token, pin


def _pin_new(share: Share) -> str:
    """Eight random digits that pass the PIN policy for this patient."""
    births = [s.patient_birth_date for s in share.studies.all() if s.patient_birth_date]
    while True:
        pin = "".join(secrets.choice("0123456789") for _ in range(8))
        try:
            pin_check(pin, birth_dates=births)
        except ShareError:
            continue
        return pin


def _audit_sender(share: Share, request: HttpRequest | None, by: User, **detail: object) -> None:
    for study in share.studies.all():
        audit_record(
            action=AuditAction.PATIENT_LINK_UNLOCK,
            request=request,
            actor=by,
            facility=share.facility,
            study=study,
            detail={"share": str(share.uuid), **detail},
        )
