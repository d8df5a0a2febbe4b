"""App config for accounts, facilities and the audit trail."""

from __future__ import annotations

from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Accounts, facilities and audit"

    def ready(self) -> None:
        # Django reports logins, logouts and failed logins only through signals; the receivers
        # write audit events and nothing else.
        # Lockouts, second factors and single sign-on report through django-axes' and
        # django-allauth's signals; their receivers live beside the code they belong to.
        from . import (  # noqa: F401
            audit,  # noqa: F401
            lockout,
            second_factor,
            sso,
        )
