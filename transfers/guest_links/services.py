"""Guest links: the e-mailed one-time code, and keeping the studies in an account.

A share to a physician who has no Relay account is a guest link: a random token (stored as its
SHA-256, and encrypted so the notification can carry it) and, as its second factor, a six-digit
code that Relay e-mails to the share's address when someone opening the link asks for one. So a
link that leaks (a forwarded e-mail, a pasted address, a proxy's log) opens nothing without that
mailbox. A code lasts CODE_LIFETIME and opens once; another may be asked for after
CODE_RESEND_AFTER, at most CODE_SENDS_PER_DAY a day. Wrong codes count against the share's lock
exactly as a patient link's wrong answers do (five per round, longer locks, then locked until the
sender unlocks it), and per client address; every code sent, every answer and every refusal is
audited once per study of the share and put on the sender's timeline.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.emails import email_queue
from portal.models import AuditAction, Facility, Invitation, Outcome, Role, User
from portal.services import invitation_create_unsent, practice_create

from ..models import Share, ShareEvent, ShareEventKind

CODE_DIGITS = 6
CODE_LIFETIME = timedelta(minutes=10)
CODE_RESEND_AFTER = timedelta(seconds=60)
CODE_SENDS_PER_DAY = 10


@dataclass(frozen=True)
class CodeSend:
    """What the person at the link is told after asking for a code."""

    sent: bool
    # Why none was sent: "locked", "wait" (one was sent moments ago) or "limit" (too many today).
    refused: str = ""
    # Seconds until another may be asked for ("wait").
    wait: int = 0


def guest_address_hint(email: str) -> str:
    """The address a code goes to, shown on the link's page without spelling it out in full:
    'd•••@clinic.example' (whoever holds the link knows where it was sent; a finder does not)."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}\u2022\u2022\u2022@{domain}"


def guest_code_send(*, share: Share, request: HttpRequest | None) -> CodeSend:
    """E-mail a new one-time code to the share's address, unless the link is locked or a code
    went out moments ago or too many went out today. Claimed under the share's row lock, so two
    clicks send one code."""
    if share.patient_lock() is not None:
        _audit_send(share, request, Outcome.FAILURE, reason="locked")
        return CodeSend(sent=False, refused="locked")
    now = timezone.now()
    with transaction.atomic():
        row = (
            Share.objects.select_for_update()
            .only("code_sent_at", "code_sends", "code_sends_since")
            .get(pk=share.pk)
        )
        if row.code_sent_at is not None and now - row.code_sent_at < CODE_RESEND_AFTER:
            wait = int((row.code_sent_at + CODE_RESEND_AFTER - now).total_seconds()) + 1
            return CodeSend(sent=False, refused="wait", wait=wait)
        since, sends = row.code_sends_since, row.code_sends
        if since is None or now - since >= timedelta(days=1):
            since, sends = now, 0
        if sends >= CODE_SENDS_PER_DAY:
            _audit_send(share, request, Outcome.FAILURE, reason="daily limit")
            return CodeSend(sent=False, refused="limit")
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        expires_at = now + CODE_LIFETIME
        Share.objects.filter(pk=share.pk).update(
            code_hash=make_password(code),
            code_expires_at=expires_at,
            code_sent_at=now,
            code_sends=sends + 1,
            code_sends_since=since,
        )
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.CODE_SENT,
            actor_label=share.recipient_email,
            detail=f"code {sends + 1} of at most {CODE_SENDS_PER_DAY} a day",
        )
        _audit_send(share, request, Outcome.SUCCESS)
        email_queue(
            name="guest_code",
            to=share.recipient_email,
            context={
                "share": share,
                "code": code,
                "expires_at": expires_at,
                "minutes": int(CODE_LIFETIME.total_seconds() // 60),
            },
        )
    return CodeSend(sent=True)


def _audit_send(share: Share, request: HttpRequest | None, outcome: str, **detail: str) -> None:
    for study in share.studies.all():
        audit_record(
            action=AuditAction.GUEST_CODE_SEND,
            request=request,
            facility=share.facility,
            study=study,
            outcome=outcome,
            detail={"share": str(share.uuid), "to": share.recipient_email, **detail},
        )


def guest_account_invitation(*, share: Share, request: HttpRequest | None) -> str:
    """For a guest who proved the address (this session entered its code) and wants to keep the
    studies in an account: an invitation to a practice of their own, opened at once in this
    browser instead of another e-mail. Returns the invitation's raw token. The shares sent to the
    address reach the account by the address once it exists (ShareQuerySet.received_by)."""
    email = share.recipient_email
    if User.objects.filter(email__iexact=email).exists():
        raise GuestError("An account with this address exists already: sign in to it.")
    # Asked twice (a second tab, the back button): the same practice, a fresh invitation.
    practice_id = (
        Invitation.objects.filter(
            email__iexact=email,
            facility__is_practice=True,
            accepted_at__isnull=True,
            revoked_at__isnull=True,
        )
        .values_list("facility_id", flat=True)
        .first()
    )
    with transaction.atomic():
        facility = (
            Facility.objects.get(pk=practice_id)
            if practice_id is not None
            else practice_create(email=email)
        )
        raw = invitation_create_unsent(
            facility=facility,
            email=email,
            role=Role.ADMIN,
            invited_by=share.created_by,
            request=request,
        )
    return raw


class GuestError(Exception):
    """A refusal shown to the guest."""
