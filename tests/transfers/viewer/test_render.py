"""Renders for the viewer (transfers.viewer.render and its Celery task): made from stored instances,
kept in storage, read back, made again when missing; thumbnails; a whole study at once."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pydicom
import pytest
from django.core.files.storage import storages
from django.db import transaction
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut

from tests.helpers import client_for, dicom_bytes, upload
from tests.transfers import test_s3_storage
from transfers.models import Instance, Series, Study
from transfers.viewer.render import (
    frame_render_get,
    frame_values,
    instance_render_keys,
    series_thumbnail_key,
    study_render,
    thumbnail_get,
)
from transfers.viewer.tasks import study_render_queue, study_render_task

bucket = test_s3_storage.bucket

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"


def _store(bob: Any, name: str, **changes: Any) -> Instance:
    changes.setdefault("StudyInstanceUID", STUDY_UID)
    response = upload(client_for(bob), dicom_bytes(name, **changes))
    assert response.status_code == 201, response.content
    return Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])


def _undecodable(bob: Any) -> Instance:
    garbage = b"\xff\x4f\xff\x51" + bytes(range(256)) * 8
    return _store(
        bob,
        "MR_small_jp2klossless.dcm",
        PixelData=encapsulate([garbage]),
        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.78",
    )


def test_it_renders_a_frame_in_hounsfield_units_and_stores_it(bob):
    instance = _store(bob, "CT_small.dcm")
    rendered = frame_render_get(instance, 0)
    meta = rendered.meta
    assert meta["error"] is None
    assert (meta["rows"], meta["columns"], meta["kind"], meta["dtype"]) == (
        128,
        128,
        "gray",
        "int16",
    )
    assert meta["units"] == "HU"
    assert meta["pixel_spacing"] == [0.661468, 0.661468]
    json.dumps(meta)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(frame_values(rendered), apply_modality_lut(ds.pixel_array, ds))
    (key,) = instance_render_keys(storage_key=instance.storage_key, number_of_frames=1)
    assert key.startswith("renders/") and key.endswith("/0.rly")
    assert storages["default"].exists(key)


def test_a_second_call_reads_the_same_bytes_from_storage(bob, monkeypatch):
    instance = _store(bob, "CT_small.dcm")
    first = frame_render_get(instance, 0)

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded again although the render is stored")

    monkeypatch.setattr("transfers.viewer.render.dataset_frame_decode", no_decoding)
    second = frame_render_get(instance, 0)
    assert second == first


def test_a_deleted_render_is_made_again(bob):
    instance = _store(bob, "CT_small.dcm")
    first = frame_render_get(instance, 0)
    (key,) = instance_render_keys(storage_key=instance.storage_key, number_of_frames=1)
    storage = storages["default"]
    storage.delete(key)
    assert frame_render_get(instance, 0) == first
    assert storage.exists(key)


def test_a_damaged_render_is_made_again_in_its_place(bob):
    instance = _store(bob, "CT_small.dcm")
    first = frame_render_get(instance, 0)
    (key,) = instance_render_keys(storage_key=instance.storage_key, number_of_frames=1)
    storage = storages["default"]
    storage.delete(key)
    storage.save(key, io.BytesIO(b"RLY1\x00\x00"))
    assert frame_render_get(instance, 0) == first
    with storage.open(key) as fp:
        assert fp.read().startswith(b"RLY1")
    _, names = storage.listdir(key.rsplit("/", 1)[0] + "/")
    assert names == ["0.rly"]


def test_each_frame_of_a_multiframe_image_is_its_own_render(bob):
    instance = _store(bob, "emri_small.dcm")
    assert instance.number_of_frames == 10
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    for frame in (0, 9):
        rendered = frame_render_get(instance, frame)
        np.testing.assert_array_equal(frame_values(rendered), ds.pixel_array[frame])
    with pytest.raises(ValueError):
        frame_render_get(instance, 10)


def test_an_undecodable_frame_gives_its_reason_and_a_placeholder(bob):
    instance = _undecodable(bob)
    rendered = frame_render_get(instance, 0)
    assert "JPEG 2000 decoder" in rendered.meta["error"]
    assert gzip.decompress(rendered.gz) == b""
    assert (rendered.meta["rows"], rendered.meta["columns"]) == (64, 64)
    # The failure is kept, so the next view does not decode again.
    assert frame_render_get(instance, 0) == rendered
    png = thumbnail_get(instance.series)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    # A grey square with light text on it.
    assert image.size == (128, 128)
    assert pixels.max() > 200 and np.median(pixels) == 64


def test_the_thumbnail_is_the_middle_image_at_most_128_px(bob):
    for number in (1, 2, 3):
        _store(bob, "MR_small.dcm", InstanceNumber=number)
    series = Series.objects.get()
    png = thumbnail_get(series)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert max(image.size) <= 128
        assert image.text["relay-source"].split(":")[1] == str(
            series.instances.get(instance_number=2).pk
        )
        pixels = np.asarray(image.convert("L")).astype(np.int16)
    # 64 x 64 stays as it is, in the file's window (center 600, width 1600).
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    expected = np.clip((stored - (600 - 800)) * 255 / 1600, 0, 255).astype(np.int16)
    assert np.abs(pixels - expected).max() <= 1
    assert storages["default"].exists(series_thumbnail_key(series))
    assert thumbnail_get(series) == png


def test_a_large_image_is_scaled_down_keeping_its_shape(bob):
    instance = _store(bob, "JPEG2000_UNC.dcm")  # 1024 x 256
    with Image.open(io.BytesIO(thumbnail_get(instance.series))) as image:
        assert image.size == (32, 128)


def test_a_colour_thumbnail_is_in_colour(bob):
    instance = _store(bob, "US1_J2KR.dcm")
    with Image.open(io.BytesIO(thumbnail_get(instance.series))) as image:
        assert image.mode == "RGB"
        assert max(image.size) == 128


def test_the_thumbnail_follows_a_series_that_grew(bob):
    _store(bob, "MR_small.dcm", InstanceNumber=1)
    series = Series.objects.get()
    first = thumbnail_get(series)
    _store(bob, "MR_small.dcm", InstanceNumber=2)
    _store(bob, "MR_small.dcm", InstanceNumber=3)
    second = thumbnail_get(series)
    with Image.open(io.BytesIO(second)) as image:
        assert image.text["relay-source"] != Image.open(io.BytesIO(first)).text["relay-source"]


def test_study_render_makes_everything_once(bob):
    _store(bob, "CT_small.dcm")
    _store(bob, "emri_small.dcm", SeriesInstanceUID="1.2.826.0.1.3680043.8.498.79")
    _undecodable(bob)
    study = Study.objects.get()
    # 1 + 10 + 1 frames, and three thumbnails.
    assert study_render(study) == 15
    storage = storages["default"]
    for instance in Instance.objects.all():
        for key in instance_render_keys(
            storage_key=instance.storage_key, number_of_frames=instance.number_of_frames
        ):
            assert storage.exists(key)
    for series in study.series.all():
        assert storage.exists(series_thumbnail_key(series))
    assert study_render(study) == 0


def test_the_task_renders_the_study_after_commit(bob, django_capture_on_commit_callbacks):
    _store(bob, "CT_small.dcm")
    study = Study.objects.get()
    instance = Instance.objects.get()
    (key,) = instance_render_keys(storage_key=instance.storage_key, number_of_frames=1)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with transaction.atomic():
            study_render_queue(study)
            # Not before the commit: the worker would not see the rows yet.
            assert not storages["default"].exists(key)
    assert len(callbacks) == 1
    assert storages["default"].exists(key)
    assert study_render_task.delay(study.pk).get() == 0
    assert study_render_task.delay(987654).get() == 0


def test_it_works_on_s3(bob, bucket):
    instance = _store(bob, "CT_small.dcm")
    first = frame_render_get(instance, 0)
    (key,) = instance_render_keys(storage_key=instance.storage_key, number_of_frames=1)
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="relay-images")["Contents"]}
    assert key in keys
    assert frame_render_get(instance, 0) == first
    bucket.delete_object(Bucket="relay-images", Key=key)
    assert frame_render_get(instance, 0) == first
    assert study_render(Study.objects.get()) == 1  # the thumbnail


def test_the_memory_cap_turns_a_huge_allocation_into_memory_error():
    script = textwrap.dedent(
        """
        import os
        import django
        import numpy
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "relay.settings")
        django.setup()
        from transfers.viewer.tasks import worker_memory_cap
        worker_memory_cap(1024 * 1024 * 1024)
        try:
            numpy.ones(2 * 1024 * 1024 * 1024, dtype=numpy.uint8)
        except MemoryError:
            print("MemoryError")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "MemoryError", done.stderr
