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


@register(Tags.security, deploy=True)
def storage_bucket_check(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The image bucket exists and this process can reach it: Relay does not create it (its
    versioning, encryption and lifecycle are the operator's), and an upload into a missing
    bucket can only be refused."""
    if not settings.STORAGES["default"]["BACKEND"].endswith("S3Storage"):
        return []
    from botocore.exceptions import BotoCoreError, ClientError
    from django.core.files.storage import storages

    storage: Any = storages["default"]
    name = storage.bucket_name
    try:
        storage.connection.meta.client.head_bucket(Bucket=name)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return [
                Error(
                    f"The image bucket '{name}' does not exist.",
                    hint="Create it (with versioning and default encryption) before starting "
                    "Relay, or correct S3_BUCKET / S3_ENDPOINT_URL.",
                    id="relay.E002",
                )
            ]
        return [
            Error(
                f"The image bucket '{name}' refused this server ({code}).",
                hint="Check the credentials (S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY) and the "
                "bucket's policy.",
                id="relay.E003",
            )
        ]
    except BotoCoreError as exc:
        return [
            Error(
                f"The image bucket '{name}' cannot be reached: {exc}",
                hint="Check S3_ENDPOINT_URL and the network.",
                id="relay.E003",
            )
        ]
    return []
