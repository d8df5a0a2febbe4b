"""Queueing Celery work from a service, by the task's name, once the transaction commits.

A task module imports the service it wraps; a service that imported its task back would close an
import cycle (as the old `transfers.tasks` hub did). So services name the task instead, as
Zulip's `queue_event_on_commit` names a queue. `tests/test_architecture.py` checks that every
name given here is a registered task.
"""

from __future__ import annotations

from typing import Any

from celery import current_app
from django.db import transaction


def task_queue_on_commit(name: str, *args: Any) -> None:
    """Send task `name` with `args` (JSON values: ids, strings) after the current transaction
    commits; at once outside one. Nothing is sent for a transaction that rolls back."""

    def send() -> None:
        # The registry is filled by the Celery app's autodiscovery the first time it is read.
        current_app.tasks[name].delay(*args)

    transaction.on_commit(send)
