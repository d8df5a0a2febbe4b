"""App config for accounts, facilities and the audit trail."""

from __future__ import annotations

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Accounts, facilities and audit"

    def ready(self) -> None:
        # Django reports logins, logouts and failed logins only through signals; the receivers
        # write audit events and nothing else.
        from . import audit  # noqa: F401
