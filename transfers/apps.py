"""App config of transfers: studies and everything that moves them."""

from __future__ import annotations

from django.apps import AppConfig


class TransfersConfig(AppConfig):
    name = "transfers"

    def ready(self) -> None:
        # Each feature package keeps its Celery tasks beside the services they wrap, and services
        # queue them by name (transfers.queue), so every process registers all of them here:
        # Celery's autodiscovery looks only for each app's top-level tasks module.
        from . import tasks  # noqa: F401
        from .deidentify import tasks as deidentify_tasks  # noqa: F401
        from .dicom import tasks as dicom_tasks  # noqa: F401
        from .media import tasks as media_tasks  # noqa: F401
        from .reconcile import tasks as reconcile_tasks  # noqa: F401
        from .sharing import tasks as sharing_tasks  # noqa: F401
        from .viewer import tasks as viewer_tasks  # noqa: F401
