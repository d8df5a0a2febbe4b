"""The Celery app: every task is routed to the queue its work belongs in, and every task that
beat schedules exists (a task moved to another module changes its name)."""

from __future__ import annotations

import pytest

from relay.celery import app

EXPECTED_QUEUES = {
    "transfers.tasks.studies_complete_quiet": "quick",
    "transfers.tasks.purge_expired": "slow",
    "transfers.sharing.tasks.share_notify": "quick",
    "transfers.sharing.tasks.shares_expire": "quick",
    "transfers.sharing.tasks.shares_warn_expiring": "quick",
    "transfers.viewer.tasks.study_render_task": "render",
    "transfers.dicom.tasks.push_run": "slow",
    "transfers.media.tasks.media_build_task": "slow",
    "transfers.reconcile.tasks.study_reconcile_task": "slow",
    "portal.tasks.email_send": "quick",
    "billing.tasks.invoice_previous_month": "quick",
}


def _registered() -> set[str]:
    app.loader.import_default_modules()  # what a worker imports when it starts
    return {name for name in app.tasks if not name.startswith("celery.")}


def test_every_task_is_known_and_routed_to_its_queue() -> None:
    registered = _registered()
    assert registered >= set(EXPECTED_QUEUES)
    for name, queue in EXPECTED_QUEUES.items():
        route = app.amqp.router.route({}, name, args=(), kwargs={})
        assert route["queue"].name == queue, name


@pytest.mark.parametrize("entry", sorted(app.conf.beat_schedule))
def test_every_scheduled_task_exists(entry: str) -> None:
    assert app.conf.beat_schedule[entry]["task"] in _registered()
