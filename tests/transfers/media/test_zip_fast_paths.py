"""What makes a ZIP download cheap: the disc viewer's frames made once and then copied, the ZIP
without the viewer for a PACS import (`?viewer=0`), 1 MiB reads, and the disc reading ahead; and
that the checks and the receipt stay as they were."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import numpy as np
import pydicom
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import Facility, User
from tests.helpers import client_for, upload
from transfers import integrity
from transfers.media import disc_viewer, export
from transfers.media.export import export_plan, zip_size, zip_stream
from transfers.models import Instance, Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

SIDE = 64


def _slice(number: int, *, study_uid: str, series_uid: str) -> bytes:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = SIDE
    ds.PixelData = np.random.default_rng(number).integers(0, 3000, (SIDE, SIDE), np.int16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(1, 5):
        data = _slice(number, study_uid=study_uid, series_uid=series_uid)
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get(study_instance_uid=study_uid)


def _no_reports(study: Study) -> list[Any]:
    return []


def _zip(study: Study) -> bytes:
    return b"".join(zip_stream(export_plan(studies=[study], reports_of=_no_reports)))


def _contents(data: bytes) -> dict[str, bytes]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    return {name: archive.read(name) for name in archive.namelist()}


def test_the_second_download_copies_the_viewer_frames_kept_by_the_first(study, monkeypatch):
    made: list[int] = []
    real_get = disc_viewer.frame_render_get

    def counting_get(instance: Instance, frame: int) -> Any:
        made.append(instance.pk)
        return real_get(instance, frame)

    monkeypatch.setattr(disc_viewer, "frame_render_get", counting_get)
    first = _zip(study)
    assert len(made) == 4  # each frame made from its render once

    renders_made: list[Study] = []
    monkeypatch.setattr(disc_viewer, "study_render", renders_made.append)
    second = _zip(study)
    # No render read, none made, no gunzip or base64: the kept frame files are copied, and the
    # ZIP holds the same files byte for byte (only the entries' times may differ).
    assert len(made) == 4 and renders_made == []
    assert _contents(second) == _contents(first)
    assert len([name for name in _contents(second) if "/DATA/" in name]) == 4


def test_a_damaged_kept_frame_is_made_again_not_sent(study):
    first = _zip(study)
    instance = Instance.objects.filter(series__study=study).order_by("instance_number").first()
    assert instance is not None
    key = disc_viewer.frame_cache_key(instance, 0)
    storage = storages["default"]
    assert storage.exists(key)
    storage.delete(key)
    storage.save(key, ContentFile(b'{"rows":64,"columns":64,"kind":"mono","enc'))  # cut short
    assert _contents(_zip(study)) == _contents(first)


def test_a_frame_kept_for_the_index_before_a_correction_is_not_used(study):
    _zip(study)
    instance = Instance.objects.filter(series__study=study).order_by("instance_number").first()
    assert instance is not None
    instance.rows = SIDE + 1  # the index no longer matches the file, nor the kept frame
    image = disc_viewer.ViewerImage(instance=instance, series_key="S0000001", frame=0, number=1)
    made = disc_viewer.frame_script(image)
    assert len(made) == disc_viewer.frame_file_size(SIDE + 1, SIDE)
    assert b'"error":"This image is not the size its index says"' in made


def test_stored_objects_are_read_in_1_mib_reads_and_still_checked(study, monkeypatch):
    _zip(study)  # the renders and the viewer's frames made (their decoding reads the images)
    asked: list[int] = []
    real_read = integrity.VerifyingReader.read

    def spy(self: integrity.VerifyingReader, n: int = -1) -> bytes:
        asked.append(n)
        return real_read(self, n)

    monkeypatch.setattr(integrity.VerifyingReader, "read", spy)
    _zip(study)
    # One read for each object and one that finds its end (and checks the digest); no small
    # reads, no read of the whole object at once.
    assert asked == [1024 * 1024] * 8

    instance = Instance.objects.filter(series__study=study).order_by("instance_number").last()
    assert instance is not None
    path = storages["default"].path(instance.storage_key)
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))  # same size, other bytes
    with pytest.raises(integrity.IntegrityError):
        _zip(study)


def test_the_disc_reads_ahead_each_stored_object_before_it_is_written(study, monkeypatch):
    advised: list[tuple[str, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    _zip(study)
    plan = export_plan(studies=[study], reports_of=_no_reports)
    paths = [storages["default"].path(f.storage_key) for f in plan.studies[0].instances]
    ahead = [path for path, advice in advised if advice == os.POSIX_FADV_WILLNEED]
    # Each object is advised when it is reached, and the next ones before they are.
    assert set(ahead) == set(paths)
    assert ahead.index(paths[1]) < ahead.index(paths[0]) + 3
    assert len(ahead) == len(paths) + export.PREFETCH * len(paths) - sum(
        range(1, export.PREFETCH + 1)
    )


def test_the_same_zip_without_the_viewer_for_a_pacs_import(
    client: Client, bob: User, gfc: Facility, dana: User, study: Study
) -> None:
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
    )
    assert isinstance(share, Share)
    response = client_for(dana).get(f"/studies/{study.uuid}/download/?viewer=0")
    assert response.status_code == 200
    assert not ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED).exists()
    body = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    assert int(response["Content-Length"]) == len(body)
    archive = zipfile.ZipFile(io.BytesIO(body))
    names = archive.namelist()
    assert "DICOMDIR" in names and sum(1 for n in names if "/IM" in n) == 4
    assert not any(n == "INDEX.HTM" or n.startswith("VIEWER/") for n in names)
    assert b"INDEX.HTM" not in archive.read("README.TXT")
    # Delivered once its last byte went out, as with the viewer.
    assert ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED).count() == 1

    with_viewer = client_for(dana).get(f"/studies/{study.uuid}/download/")
    again = b"".join(with_viewer.streaming_content)  # type: ignore[attr-defined]
    names = zipfile.ZipFile(io.BytesIO(again)).namelist()
    assert "INDEX.HTM" in names  # the default, for patients and guests


def test_the_size_is_known_before_any_frame_is_made(study, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a frame was made to know the size")

    monkeypatch.setattr(disc_viewer, "frame_script", refuse)
    plan = export_plan(studies=[study], reports_of=_no_reports)
    assert zip_size(plan) is not None
