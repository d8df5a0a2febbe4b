"""Deployment checks of Relay's own (`manage.py check --deploy`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register


@register(Tags.security, deploy=True)
def storage_encrypted_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    default = settings.STORAGES["default"]
    if default["BACKEND"].endswith("S3Storage"):
        parameters = default.get("OPTIONS", {}).get("object_parameters") or {}
        if parameters.get("ServerSideEncryption"):
            return []
        return [
            Warning(
                "Images are written to the bucket without server-side encryption.",
                hint="Set S3_SSE=AES256 (SSE-S3) or S3_SSE=aws:kms with S3_SSE_KMS_KEY_ID.",
                id="relay.W001",
            )
        ]
    if getattr(settings, "RELAY_STORAGE_ENCRYPTED", False):
        return []
    return [
        Warning(
            "Images are kept in a folder that is not declared encrypted.",
            hint="Put MEDIA_ROOT on an encrypted volume, then set RELAY_STORAGE_ENCRYPTED=1 "
            "(README: Encryption at rest).",
            id="relay.W002",
        )
    ]


# Backends that deliver nothing to anyone outside the server.
NOT_DELIVERED = (
    "portal.mail.UndeliverableEmailBackend",
    "portal.mail.PrivateFileEmailBackend",
    "django.core.mail.backends.filebased.EmailBackend",
    "django.core.mail.backends.console.EmailBackend",
    "django.core.mail.backends.locmem.EmailBackend",
    "django.core.mail.backends.dummy.EmailBackend",
)


@register(Tags.security, deploy=True)
def email_delivered_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if settings.EMAIL_BACKEND not in NOT_DELIVERED:
        return []
    return [
        Error(
            "E-mail is not sent to anyone: share notices, invitations and password resets would "
            "fail (or stay in files on the server).",
            hint="Set EMAIL_HOST (and EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, DEFAULT_FROM_EMAIL) "
            "to your SMTP server (README: Configuration).",
            id="relay.E001",
        )
    ]
