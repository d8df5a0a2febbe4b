"""How the image store is configured: a folder, or an S3-compatible bucket with server-side
encryption, and the deployment check that says when images would sit unencrypted at rest.

The images are PHI. In a bucket, every object Relay writes asks for server-side encryption:
SSE-S3 (`S3_SSE=AES256`) or SSE-KMS (`S3_SSE=aws:kms`, with `S3_SSE_KMS_KEY_ID` naming the key,
or the bucket's default KMS key). In a folder, encryption is the volume's (LUKS, an encrypted
EBS volume...): the operator declares it with `RELAY_STORAGE_ENCRYPTED=1` after setting it up.
`manage.py check --deploy` warns when neither is so (relay/checks.py).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

SSE_CHOICES = ("", "AES256", "aws:kms")


def s3_object_parameters(sse: str, kms_key_id: str = "") -> dict[str, str]:
    """The parameters every upload to the bucket carries for server-side encryption."""
    if sse not in SSE_CHOICES:
        raise ImproperlyConfigured(f"S3_SSE must be one of AES256, aws:kms or empty, not {sse!r}.")
    if kms_key_id and sse != "aws:kms":
        raise ImproperlyConfigured("S3_SSE_KMS_KEY_ID needs S3_SSE=aws:kms.")
    parameters: dict[str, str] = {}
    if sse:
        parameters["ServerSideEncryption"] = sse
    if kms_key_id:
        parameters["SSEKMSKeyId"] = kms_key_id
    return parameters


def s3_storage(
    *,
    bucket: str,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    sse: str,
    kms_key_id: str = "",
) -> dict[str, Any]:
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": bucket,
            "endpoint_url": endpoint_url,
            "region_name": region,
            "access_key": access_key,
            "secret_key": secret_key,
            "default_acl": None,
            "querystring_auth": True,
            "file_overwrite": False,
            "object_parameters": s3_object_parameters(sse, kms_key_id),
        },
    }
