"""Celery tasks of the rendering pipeline (queue "render")."""

from __future__ import annotations
