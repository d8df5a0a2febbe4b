"""Images at rest: every object written to an S3 bucket asks for server-side encryption (SSE-S3
or SSE-KMS), checked against moto's S3 server as a real endpoint; and `check --deploy` warns
when the image store is not encrypted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured
from moto.server import ThreadedMotoServer

from relay.checks import storage_bucket_check, storage_encrypted_check
from relay.storage import s3_storage
from tests.helpers import read_testdata, upload
from transfers.models import Instance

BUCKET = "relay-encrypted"
CREDENTIALS = {"access_key": "relay-test", "secret_key": "relay-test-secret"}


@pytest.fixture
def s3_endpoint(free_tcp_port: int) -> Iterator[tuple[str, Any]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["access_key"],
        aws_secret_access_key=CREDENTIALS["secret_key"],
    )
    s3.create_bucket(Bucket=BUCKET)
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    try:
        yield endpoint, s3
    finally:
        server.stop()


def _use_bucket(settings: Any, endpoint: str, sse: str, kms_key_id: str = "") -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "default": s3_storage(
            bucket=BUCKET,
            endpoint_url=endpoint,
            region="us-east-1",
            sse=sse,
            kms_key_id=kms_key_id,
            **CREDENTIALS,
        ),
    }


@pytest.mark.django_db
@pytest.mark.parametrize(("sse", "kms_key_id"), [("AES256", ""), ("aws:kms", "alias/relay-images")])
def test_every_image_written_to_the_bucket_is_encrypted_at_rest(
    settings, s3_endpoint, client, bob_token, sse, kms_key_id
):
    endpoint, s3 = s3_endpoint
    _use_bucket(settings, endpoint, sse, kms_key_id)
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    head = s3.head_object(Bucket=BUCKET, Key=Instance.objects.get().storage_key)
    assert head["ServerSideEncryption"] == sse
    if kms_key_id:
        assert kms_key_id in head["SSEKMSKeyId"]
    assert storage_encrypted_check() == []


def test_a_bucket_without_encryption_is_a_deployment_warning(settings):
    _use_bucket(settings, "http://127.0.0.1:9", "")
    (warning,) = storage_encrypted_check()
    assert warning.id == "relay.W001"


def test_a_folder_is_a_warning_until_declared_encrypted(settings):
    settings.RELAY_STORAGE_ENCRYPTED = False
    (warning,) = storage_encrypted_check()
    assert warning.id == "relay.W002"
    settings.RELAY_STORAGE_ENCRYPTED = True
    assert storage_encrypted_check() == []


def test_a_misspelt_encryption_setting_stops_the_start(settings):
    with pytest.raises(ImproperlyConfigured):
        s3_storage(bucket=BUCKET, endpoint_url=None, region=None, sse="AES-256", **CREDENTIALS)


def _bucket_named(settings: Any, endpoint: str, bucket: str) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "default": s3_storage(
            bucket=bucket, endpoint_url=endpoint, region="us-east-1", sse="AES256", **CREDENTIALS
        ),
    }


def test_a_missing_or_unreachable_bucket_fails_the_deploy_check(settings, s3_endpoint):
    """Relay does not create its bucket: `check --deploy` says plainly when it is missing or out
    of reach (issue 18: an operator found out from refused uploads)."""
    endpoint, _ = s3_endpoint
    _bucket_named(settings, endpoint, BUCKET)
    assert storage_bucket_check() == []

    _bucket_named(settings, endpoint, "relay-never-made")
    (missing,) = storage_bucket_check()
    assert missing.id == "relay.E002" and "relay-never-made" in missing.msg

    _bucket_named(settings, "http://127.0.0.1:9", BUCKET)  # nothing listens on port 9
    (unreachable,) = storage_bucket_check()
    assert unreachable.id == "relay.E003" and "cannot be reached" in unreachable.msg
