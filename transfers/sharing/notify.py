"""E-mail to the recipients of a share. It carries no patient information (not the name, the ID
or the study description): only the sending facility, the sender's message and a link that
leads through sign-in to the share."""

from __future__ import annotations

from django.core.mail import EmailMultiAlternatives, get_connection
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

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
    recipients = share_recipients(share)
    link = reverse("share_detail", args=[share.uuid])
    subject, text, html = email_render("share_notify", {"share": share, "link": link})
    messages = []
    for address in recipients:
        message = EmailMultiAlternatives(subject=subject, body=text, to=[address])
        message.attach_alternative(html, "text/html")
        messages.append(message)
    # One connection for all: if the server is down, none was sent and the retry sends all.
    with get_connection() as connection:
        connection.send_messages(messages)
    with transaction.atomic():
        Share.objects.filter(pk=share.pk).update(
            notify_status=NotifyStatus.SENT,
            notified_at=timezone.now(),
            notify_error="",
            notify_attempts=share.notify_attempts + 1,
        )
        ShareEvent.objects.create(
            share=share,
            kind=ShareEventKind.NOTIFIED,
            detail=f"e-mailed {len(recipients)} recipient(s)",
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
