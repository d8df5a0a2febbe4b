"""Helpers for tests: DICOM files to upload, clients, peers."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import User

PASSWORD = "correct horse battery staple 42"


def require_peer(program: str) -> str:
    """The path of an external program the test needs. Missing: fail in CI, skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        reason = f"{program} is not installed (Debian package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def read_testdata(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def dicom_bytes(name: str = "CT_small.dcm", **changes: Any) -> bytes:
    """A pydicom test file, re-saved with the given attribute changes (new UIDs by default)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = changes.pop("SOPInstanceUID", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(
    client: Client,
    data: bytes,
    *,
    facility: str = "krmc",
    token: str | None = None,
    filename: str = "x.dcm",
) -> Any:
    headers = {"HTTP_X_FILENAME": filename}
    if token:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client.post(
        f"/api/v1/instances?facility={facility}",
        data=data,
        content_type="application/dicom",
        **headers,
    )
