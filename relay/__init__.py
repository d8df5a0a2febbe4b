"""Relay's project package: settings, URLs, the Celery app, the WSGI entry point, and the
commands that run the embedded default (`run_embedded`, `seed_demo`). The apps are `portal`
(accounts, facilities, audit), `transfers` (studies and everything that moves them) and `billing`.
"""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ["celery_app"]
