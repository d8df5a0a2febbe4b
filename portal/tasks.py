"""Quick Celery tasks of the portal: sending e-mail and expiring invitations."""

from __future__ import annotations

from celery import shared_task
from django.core.mail import EmailMultiAlternatives
from django.utils import timezone

from .models import Invitation


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
    message.send()


@shared_task(soft_time_limit=60, time_limit=90)
def invitations_expire() -> int:
    """Expired invitations stay for the record; this only marks them so lists stay short."""
    return Invitation.objects.filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__lt=timezone.now()
    ).update(revoked_at=timezone.now())
