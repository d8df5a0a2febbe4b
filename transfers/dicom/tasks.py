"""Celery task of the PACS push (slow queue)."""

from __future__ import annotations

from celery import Task, shared_task

from ..models import Push
from . import push as pushes


@shared_task(bind=True, max_retries=8, soft_time_limit=3000, time_limit=3600)
def push_run(self: Task, push_id: int) -> str:
    """Send a push's instances; unreachable or busy destinations are retried with backoff."""
    push = Push.objects.filter(pk=push_id).select_related("destination", "requested_by").first()
    if push is None:
        return "gone"
    try:
        pushes.push_send(push=push)
    except pushes.PushTransient as exc:
        if self.request.retries >= (self.max_retries or 0):
            pushes.pushes_give_up(push=push, reason=str(exc))
            return "failed"
        raise self.retry(exc=exc, countdown=min(3600, 30 * 2**self.request.retries)) from exc
    return push.status
