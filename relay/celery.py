"""The Celery application: JSON only, explicit time limits, slow and quick queues."""

from __future__ import annotations

import os

from celery import Celery
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from celery.signals import beat_init, celeryd_init, worker_process_init
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
