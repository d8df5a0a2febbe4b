"""Celery tasks of transfers."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from .models import Study, StudyStatus


@shared_task(soft_time_limit=120, time_limit=180)
def studies_complete_quiet() -> int:
    """A study that has received nothing for the quiet period is complete.

    One conditional UPDATE: safe to run twice or on two beats at once.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.RELAY_STUDY_QUIET_SECONDS)
    return Study.objects.filter(status=StudyStatus.RECEIVING, last_received_at__lte=cutoff).update(
        status=StudyStatus.COMPLETE, completed_at=timezone.now()
    )
