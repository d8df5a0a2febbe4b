"""What a frame, a thumbnail and a stored image cost in requests to an S3 bucket (issue 18: every
frame or thumbnail read on S3 cost three HEADs and a GET).

The bucket is moto's S3 server on loopback behind Relay's own bucket storage
(relay.s3.AtomicS3Storage, as production configures it: relay.storage.s3_storage). Every HTTP
request the storage's boto3 client makes is written down from botocore's events, with its
operation and status, so each test says exactly what a read costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from django.core.files.storage import storages
from moto.server import ThreadedMotoServer

from relay.storage import AtomicFileSystemStorage, s3_storage
from tests.helpers import client_for, dicom_bytes, upload
from transfers import integrity
from transfers.models import Instance, Series, Study
from transfers.viewer.render import (
    frame_render_get,
    frame_render_key,
    series_thumbnail_key,
    study_render,
)

pytestmark = pytest.mark.django_db

BUCKET = "relay-reads"
CREDENTIALS = {"access_key": "relay-test", "secret_key": "relay-test-secret"}
STUDY_UID = "1.2.826.0.1.3680043.8.498.1801"
CT_SERIES = "1.2.826.0.1.3680043.8.498.1802"
MR_SERIES = "1.2.826.0.1.3680043.8.498.1803"


@pytest.fixture
def s3(settings: Any, free_tcp_port: int) -> Iterator[Any]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_tcp_port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["access_key"],
        aws_secret_access_key=CREDENTIALS["secret_key"],
    )
    client.create_bucket(Bucket=BUCKET)
    # moto keeps its buckets in the process, not in the server: start every test from empty.
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    settings.STORAGES = {
        **settings.STORAGES,
        "default": s3_storage(
            bucket=BUCKET, endpoint_url=endpoint, region="us-east-1", sse="AES256", **CREDENTIALS
        ),
    }
    try:
        yield client
    finally:
        server.stop()


@contextmanager
def requests_made() -> Iterator[list[tuple[str, int]]]:
    """Every HTTP request the default storage's S3 client makes inside the block, as
    (operation, HTTP status), in order."""
    made: list[tuple[str, int]] = []

    def note(event_name: str, response_dict: Any = None, **_: Any) -> None:
        status = response_dict["status_code"] if response_dict else 0
        made.append((event_name.rsplit(".", 1)[-1], status))

    events = storages["default"].connection.meta.client.meta.events
    events.register("response-received.s3", note)
    try:
        yield made
    finally:
        events.unregister("response-received.s3", note)


def _store(bob: Any, name: str = "CT_small.dcm", **changes: Any) -> Instance:
    changes.setdefault("StudyInstanceUID", STUDY_UID)
    changes.setdefault("SeriesInstanceUID", CT_SERIES)
    response = upload(client_for(bob), dicom_bytes(name, **changes))
    assert response.status_code == 201, response.content
    return Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])


def _frame_url(instance: Instance, frame: int = 0) -> str:
    study = instance.series.study
    return f"/studies/{study.uuid}/view/frames/{instance.sop_instance_uid}/{frame}/"


def _thumbnail_url(series: Series) -> str:
    return f"/studies/{series.study.uuid}/view/thumbs/{series.series_instance_uid}/"


def test_the_storage_is_relays_own(s3):
    assert type(storages["default"]).__name__ == "AtomicS3Storage"


def test_a_rendered_frame_costs_one_get(s3, bob):
    instance = _store(bob)
    client = client_for(bob)
    assert client.get(_frame_url(instance)).status_code == 200  # rendered and stored now
    with requests_made() as made:
        response = client.get(_frame_url(instance))
    assert response.status_code == 200
    assert made == [("GetObject", 200)]
    # The answer still forbids any copy on disk: the browser's cache across requests is the
    # viewer's memory while the page is open, not its disk cache.
    assert "no-store" in response["Cache-Control"]
    assert "max-age" not in response["Cache-Control"]


def test_a_missing_render_costs_a_get_that_misses_then_the_render(s3, bob):
    instance = _store(bob)
    with requests_made() as made:
        response = client_for(bob).get(_frame_url(instance))
    assert response.status_code == 200
    assert made == [
        ("GetObject", 404),  # the render: not there yet
        ("GetObject", 200),  # the stored image, read once for decoding and its SHA-256 check
        ("HeadObject", 404),  # the render's name is free (file_overwrite is off)
        ("PutObject", 200),  # the render kept
    ]
    key = frame_render_key(storage_key=instance.storage_key, frame=0)
    stored = s3.head_object(Bucket=BUCKET, Key=key)
    assert stored["ServerSideEncryption"] == "AES256"


def test_a_thumbnail_costs_one_get(s3, bob):
    instance = _store(bob)
    series = instance.series
    assert study_render(series.study) == 2  # the frame and the thumbnail
    with requests_made() as made:
        response = client_for(bob).get(_thumbnail_url(series))
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert made == [("GetObject", 200)]
    assert (
        response.content
        == s3.get_object(Bucket=BUCKET, Key=series_thumbnail_key(series))["Body"].read()
    )
    assert "no-store" in response["Cache-Control"]


def test_a_frame_read_in_code_costs_one_get_and_a_missing_key_is_not_an_error(s3, bob):
    instance = _store(bob)
    first = frame_render_get(instance, 0)
    with requests_made() as made:
        assert frame_render_get(instance, 0) == first
    assert made == [("GetObject", 200)]
    storage = storages["default"]
    with requests_made() as made:
        assert storage.read_bytes("renders/nothing/here.rly") is None
    assert made == [("GetObject", 404)]


def test_a_stored_image_is_read_back_and_checked_with_one_get(s3, bob):
    instance = _store(bob)
    with requests_made() as made, integrity.instance_open(instance) as reader:
        data = reader.read()
    assert made == [("GetObject", 200)]
    assert reader.verified and len(data) == instance.size_bytes
    # A damaged object is still caught on the way out.
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=instance.storage_key, Body=bytes(damaged))
    with pytest.raises(integrity.IntegrityError), integrity.instance_open(instance) as reader:
        reader.read()
    # A missing one is FileNotFoundError, as from a folder, found with the same one GET.
    s3.delete_object(Bucket=BUCKET, Key=instance.storage_key)
    with requests_made() as made, pytest.raises(FileNotFoundError):
        integrity.instance_open(instance)
    assert made == [("GetObject", 404)]


def test_rendering_a_study_again_lists_each_series_once_instead_of_a_head_per_image(s3, bob):
    for _ in range(3):
        _store(bob)
    _store(bob, "emri_small.dcm", SeriesInstanceUID=MR_SERIES)
    study = Study.objects.get()
    assert study_render(study) == 3 + 10 + 2  # three CT frames, ten MR frames, two thumbnails
    with requests_made() as made:
        assert study_render(study) == 0
    # Per series: one listing of its renders' folder, then its thumbnail read back (it is
    # checked against the image it should show).
    assert made == [("ListObjectsV2", 200), ("GetObject", 200)] * 2
    # A render deleted meanwhile is seen missing in the listing and made again.
    ct = Instance.objects.filter(series__series_instance_uid=CT_SERIES).first()
    assert ct is not None
    s3.delete_object(Bucket=BUCKET, Key=frame_render_key(storage_key=ct.storage_key, frame=0))
    assert study_render(study) == 1


def test_the_folder_storage_reads_without_asking_first(tmp_path, monkeypatch):
    storage = AtomicFileSystemStorage(location=tmp_path)
    storage.save("renders/a/0.rly", _content(b"RLY1"))
    storage.save("renders/a/b/1.rly", _content(b"RLY1"))
    (tmp_path / "renders" / "a" / ".partial-xyz").write_bytes(b"half")

    def refuse(name: str) -> bool:
        raise AssertionError("exists() asked before a read")

    monkeypatch.setattr(storage, "exists", refuse)
    assert storage.read_bytes("renders/a/0.rly") == b"RLY1"
    assert storage.read_bytes("renders/a/1.rly") is None
    assert storage.read_bytes("renders/a") is None  # a folder is no object
    assert storage.names_under("renders/a") == {"renders/a/0.rly", "renders/a/b/1.rly"}
    assert storage.names_under("renders/none") == set()


def _content(data: bytes) -> Any:
    from django.core.files.base import ContentFile

    return ContentFile(data)
