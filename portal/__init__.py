"""Relay's project package: settings, URLs, the Celery app, and accounts, facilities and audit."""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ["celery_app"]
