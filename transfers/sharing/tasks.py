"""Celery tasks of sharing: the recipients' e-mails (shared, images added), and the shares'
expiry receipts and warnings."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from . import expiry, notify

# E-mail tasks: an SMTP failure is retried with backoff for about four hours (10 tries, at most an
# hour apart), each try under two minutes.
MAIL_TASK: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (OSError,),
    "retry_backoff": 30,
    "retry_backoff_max": 3600,
    "max_retries": 10,
    "soft_time_limit": 120,
    "time_limit": 180,
}


@shared_task(**MAIL_TASK)
def share_notify(self: Task, share_id: int) -> str:
    """E-mail the recipients of a share. Safe to run twice: a share already notified is skipped.

    An SMTP failure is recorded on the share (the Sent page shows it) and retried with backoff.
    """
    try:
        return notify.share_notify_send(share_id=share_id)
    except OSError as exc:
        notify.share_notify_failed(
            share_id=share_id, error=exc, final=self.request.retries >= (self.max_retries or 0)
        )
        raise


@shared_task(**MAIL_TASK)
def share_notify_added(self: Task, share_id: int) -> str:
    """Tell the recipients of a notified share that images were added. Safe to run twice: the
    count told is claimed before sending, so a second run finds nothing new."""
    try:
        return notify.share_notify_added_send(share_id=share_id)
    except OSError as exc:
        notify.share_notify_added_failed(
            share_id=share_id, error=exc, final=self.request.retries >= (self.max_retries or 0)
        )
        raise


@shared_task(**MAIL_TASK)
def patient_link_email_send(self: Task, share_id: int, subject: str, text: str, html: str) -> str:
    """Send a patient their link's e-mail (rendered in the request that made the token) and
    record it on the share: the Sent page shows sent, or failed and retrying."""
    try:
        return notify.patient_link_email_deliver(
            share_id=share_id, subject=subject, text=text, html=html
        )
    except OSError as exc:
        notify.share_notify_failed(
            share_id=share_id, error=exc, final=self.request.retries >= (self.max_retries or 0)
        )
        raise


@shared_task(soft_time_limit=120, time_limit=180)
def shares_expire() -> int:
    """Mark lapsed shares EXPIRED on their timelines (the sender's receipt)."""
    return expiry.shares_mark_expired()


@shared_task(soft_time_limit=120, time_limit=180)
def shares_warn_expiring() -> int:
    """E-mail senders a few days before a share lapses."""
    return expiry.shares_warn_expiring(days=3)
