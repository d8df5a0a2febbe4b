"""Quick Celery tasks of the portal: sending e-mail, expiring invitations, and the audit trail's
feed to the SIEM."""

from __future__ import annotations

from celery import shared_task
from django.core.mail import EmailMultiAlternatives
from django.utils import timezone

from .metrics import EMAIL_FAILURES, EMAILS_SENT
from .models import Invitation
from .siem import audit_forward


@shared_task(
    autoretry_for=(OSError,),
    retry_backoff=30,
    retry_backoff_max=3600,
    max_retries=8,
    soft_time_limit=60,
    time_limit=90,
)
def email_send(*, to: str, subject: str, text: str, html: str) -> None:
    message = EmailMultiAlternatives(subject=subject, body=text, to=[to])
    message.attach_alternative(html, "text/html")
    try:
        message.send()
    except Exception as exc:
        # Each failed attempt (an OSError is retried with backoff; MailNotConfigured is not).
        EMAIL_FAILURES.labels(error=type(exc).__name__).inc()
        raise
    EMAILS_SENT.inc()


@shared_task(soft_time_limit=60, time_limit=90)
def invitations_expire() -> int:
    """Expired invitations stay for the record; this only marks them so lists stay short."""
    return Invitation.objects.filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__lt=timezone.now()
    ).update(revoked_at=timezone.now())


@shared_task(soft_time_limit=120, time_limit=150)
def audit_forward_task(batch: int = 500, rounds: int = 20) -> int:
    """Sends the audit trail to the SIEM, batch after batch while a full batch went out.

    Beat runs it every few seconds, which is the retry: the cursor, not Celery, remembers what is
    still to send, so a collector that is down costs a warning per run and loses nothing.
    """
    sent = 0
    for _ in range(rounds):
        try:
            count = audit_forward(batch=batch)
        except OSError:
            return sent  # audit_forward logged why; the next run starts from the cursor
        sent += count
        if count < batch:
            break
    return sent
