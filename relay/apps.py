"""The project package as an app, so that its management commands are found; it has no models."""

from __future__ import annotations

from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relay"
    verbose_name = "Relay"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the deployment checks)
