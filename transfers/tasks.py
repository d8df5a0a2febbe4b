"""Celery tasks of transfers."""

from __future__ import annotations

from datetime import timedelta

from celery import Task, shared_task
from django.conf import settings
from django.utils import timezone

# render_tasks: the rendering tasks live in their own module (and queue); importing it here
# also registers them with Celery's autodiscovery of tasks.py.
from . import media, notify, pacs, purge, reconcile, render_tasks
from .models import MediaExport, Push, Study, StudyStatus
from .routing import routing_apply
from .sharing import shares_notify_completed


@shared_task(soft_time_limit=120, time_limit=180)
def studies_complete_quiet() -> int:
    """A study that has received nothing for the quiet period is complete.

    One conditional UPDATE: safe to run twice or on two beats at once.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.RELAY_STUDY_QUIET_SECONDS)
    quiet = list(
        Study.objects.filter(
            status=StudyStatus.RECEIVING, last_received_at__lte=cutoff
        ).values_list("pk", flat=True)
    )
    # The cutoff again in the update: an instance that arrived since the list was read keeps
    # its study receiving.
    completed = Study.objects.filter(
        pk__in=quiet, status=StudyStatus.RECEIVING, last_received_at__lte=cutoff
    ).update(status=StudyStatus.COMPLETE, completed_at=timezone.now())
    for study in Study.objects.filter(pk__in=quiet, status=StudyStatus.COMPLETE):
        # Every frame made ready for the viewer, in the render queue.
        render_tasks.study_render_queue(study)
        # Studies from a PACS are shared by their facility's routing rules (once per rule).
        if study.received_from_ae:
            routing_apply(study=study)
    # Shares made while their studies were still arriving are notified now.
    shares_notify_completed()
    return completed


@shared_task(
    bind=True,
    autoretry_for=(OSError,),
    retry_backoff=30,
    retry_backoff_max=3600,
    max_retries=10,
    soft_time_limit=120,
    time_limit=180,
)
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


@shared_task(soft_time_limit=120, time_limit=180)
def shares_expire() -> int:
    """Mark lapsed shares EXPIRED on their timelines (the sender's receipt)."""
    return purge.shares_mark_expired()


@shared_task(soft_time_limit=120, time_limit=180)
def shares_warn_expiring() -> int:
    """E-mail senders a few days before a share lapses."""
    return purge.shares_warn_expiring(days=3)


@shared_task(acks_late=True, reject_on_worker_lost=True, soft_time_limit=3300, time_limit=3600)
def purge_expired() -> dict[str, int]:
    """Daily: delete the images of studies whose shares have all lapsed, past retention."""
    result = purge.purge_expired()
    return {
        "studies": result.studies_purged,
        "bytes": result.bytes_freed,
        "objects": result.objects_deleted,
        "failed": len(result.failed),
    }


@shared_task(bind=True, max_retries=8, soft_time_limit=3000, time_limit=3600)
def push_run(self: Task, push_id: int) -> str:
    """Send a push's instances; unreachable or busy destinations are retried with backoff."""
    push = Push.objects.filter(pk=push_id).select_related("destination", "requested_by").first()
    if push is None:
        return "gone"
    try:
        pacs.push_send(push=push)
    except pacs.PushTransient as exc:
        if self.request.retries >= (self.max_retries or 0):
            pacs.pushes_give_up(push=push, reason=str(exc))
            return "failed"
        raise self.retry(exc=exc, countdown=min(3600, 30 * 2**self.request.retries)) from exc
    return push.status


@shared_task(soft_time_limit=3000, time_limit=3600)
def media_build_task(export_id: int) -> str:
    """Build a disc image (slow queue); running it twice builds once."""
    export = MediaExport.objects.filter(pk=export_id).select_related("study__facility").first()
    if export is None:
        return "gone"
    return media.media_build(export=export).status


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
    identity = reconcile.Identity(patient_id, patient_name, issuer)
    try:
        return reconcile.study_reconcile(study=study, identity=identity)
    except Exception as exc:
        if self.request.retries < (self.max_retries or 0):
            raise self.retry(exc=exc, countdown=60 * 2**self.request.retries) from exc
        # Given up: the study is released (sharing and pushing work again) and the failure is
        # on the record; starting the reconciliation again finishes the copies not yet done.
        reconcile.study_reconcile_abandon(study=study, reason=f"{type(exc).__name__}: {exc}")
        raise
