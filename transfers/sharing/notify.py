"""E-mail to the recipients of a share. It carries no patient information (not the name, the ID
or the study description): only the sending facility, the sender's message and a link that
leads through sign-in to the share.

Images that arrive after the first notice (a late series from the modality, a resend with
more) are told once they settle, as "N new images added", without the sender's message."""

from __future__ import annotations

from django.core.mail import EmailMultiAlternatives, get_connection
from django.db import transaction
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from portal.crypto import secret_decrypt
from portal.emails import email_render
from portal.models import Membership

from ..models import NotifyStatus, Share, ShareEvent, ShareEventKind, ShareKind, StudyStatus

# Queued, or failed and waiting for the task's retry.
NOTIFY_PENDING = (NotifyStatus.QUEUED, NotifyStatus.FAILED)


def share_recipients(share: Share) -> list[str]:
    if share.kind == ShareKind.FACILITY:
        return sorted(
            set(
                Membership.objects.filter(
                    facility=share.recipient_facility, user__is_active=True
                ).values_list("user__email", flat=True)
            )
        )
    return [share.recipient_email] if share.recipient_email else []


def share_instance_count(share: Share) -> int:
    """The images of the share's studies now."""
    return share.studies.aggregate(n=Sum("num_instances"))["n"] or 0


def guest_link_path(share: Share) -> str:
    """The path of a share's guest link, its token decrypted for the e-mail."""
    return reverse("guest_open", kwargs={"token": secret_decrypt(share.link_token_encrypted)})


def _send(share: Share, template: str, **context: object) -> list[str]:
    """E-mail every recipient of the share; returns the addresses. Raises OSError when the
    mail server fails, before any was sent (one connection for all)."""
    recipients = share_recipients(share)
    # A physician without an account gets the guest link (opened with an e-mailed code); everyone
    # else the share's page behind sign-in.
    link = (
        guest_link_path(share)
        if share.is_guest_link
        else reverse("share_detail", args=[share.uuid])
    )
    subject, text, html = email_render(template, {"share": share, "link": link, **context})
    messages = []
    for address in recipients:
        message = EmailMultiAlternatives(subject=subject, body=text, to=[address])
        message.attach_alternative(html, "text/html")
        messages.append(message)
    # One connection for all: if the server is down, none was sent and the retry sends all.
    with get_connection() as connection:
        connection.send_messages(messages)
    return recipients


def share_notify_send(*, share_id: int) -> str:
    share = Share.objects.select_related("facility", "created_by").filter(pk=share_id).first()
    if share is None or share.notify_status in (NotifyStatus.SENT, NotifyStatus.NONE):
        return "skipped"
    if not share.is_active:
        Share.objects.filter(pk=share.pk).update(notify_status=NotifyStatus.NONE)
        return "inactive"
    if share.studies.exclude(status=StudyStatus.COMPLETE).exists():
        # More images arrived since it was queued (a retry can come hours later): the
        # recipient is told when the study is complete again.
        Share.objects.filter(pk=share.pk, notify_status__in=NOTIFY_PENDING).update(
            notify_status=NotifyStatus.WAITING
        )
        return "waiting"
    # Counted before sending: an image arriving meanwhile is told later as one added.
    told = share_instance_count(share)
    recipients = _send(share, "share_notify")
    with transaction.atomic():
        Share.objects.filter(pk=share.pk).update(
            notify_status=NotifyStatus.SENT,
            notified_at=timezone.now(),
            notified_instances=told,
            notify_error="",
            notify_attempts=share.notify_attempts + 1,
        )
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.NOTIFIED,
            detail=f"e-mailed {len(recipients)} recipient(s)",
        )
    return "sent"


def patient_link_email_deliver(*, share_id: int, subject: str, text: str, html: str) -> str:
    """Send the patient's link e-mail; a receipt on the timeline. Raises OSError when the mail
    server fails (the task retries)."""
    share = Share.objects.filter(pk=share_id).first()
    if share is None or not share.recipient_email or share.notify_status == NotifyStatus.SENT:
        return "skipped"
    if not share.is_active:
        Share.objects.filter(pk=share.pk).update(notify_status=NotifyStatus.NONE)
        return "inactive"
    message = EmailMultiAlternatives(subject=subject, body=text, to=[share.recipient_email])
    message.attach_alternative(html, "text/html")
    with get_connection() as connection:
        connection.send_messages([message])
    with transaction.atomic():
        Share.objects.filter(pk=share.pk).update(
            notify_status=NotifyStatus.SENT,
            notified_at=timezone.now(),
            notify_error="",
            notify_attempts=share.notify_attempts + 1,
        )
        ShareEvent.objects.create(
            share=share, kind=ShareEventKind.NOTIFIED, detail="e-mailed the link to the patient"
        )
    return "sent"


def share_notify_failed(*, share_id: int, error: BaseException, final: bool) -> None:
    text = f"{type(error).__name__}: {error}"[:300]
    with transaction.atomic():
        share = Share.objects.select_for_update().filter(pk=share_id).first()
        if share is None:
            return
        share.notify_status = NotifyStatus.FAILED
        share.notify_attempts += 1
        share.notify_error = text + ("" if not final else " (gave up)")
        share.save(update_fields=["notify_status", "notify_attempts", "notify_error"])
        ShareEvent.objects.create(share=share, kind=ShareEventKind.NOTIFY_FAILED, detail=text)


def share_notify_added_send(*, share_id: int) -> str:
    """Tell the recipients of a share already notified that images were added to its studies,
    once those have settled (every study of the share complete again): one e-mail and one
    timeline entry per batch, with the count. Safe to run twice: the count told is claimed
    under the share's row lock before sending, and given back if the mail server fails."""
    share = Share.objects.select_related("facility", "created_by").filter(pk=share_id).first()
    if share is None or share.notify_status != NotifyStatus.SENT or share.kind == ShareKind.PATIENT:
        # Not told the first time yet (or never by e-mail: patient links): the first notice
        # carries every image.
        return "skipped"
    if not share.is_active:
        return "inactive"
    studies = share.studies.all()
    if any(s.purged_at is not None for s in studies):
        return "skipped"
    if any(s.status != StudyStatus.COMPLETE for s in studies):
        # Still arriving: the completion that settles them queues this again.
        return "waiting"
    total = sum(s.num_instances for s in studies)
    with transaction.atomic():
        told = (
            Share.objects.select_for_update()
            .filter(pk=share.pk)
            .values_list("notified_instances", flat=True)
            .get()
        )
        if total <= told:
            return "nothing new"
        Share.objects.filter(pk=share.pk).update(notified_instances=total)
    added = total - told
    try:
        recipients = _send(share, "share_images_added", added=added)
    except OSError:
        # Not sent: the retry tells these images again (unless a later batch took the count).
        Share.objects.filter(pk=share.pk, notified_instances=total).update(notified_instances=told)
        raise
    ShareEvent.objects.create(
        share=share,
        kind=ShareEventKind.UPDATED,
        detail=(
            f"{added} new image{'s' if added != 1 else ''} added; "
            f"e-mailed {len(recipients)} recipient(s)"
        ),
    )
    return "sent"


def share_notify_added_failed(*, share_id: int, error: BaseException, final: bool) -> None:
    """The 'images added' e-mail failed: a receipt on the timeline. The share's first notice
    stays SENT (its recipients were told of the share and can open it)."""
    text = f"images added: {type(error).__name__}: {error}"[:280]
    if Share.objects.filter(pk=share_id).exists():
        ShareEvent.objects.create(
            share_id=share_id,
            kind=ShareEventKind.NOTIFY_FAILED,
            detail=text + ("" if not final else " (gave up)"),
        )
