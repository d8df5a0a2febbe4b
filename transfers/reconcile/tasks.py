"""Celery task of patient reconciliation (slow queue)."""

from __future__ import annotations

from celery import Task, shared_task

from ..models import Study
from . import services


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=3,
    soft_time_limit=3000,
    time_limit=3600,
)
def study_reconcile_task(
    self: Task, study_id: int, patient_id: str, patient_name: str, issuer: str
) -> int:
    """Rewrite the study's stored copies with the local patient identity (restartable: a
    worker lost midway hands it to another, copies already rewritten are skipped)."""
    study = Study.objects.filter(pk=study_id).first()
    if study is None:
        return 0
    identity = services.Identity(patient_id, patient_name, issuer)
    try:
        return services.study_reconcile(study=study, identity=identity)
    except Exception as exc:
        if self.request.retries < (self.max_retries or 0):
            raise self.retry(exc=exc, countdown=60 * 2**self.request.retries) from exc
        # Given up: the study is released (sharing and pushing work again) and the failure is
        # on the record; starting the reconciliation again finishes the copies not yet done.
        services.study_reconcile_abandon(study=study, reason=f"{type(exc).__name__}: {exc}")
        raise
