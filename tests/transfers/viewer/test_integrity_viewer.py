"""The viewer's source read checks the stored image: a damaged one renders as an error, keeps no
render, is audited and tells staff; put back, it renders again."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import storages

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Instance
from transfers.viewer.render import frame_render_get, frame_render_key

pytestmark = pytest.mark.django_db


def test_a_damaged_image_renders_as_an_error_and_is_audited(
    bob: User, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    User.objects.create_user(email="ops@relay.example", password="x", is_staff=True)
    assert upload(client_for(bob), dicom_bytes("CT_small.dcm")).status_code == 201
    instance = Instance.objects.get()
    storage = storages["default"]
    with storage.open(instance.storage_key, "rb") as f:
        good = f.read()
    bad = bytearray(good)
    bad[-100] ^= 0x01
    storage.delete(instance.storage_key)
    storage.save(instance.storage_key, ContentFile(bytes(bad)))

    with django_capture_on_commit_callbacks(execute=True):
        rendered = frame_render_get(instance, 0)
    assert rendered.meta["error"] == "The stored image is damaged"
    assert not storage.exists(frame_render_key(storage_key=instance.storage_key, frame=0))
    event = AuditEvent.objects.get(action=AuditAction.INTEGRITY_FAILED)
    assert event.detail["where"] == "viewer" and event.detail["key"] == instance.storage_key
    (mail,) = mailoutbox
    assert mail.to == ["ops@relay.example"] and f"instance #{instance.pk}" in mail.body

    storage.delete(instance.storage_key)
    storage.save(instance.storage_key, ContentFile(good))
    assert frame_render_get(instance, 0).meta.get("error") in (None, "")
    assert storage.exists(frame_render_key(storage_key=instance.storage_key, frame=0))
