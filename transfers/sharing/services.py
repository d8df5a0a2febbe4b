"""Sharing: a study leaves its facility for a facility, a physician or a patient, with an expiry.

Services here are the only way shares are made, opened, revoked or extended; each writes the
share's timeline (the sender's access receipts) and the audit trail in the same transaction.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import date, datetime, timedelta

from django.contrib.auth.hashers import make_password
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import audit_record
from portal.crypto import secret_encrypt
from portal.models import AuditAction, Facility, Membership, User, hash_token

from ..deliveries import receiving_facility_of
from ..models import (
    NotifyStatus,
    SecondFactor,
    Share,
    ShareEvent,
    ShareEventKind,
    ShareKind,
    Study,
    StudyStatus,
)
from ..queue import task_queue_on_commit
from .errors import ShareError
from .message import share_message_check

PIN_MIN, PIN_MAX = 6, 12


def pin_check(pin: str, *, birth_dates: Iterable[date]) -> None:
    """Refuse a PIN that is easy to guess: too short, one digit repeated, a run of digits up or
    down, or one that holds the patient's birth year or birth date (what a finder of the
    handout could try first). ShareError says why."""
    if not (pin.isdigit() and PIN_MIN <= len(pin) <= PIN_MAX):
        raise ShareError(f"The PIN is {PIN_MIN} to {PIN_MAX} digits.")
    steps = {int(b) - int(a) for a, b in zip(pin, pin[1:], strict=False)}
    if steps in ({0}, {1}, {-1}):
        raise ShareError(
            "That PIN is too easy to guess (a repeated digit or a run); choose another."
        )
    for born in birth_dates:
        forms = {
            f"{born:%Y}",
            f"{born:%Y%m%d}",
            f"{born:%d%m%Y}",
            f"{born:%m%d%Y}",
            f"{born:%d%m%y}",
            f"{born:%m%d%y}",
            f"{born:%y%m%d}",
        }
        if any(form in pin for form in forms):
            raise ShareError("The PIN must not contain the patient's birth year or birth date.")


def share_create(
    *,
    facility: Facility,
    created_by: User,
    studies: Iterable[Study],
    kind: str,
    recipient_facility: Facility | None = None,
    recipient_email: str = "",
    message: str = "",
    expires_at: datetime | None = None,
    can_view: bool = True,
    can_download: bool = False,
    can_import: bool = False,
    second_factor: str = "",
    pin: str = "",
    request: HttpRequest | None = None,
) -> tuple[Share, str | None]:
    """Make a share; returns it and, for a patient link, the raw token (shown once)."""
    studies = list(studies)
    membership = Membership.objects.filter(user=created_by, facility=facility).first()
    if membership is None or not membership.can_upload:
        raise ShareError("Only senders and admins of the facility can share its studies.")
    if not studies:
        raise ShareError("Choose at least one study.")
    if any(s.facility_id != facility.pk for s in studies):
        raise ShareError("You can share only studies of your own facility.")
    if any(s.purged_at is not None for s in studies):
        raise ShareError("A purged study cannot be shared: its images are gone.")
    if any(s.reconcile_running for s in studies):
        raise ShareError("The patient of a study is being reconciled; share it when that is done.")
    now = timezone.now()
    if expires_at is None:
        expires_at = now + timedelta(days=facility.share_default_days)
    if expires_at <= now:
        raise ShareError("The expiry must be in the future.")
    if expires_at > now + timedelta(days=facility.share_max_days, minutes=5):
        raise ShareError(
            f"{facility.name} allows shares of at most {facility.share_max_days} days."
        )
    if not (can_view or can_download or can_import):
        raise ShareError("Allow the recipient at least one thing: view, download or import.")
    # The message is e-mailed, and e-mail carries no patient information.
    share_message_check(message=message, studies=studies)

    recipient_email = recipient_email.strip().lower()
    recipient_user = None
    raw_token = None
    guest_token = None
    pin_hash = ""
    if kind == ShareKind.FACILITY:
        if recipient_facility is None:
            raise ShareError("Choose the facility to share with.")
        if recipient_facility.pk == facility.pk:
            raise ShareError("Its own members already see the facility's studies.")
        recipient_email = ""
    elif kind in (ShareKind.PHYSICIAN, ShareKind.PATIENT):
        recipient_facility = None
        if recipient_email or kind == ShareKind.PHYSICIAN:
            try:
                validate_email(recipient_email)
            except ValidationError:
                raise ShareError(f"'{recipient_email}' is not a valid e-mail address.") from None
        if kind == ShareKind.PHYSICIAN:
            recipient_user = User.objects.filter(
                email__iexact=recipient_email, is_active=True
            ).first()
            if recipient_user is None:
                # No account: a guest link. The physician opens it with a code e-mailed to
                # this address (transfers.guest_links); no password, no practice, one e-mail.
                guest_token = secrets.token_urlsafe(24)  # 192 bits
                second_factor = SecondFactor.EMAIL_CODE
            else:
                second_factor = ""
        else:
            raw_token = secrets.token_urlsafe(24)  # 192 bits
            # Whatever the second factor, one patient's link never shows another's images.
            if len({s.patient_id for s in studies}) != 1:
                raise ShareError("A patient link can carry the studies of one patient only.")
            if second_factor == SecondFactor.BIRTH_DATE:
                births = {s.patient_birth_date for s in studies}
                if len(births) != 1 or None in births:
                    raise ShareError(
                        "The studies need one known birth date to use it as the second factor; set a PIN."
                    )
            elif second_factor == SecondFactor.PIN:
                pin_check(
                    pin, birth_dates=[s.patient_birth_date for s in studies if s.patient_birth_date]
                )
                pin_hash = make_password(pin)
            else:
                raise ShareError("Choose the patient's second factor: birth date or PIN.")
    else:
        raise ShareError("Choose who to share with.")

    with transaction.atomic():
        # Lock the studies and look again: a purge that claimed one meanwhile wins.
        alive = Study.objects.select_for_update().filter(
            pk__in=[s.pk for s in studies], purged_at__isnull=True
        )
        if alive.count() != len(studies):
            raise ShareError("A purged study cannot be shared: its images are gone.")
        share = Share.objects.create(
            facility=facility,
            created_by=created_by,
            kind=kind,
            recipient_facility=recipient_facility,
            recipient_email=recipient_email,
            recipient_user=recipient_user,
            message=message.strip()[:2000],
            can_view=can_view,
            can_download=can_download,
            can_import=can_import,
            expires_at=expires_at,
            token_hash=hash_token(link_token) if (link_token := raw_token or guest_token) else None,
            link_token_encrypted=secret_encrypt(guest_token) if guest_token else "",
            second_factor=second_factor if kind != ShareKind.FACILITY else "",
            pin_hash=pin_hash,
            # A patient's e-mail carries the link's token, which only this request knows: it
            # is sent from here (patient_link_email), never by the notification task.
            notify_status=NotifyStatus.NONE if kind == ShareKind.PATIENT else NotifyStatus.WAITING,
        )
        share.studies.set(studies)
        ShareEvent.objects.create(
            share=share, kind=ShareEventKind.CREATED, actor_label=created_by.email
        )
        if guest_token is not None:
            ShareEvent.objects.create(
                share=share,
                kind=ShareEventKind.CREATED,
                detail=f"guest link for {recipient_email} (no account): opened with an e-mailed code",
            )
        for study in studies:
            audit_record(
                action=AuditAction.SHARE_CREATE,
                request=request,
                actor=created_by,
                study=study,
                detail={"share": str(share.uuid), "kind": kind, "to": share.recipient_label},
            )
        share_notify_if_ready(share=share)
    return share, raw_token


def share_notify_if_ready(*, share: Share) -> bool:
    """Queue the recipient's e-mail once every study of the share is complete."""
    if share.notify_status != NotifyStatus.WAITING:
        return False
    if share.studies.exclude(status=StudyStatus.COMPLETE).exists():
        return False
    claimed = Share.objects.filter(pk=share.pk, notify_status=NotifyStatus.WAITING).update(
        notify_status=NotifyStatus.QUEUED
    )
    if claimed:
        task_queue_on_commit("transfers.sharing.tasks.share_notify", share.pk)
    return bool(claimed)


def shares_notify_completed() -> int:
    """Queue the e-mails of waiting shares whose studies have all completed."""
    queued = 0
    waiting = Share.objects.filter(
        notify_status=NotifyStatus.WAITING, revoked_at__isnull=True, expires_at__gt=timezone.now()
    )
    for share in waiting.exclude(studies__status__in=[StudyStatus.RECEIVING, StudyStatus.FAILED]):
        with transaction.atomic():
            queued += share_notify_if_ready(share=share)
    return queued


def shares_notify_added(*, studies: Iterable[Study]) -> int:
    """Queue an "images added" e-mail for each active share of these (just completed) studies
    whose recipients were told of fewer images than its studies hold now; returns how many.

    Only shares already notified: one still waiting gets its first notice, which counts every
    image. A share with a study still arriving waits for it (its completion calls this again),
    so a batch is told once, never image by image. The same images sent again add nothing."""
    study_ids = [s.pk for s in studies]
    if not study_ids:
        return 0
    queued = 0
    shares = (
        Share.objects.filter(studies__in=study_ids, notify_status=NotifyStatus.SENT)
        # A patient's e-mail carried their link once; images added show up behind it.
        .exclude(kind=ShareKind.PATIENT)
        .active()
        .distinct()
        .only("pk", "notified_instances")
    )
    for share in shares:
        rows = list(share.studies.values_list("status", "purged_at", "num_instances"))
        if any(status != StudyStatus.COMPLETE or purged for status, purged, _ in rows):
            continue
        if sum(n for _, _, n in rows) > share.notified_instances:
            task_queue_on_commit("transfers.sharing.tasks.share_notify_added", share.pk)
            queued += 1
    return queued


def share_open(
    *, share: Share, who: str, request: HttpRequest | None = None, actor: User | None = None
) -> None:
    """A recipient opened the share: the first time is the sender's 'opened' receipt."""
    with transaction.atomic():
        first = Share.objects.filter(pk=share.pk, first_opened_at__isnull=True).update(
            first_opened_at=timezone.now(), first_opened_by=who[:254]
        )
        if first:
            ShareEvent.objects.create(
                share=share, kind=ShareEventKind.OPENED, actor_label=who[:254]
            )
        _audit_share(
            share,
            AuditAction.SHARE_OPEN,
            request=request,
            actor=actor,
            actor_facility=receiving_facility_of(share=share, user=actor),
            who=who,
        )


def share_downloaded(
    *,
    share: Share,
    who: str,
    what: str,
) -> None:
    """A recipient took a copy: every download is a receipt on the sender's timeline."""
    ShareEvent.objects.create(
        share=share, kind=ShareEventKind.DOWNLOADED, actor_label=who[:254], detail=what[:300]
    )


def share_revoke(
    *, share: Share, by: User | None, request: HttpRequest | None = None, who: str = ""
) -> None:
    """Stop a share at once, and the shares a patient forwarded from it. `by` is the sender, or
    None for a patient revoking a share they forwarded (`who` then says "patient link")."""
    label = by.email if by is not None else who
    with transaction.atomic():
        if Share.objects.filter(pk=share.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now(), revoked_by=by
        ):
            ShareEvent.objects.create(share=share, kind=ShareEventKind.REVOKED, actor_label=label)
            _audit_share(share, AuditAction.SHARE_REVOKE, request=request, actor=by)
        for forward in Share.objects.filter(forwarded_from=share, revoked_at__isnull=True):
            share_revoke(share=forward, by=by, request=request, who=label)


# A patient forwards to a handful of doctors, not to a mailing list: at most this many live
# forwards at a time, and this many made (e-mails sent) a day.
FORWARDS_MAX = 10
FORWARDS_PER_DAY = 20


def share_forward(
    *, share: Share, recipient_email: str, days: int, request: HttpRequest | None = None
) -> Share:
    """A patient sends their study to a doctor from their own patient link: a new share from the
    same facility to that address (a guest link when the address has no account, as share_create
    makes), that views and downloads what the patient's link allows, expires no later than it,
    and shows on the facility's Sent page and timelines. The patient sees and revokes it on their
    page; the facility revokes it like any share, and revoking the patient's link revokes it."""
    if share.kind != ShareKind.PATIENT or not share.is_active:
        raise ShareError("This link can no longer be forwarded.")
    if share.forwards.active().count() >= FORWARDS_MAX:
        raise ShareError(
            f"A link can be forwarded to at most {FORWARDS_MAX} addresses at a time; "
            "stop sharing with one first, or ask the care team."
        )
    if share.forwards.filter(created_at__gte=timezone.now() - timedelta(days=1)).count() >= (
        FORWARDS_PER_DAY
    ):
        raise ShareError("That is enough forwarding for today; try again tomorrow.")
    recipient_email = recipient_email.strip().lower()
    try:
        validate_email(recipient_email)
    except ValidationError:
        raise ShareError(f"'{recipient_email}' is not a valid e-mail address.") from None
    if share.forwards.filter(recipient_email=recipient_email).active().exists():
        raise ShareError(f"The study is already shared with {recipient_email}.")
    studies = list(share.studies.filter(purged_at__isnull=True))
    if not studies:
        raise ShareError("The images of this study were removed.")
    expires_at = min(share.expires_at, timezone.now() + timedelta(days=max(days, 1)))
    recipient_user = User.objects.filter(email__iexact=recipient_email, is_active=True).first()
    guest_token = None if recipient_user is not None else secrets.token_urlsafe(24)
    with transaction.atomic():
        forward = Share.objects.create(
            facility=share.facility,
            created_by=share.created_by,
            kind=ShareKind.PHYSICIAN,
            recipient_email=recipient_email,
            recipient_user=recipient_user,
            can_view=share.can_view,
            can_download=share.can_download,
            expires_at=expires_at,
            forwarded_from=share,
            token_hash=hash_token(guest_token) if guest_token else None,
            link_token_encrypted=secret_encrypt(guest_token) if guest_token else "",
            second_factor=SecondFactor.EMAIL_CODE if guest_token else "",
        )
        forward.studies.set(studies)
        ShareEvent.objects.create(
            share=forward,
            kind=ShareEventKind.CREATED,
            actor_label="patient link",
            detail=f"forwarded by the patient from their link (share {share.uuid})",
        )
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.FORWARDED,
            actor_label="patient link",
            detail=f"to {recipient_email}, until {timezone.localtime(expires_at):%Y-%m-%d}",
        )
        for study in studies:
            audit_record(
                action=AuditAction.SHARE_CREATE,
                request=request,
                study=study,
                facility=share.facility,
                detail={
                    "share": str(forward.uuid),
                    "kind": ShareKind.PHYSICIAN,
                    "to": recipient_email,
                    "forwarded_from": str(share.uuid),
                    "by": "patient link",
                },
            )
        share_notify_if_ready(share=forward)
    return forward


def share_extend(
    *, share: Share, by: User, expires_at: datetime, request: HttpRequest | None = None
) -> None:
    now = timezone.now()
    if share.revoked_at is not None:
        raise ShareError("A revoked share cannot be extended; share the study again.")
    if share.studies.filter(purged_at__isnull=False).exists():
        raise ShareError("The images of this share were purged; it cannot be extended.")
    if expires_at <= now:
        raise ShareError("The new expiry must be in the future.")
    if expires_at > now + timedelta(days=share.facility.share_max_days, minutes=5):
        raise ShareError(
            f"{share.facility.name} allows shares of at most {share.facility.share_max_days} days."
        )
    with transaction.atomic():
        Share.objects.filter(pk=share.pk).update(expires_at=expires_at, expiry_warned_at=None)
        # What a patient forwarded never outlives their link (an earlier expiry reaches it).
        Share.objects.filter(forwarded_from=share, expires_at__gt=expires_at).update(
            expires_at=expires_at
        )
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.EXTENDED,
            actor_label=by.email,
            detail=f"until {expires_at:%Y-%m-%d %H:%M}",
        )
        _audit_share(
            share, AuditAction.SHARE_EXTEND, request=request, actor=by, until=expires_at.isoformat()
        )


def _audit_share(
    share: Share,
    action: str,
    *,
    request: HttpRequest | None,
    actor: User | None,
    actor_facility: Facility | None = None,
    **detail: str,
) -> None:
    """One audit event per study of the share: the trail is searched by patient and study."""
    for study in share.studies.all():
        audit_record(
            action=action,
            request=request,
            actor=actor,
            actor_facility=actor_facility,
            study=study,
            detail={"share": str(share.uuid), **detail},
        )


def patient_link_email(*, share: Share, raw_token: str) -> None:
    """E-mail the patient their link (no patient data in it; the second factor guards it).

    Rendered here, where the raw token is known, and sent by a task that records the outcome on
    the share (queued, sent, failed and retrying), as for any other recipient's e-mail."""
    from django.urls import reverse

    from portal.emails import email_render

    if not share.recipient_email:
        return
    subject, text, html = email_render(
        "patient_link",
        {"share": share, "link": reverse("patient_open", kwargs={"token": raw_token})},
    )
    Share.objects.filter(pk=share.pk).update(notify_status=NotifyStatus.QUEUED)
    share.notify_status = NotifyStatus.QUEUED
    task_queue_on_commit(
        "transfers.sharing.tasks.patient_link_email_send", share.pk, subject, text, html
    )
