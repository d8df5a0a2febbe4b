"""Celery task of the PACS push (slow queue)."""

from __future__ import annotations

from celery import Task, shared_task

from ..models import Push, PushStatus
from . import push as pushes


@shared_task(bind=True, max_retries=pushes.PUSH_RETRIES, soft_time_limit=3000, time_limit=3600)
def push_run(self: Task, push_id: int) -> str:
    """Send a push's instances; unreachable or busy destinations are retried with backoff.
    A push cancelled while it waited is left alone, whichever attempt this is."""
    push = Push.objects.filter(pk=push_id).select_related("destination", "requested_by").first()
    if push is None:
        return "gone"
    if push.status == PushStatus.CANCELLED:
        return "cancelled"
    try:
        pushes.push_send(push=push)
    except pushes.PushTransient as exc:
        retries = self.request.retries
        if retries >= (self.max_retries or 0):
            pushes.pushes_give_up(push=push, reason=str(exc))
            return "failed"
        if not pushes.push_retry_schedule(push=push, retries=retries):
            return "cancelled"
        raise self.retry(exc=exc, countdown=pushes.push_retry_delay(retries)) from exc
    return push.status
