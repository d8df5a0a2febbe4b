"""Images in an S3-compatible bucket (production's STORAGES), through django-storages.

The bucket is moto's S3 server on loopback: a real HTTP S3 endpoint that boto3 talks to exactly
as it would to a cloud or on-premises object store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.helpers import dicom_bytes, read_testdata, upload
from tests.transfers.test_api_upload import _refuse_instance_rows
from transfers.models import Instance

pytestmark = pytest.mark.django_db

BUCKET = "relay-images"


@pytest.fixture
def bucket(settings: Any, free_tcp_port: int) -> Iterator[Any]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    credentials = {"aws_access_key_id": "relay-test", "aws_secret_access_key": "relay-test-secret"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)
    s3.create_bucket(Bucket=BUCKET)
    # moto keeps its buckets in the process, not in the server: start every test from empty.
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "endpoint_url": endpoint,
                "region_name": "us-east-1",
                "access_key": credentials["aws_access_key_id"],
                "secret_key": credentials["aws_secret_access_key"],
                "file_overwrite": False,
                "default_acl": None,
            },
        },
    }
    try:
        yield s3
    finally:
        server.stop()


def _keys(s3: Any) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_it_stores_images_in_the_bucket(client, bob_token, bucket):
    data = bytearray(read_testdata("CT_small.dcm"))
    data[:2] = b"MZ"
    assert upload(client, bytes(data), token=bob_token).status_code == 201
    instance = Instance.objects.get()
    assert _keys(bucket) == [instance.storage_key]
    stored = bucket.get_object(Bucket=BUCKET, Key=instance.storage_key)["Body"].read()
    assert stored == bytes(128) + bytes(data[128:])


def test_duplicates_and_conflicts_add_nothing_to_the_bucket(client, bob_token, bucket):
    first = dicom_bytes("CT_small.dcm", SOPInstanceUID="1.2.3.4.5")
    assert upload(client, first, token=bob_token).status_code == 201
    keys = _keys(bucket)
    assert upload(client, first, token=bob_token).status_code == 200
    other = dicom_bytes("CT_small.dcm", SOPInstanceUID="1.2.3.4.5", PatientName="OTHER^ONE")
    assert upload(client, other, token=bob_token).status_code == 409
    assert _keys(bucket) == keys


def test_an_object_whose_rows_fail_is_removed_from_the_bucket(client, bob_token, bucket):
    assert upload(client, read_testdata("MR_small.dcm"), token=bob_token).status_code == 201
    keys = _keys(bucket)
    _refuse_instance_rows()
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 503
    assert _keys(bucket) == keys


def test_an_unreachable_bucket_answers_503(
    client, bob_token, bucket, settings, free_tcp_port_factory
):
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            **settings.STORAGES["default"],
            "OPTIONS": {
                **settings.STORAGES["default"]["OPTIONS"],
                "endpoint_url": f"http://127.0.0.1:{free_tcp_port_factory()}",
            },
        },
    }
    response = upload(client, read_testdata("CT_small.dcm"), token=bob_token)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert Instance.objects.count() == 0
