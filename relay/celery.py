"""The Celery application: JSON only, explicit time limits, slow and quick queues; its workers'
task failures and retries counted for /metrics (portal/metrics.py)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from celery.signals import (
    beat_init,
    celeryd_init,
    task_failure,
    task_retry,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from kombu import Exchange, Queue

from .embedded import var_prepare
from .env import var_dir

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "relay.settings")

app = Celery("relay")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=300,
    task_time_limit=360,
    broker_connection_retry_on_startup=True,
    # beat's record of when each entry last ran: in the var folder, not in the folder it was
    # started from (a checkout, or / under systemd). Run exactly one beat per installation.
    beat_schedule_filename=str(var_dir() / "celerybeat-schedule"),
    beat_scheduler="relay.celery:VarScheduler",
    task_default_queue="quick",
    task_queues=[
        Queue(name, Exchange(name), routing_key=name) for name in ("quick", "slow", "render")
    ],
    task_default_exchange="quick",
    # Every task is routed by name here (Celery 6 drops the per-task queue option). Quick work
    # (e-mail, bookkeeping) never waits behind slow work (rendering, export, push).
    task_routes={
        "portal.tasks.*": {"queue": "quick"},
        "billing.tasks.*": {"queue": "quick"},
        "transfers.tasks.purge_expired": {"queue": "slow"},
        "transfers.tasks.storage_verify_task": {"queue": "slow"},
        "transfers.dicom.tasks.*": {"queue": "slow"},
        "transfers.media.tasks.*": {"queue": "slow"},
        "transfers.reconcile.tasks.*": {"queue": "slow"},
        "transfers.deidentify.tasks.*": {"queue": "slow"},
        "transfers.viewer.tasks.*": {"queue": "render"},
        "transfers.*": {"queue": "quick"},
    },
    task_default_routing_key="quick",
    beat_schedule={
        # The audit trail to the SIEM; the cursor, not Celery, remembers what is left to send.
        "audit-forward-syslog": {
            "task": "portal.tasks.audit_forward_task",
            "schedule": 15.0,
            "options": {"expires": 14},
        },
        # The nightly scrub: every stored object read and checked against its SHA-256.
        "storage-verify": {
            "task": "transfers.tasks.storage_verify_task",
            "schedule": crontab(hour=2, minute=40),
        },
        "studies-complete-after-quiet-period": {
            "task": "transfers.tasks.studies_complete_quiet",
            "schedule": 60.0,
        },
        "shares-expire": {
            "task": "transfers.sharing.tasks.shares_expire",
            "schedule": crontab(minute="*/15"),
        },
        "shares-warn-expiring": {
            "task": "transfers.sharing.tasks.shares_warn_expiring",
            "schedule": crontab(minute=23),
        },
        "purge-expired": {
            "task": "transfers.tasks.purge_expired",
            "schedule": crontab(hour=3, minute=30),
        },
        # The 1st to the 3rd: invoicing is idempotent, so the later runs only catch a missed or
        # killed first run (and a Celery time zone ahead of the billing one).
        "invoice-previous-month": {
            "task": "billing.tasks.invoice_previous_month",
            "schedule": crontab(minute=15, hour=3, day_of_month="1-3"),
        },
        "invitations-expire": {
            "task": "portal.tasks.invitations_expire",
            "schedule": crontab(minute=17),
        },
    },
    timezone=os.environ.get("TIME_ZONE", "America/Denver"),
)
# Each app's tasks.py; transfers' feature packages keep their tasks beside their services and
# TransfersConfig.ready() registers them.
app.autodiscover_tasks()


class VarScheduler(PersistentScheduler):
    """Celery's file-backed scheduler, whose folder (the var folder) exists before it opens the
    file: beat reads its schedule for the start-up banner, before beat_init."""

    def setup_schedule(self) -> None:
        var_prepare()
        super().setup_schedule()


@celeryd_init.connect
@beat_init.connect
def _embedded_folders(**_: object) -> None:
    """The embedded broker's folder exists (and a file broker's leftovers are moved into it)
    before the worker or beat reads it."""
    var_prepare()


@worker_process_init.connect
def _worker_memory_cap(**_: object) -> None:
    """Each worker process caps its own memory when RELAY_WORKER_MEMORY_MB is set (the render
    worker of `make run` and of production sets it; see transfers.viewer.tasks)."""
    from transfers.viewer.tasks import worker_memory_cap_from_settings

    worker_memory_cap_from_settings()


@celeryd_init.connect
def _metrics_files(sender: str | None = None, **_: object) -> None:
    """The worker's processes count into the node's metrics folder under a role of their own
    (the node name: a quick and a render worker on one machine keep apart), wiped when the
    worker starts; before the pool forks (portal/metrics.py)."""
    from django.conf import settings

    from portal.metrics import metrics_process_start

    metrics_process_start(f"worker.{sender or 'celery'}", settings.RELAY_METRICS_DIR)


@worker_ready.connect
def _metrics_exporter(**_: object) -> None:
    """On a node without a web server, the node's metrics on RELAY_METRICS_PORT; started once
    the pool has forked, so that no pool process inherits the thread."""
    from django.conf import settings

    from portal.metrics import metrics_exporter_start

    if settings.RELAY_METRICS_PORT:
        metrics_exporter_start(bind=settings.RELAY_METRICS_BIND, port=settings.RELAY_METRICS_PORT)


@worker_process_shutdown.connect
def _metrics_process_gone(pid: int | None = None, **_: object) -> None:
    from portal.metrics import metrics_process_dead

    if pid:
        metrics_process_dead(pid)


@task_failure.connect
def _task_failed(sender: Any = None, **_: object) -> None:
    """A task that raised and will not run again (a retry is counted by _task_retried)."""
    from portal.metrics import TASK_FAILURES

    TASK_FAILURES.labels(task=getattr(sender, "name", None) or "unknown").inc()


@task_retry.connect
def _task_retried(sender: Any = None, **_: object) -> None:
    from portal.metrics import TASK_RETRIES

    TASK_RETRIES.labels(task=getattr(sender, "name", None) or "unknown").inc()
