"""App config for studies and transfers."""

from __future__ import annotations

from django.apps import AppConfig


class TransfersConfig(AppConfig):
    name = "transfers"
