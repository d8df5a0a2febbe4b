"""WADO-RS rendered and thumbnail resources, as a client sees them: dicomweb-client fetches a PNG
whose pixels are the viewer's (or pydicom's windowing of the same values, when a window is
asked for), sized to the viewport; JPEG when nothing else is asked; 406 for a type Relay does
not render, 400 with the reason for a bad parameter, 404 for a frame past the end or a study
the asker may not see; a view-only share renders and is metered once."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from django.core.files.storage import storages
from django.test import Client
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing

from billing.models import UsageRecord
from portal.models import ApiToken, AuditEvent, Facility, TokenAccess, User
from tests.helpers import client_for
from transfers.models import Instance, Series
from transfers.sharing.services import share_create
from transfers.viewer.render import thumbnail_get

from .conftest import UploadedStudy, bearer, study_upload

CT = "CT_small.dcm"  # 128 x 128, no window in the file: the viewer takes one from the data
MR = "MR_small_jp2klossless.dcm"  # 64 x 64, JPEG 2000, window 600/1600 in the file
RGB = "SC_rgb_rle_2frame.dcm"  # 100 x 100, RLE, two frames


def _png(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def _close(got: np.ndarray, want: np.ndarray, tolerance: int = 1) -> None:
    assert got.shape == want.shape
    assert int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()) <= tolerance


def _pydicom_8bit(name: str, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's windowing of the file's modality values, scaled to 0-255 from its output range."""
    ds = pydicom.dcmread(str(get_testdata_file(name)))
    values = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    windowed = apply_windowing(values, ds)
    low = -(2 ** (ds.BitsStored - 1)) if ds.PixelRepresentation else 0
    high = low + 2**ds.BitsStored - 1
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    y_min, y_max = low * slope + intercept, high * slope + intercept
    return np.clip((windowed - y_min) / (y_max - y_min) * 255, 0, 255)


def _instance(study: UploadedStudy, name: str) -> str:
    return (
        f"/dicom-web/studies/{study.uid}/series/{study.series_of(name)}"
        f"/instances/{study.sop_of(name)}"
    )


# --- through dicomweb-client, against the running server --------------------------------------


@pytest.fixture
def live(live_server: Any, read_token: str) -> Iterator[tuple[DICOMwebClient, str]]:
    client = DICOMwebClient(
        f"{live_server.url}/dicom-web", headers={"Authorization": f"Bearer {read_token}"}
    )
    yield client, live_server.url
    client._session.close()


@pytest.mark.django_db(transaction=True)
def test_dicomweb_client_gets_the_viewers_pixels_as_png_and_jpeg_by_default(
    live: tuple[DICOMwebClient, str], client: Client, bob: User, bob_token: str, read_token: str
) -> None:
    dicomweb, url = live
    study = study_upload(client, bob_token)
    ids = (study.uid, study.series_of(CT), study.sop_of(CT))

    png = dicomweb.retrieve_instance_rendered(*ids, media_types=("image/png",))
    # The viewer's own frame of the same image, windowed as its page does by default.
    viewer = client_for(bob).get(f"/studies/{study.study.uuid}/view/frames/{study.sop_of(CT)}/0/")
    meta = json.loads(viewer["X-Relay-Frame"])
    values = np.frombuffer(gzip.decompress(viewer.content), dtype=meta["dtype"]).reshape(128, 128)
    low = meta["window_center"] - meta["window_width"] / 2
    want = np.clip((values - low) * 255 / meta["window_width"], 0, 255)
    _close(_png(png), want)

    # The file's own window (MR): pydicom's linear-exact windowing of the same values.
    mr = _png(
        dicomweb.retrieve_instance_rendered(
            study.uid, study.series_of(MR), study.sop_of(MR), media_types=("image/png",)
        )
    )
    _close(mr, _pydicom_8bit(MR, 600, 1600, "LINEAR_EXACT"))

    # A window and a viewport asked for: the standard's linear function, fitted in 50 x 30.
    asked = dicomweb.retrieve_instance_rendered(
        *ids, media_types=("image/png",), params={"window": "40,400,linear"}
    )
    _close(_png(asked), _pydicom_8bit(CT, 40, 400, "LINEAR"))
    small = dicomweb.retrieve_instance_rendered(
        *ids, media_types=("image/png",), params={"viewport": "50,30"}
    )
    assert _png(small).shape == (30, 30)

    # Nothing asked: a JPEG; its quality is the client's to choose.
    default = dicomweb.retrieve_instance_rendered(*ids)
    assert default[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(default)) as image:
        assert (image.format, image.size) == ("JPEG", (128, 128))
    rough = dicomweb.retrieve_instance_rendered(
        *ids, media_types=("image/jpeg",), params={"quality": 5}
    )
    assert rough[:3] == b"\xff\xd8\xff" and len(rough) < len(default)

    # A frame of a multi-frame colour image, lossless: pydicom's second frame, exactly.
    frame = dicomweb.retrieve_instance_frames_rendered(
        study.uid, study.series_of(RGB), study.sop_of(RGB), [2], media_types=("image/png",)
    )
    source = pydicom.dcmread(str(get_testdata_file(RGB)))
    assert np.array_equal(_png(frame), source.pixel_array[1])

    # Thumbnails (dicomweb-client has no call for them): the viewer's, at every level.
    headers = {"Authorization": f"Bearer {read_token}", "Accept": "image/png"}
    series_url = f"{url}/dicom-web/studies/{study.uid}/series/{study.series_of(CT)}"
    series_thumb = requests.get(series_url + "/thumbnail", headers=headers, timeout=20)
    assert series_thumb.headers["Content-Type"] == "image/png"
    ct_series = Series.objects.get(series_instance_uid=study.series_of(CT))
    assert series_thumb.content == thumbnail_get(ct_series)
    study_thumb = requests.get(
        f"{url}/dicom-web/studies/{study.uid}/thumbnail", headers=headers, timeout=20
    )
    # The study's: its first series' (CT is series 1).
    assert study_thumb.content == series_thumb.content
    instance_thumb = requests.get(
        f"{url}{_instance(study, CT)}/thumbnail", headers=headers, timeout=20
    )
    _close(_png(instance_thumb.content), _png(series_thumb.content))
    jpeg_thumb = requests.get(
        series_url + "/thumbnail",
        headers={"Authorization": f"Bearer {read_token}"},
        params={"viewport": "64,64"},
        timeout=20,
    )
    with Image.open(io.BytesIO(jpeg_thumb.content)) as image:
        assert (image.format, image.size) == ("JPEG", (64, 64))

    # What Relay does not render is 406, through the client too.
    with pytest.raises(requests.HTTPError) as refused:
        dicomweb.retrieve_instance_rendered(*ids, media_types=("image/gif",))
    assert refused.value.response is not None
    assert refused.value.response.status_code == 406


# --- details, through Django's test client -----------------------------------------------------


@pytest.fixture
def study(client: Client, bob_token: str) -> UploadedStudy:
    return study_upload(client, bob_token, sources=((CT, 1), (RGB, 2)))


@pytest.mark.django_db
def test_window_functions_are_the_standards(
    client: Client, study: UploadedStudy, read_token: str
) -> None:
    for function, name in (("linear-exact", "LINEAR_EXACT"), ("sigmoid", "SIGMOID")):
        answer = client.get(
            _instance(study, CT) + "/rendered",
            {"window": f"100,300,{function}"},
            HTTP_ACCEPT="image/png",
            **bearer(read_token),
        )
        assert answer.status_code == 200, answer.content
        _close(_png(answer.content), _pydicom_8bit(CT, 100, 300, name))


@pytest.mark.django_db
def test_bad_parameters_are_400_with_the_reason(
    client: Client, study: UploadedStudy, read_token: str
) -> None:
    rendered = _instance(study, CT) + "/rendered"
    for params, reason in (
        ({"viewport": "0,0"}, "viewport width and height are 1 to 4096"),
        ({"viewport": "5000,10"}, "1 to 4096"),
        ({"viewport": "abc"}, "two whole numbers"),
        ({"viewport": "10,10,0,0,5,5"}, "source regions"),
        ({"window": "abc"}, "center,width,function"),
        ({"window": "abc,400,linear"}, "not one"),
        ({"window": "40,0,linear"}, "at least 1"),
        ({"window": "40,400,gamma"}, "linear, linear-exact, sigmoid"),
        ({"quality": "0"}, "1 to 100"),
        ({"quality": "high"}, "1 to 100"),
    ):
        answer = client.get(rendered, params, **bearer(read_token))
        assert answer.status_code == 400, params
        assert reason in answer.content.decode(), (params, answer.content)
    several = client.get(_instance(study, RGB) + "/frames/1,2/rendered", **bearer(read_token))
    assert several.status_code == 400
    unreadable = client.get(rendered, HTTP_ACCEPT="image", **bearer(read_token))
    assert unreadable.status_code == 400


@pytest.mark.django_db
def test_accept_picks_jpeg_or_png_and_refuses_the_rest(
    client: Client, study: UploadedStudy, read_token: str
) -> None:
    rendered = _instance(study, CT) + "/rendered"
    for accept, media in (
        ("*/*", "image/jpeg"),
        ("image/*", "image/jpeg"),
        ("image/gif, image/png;q=0.5", "image/png"),
        ("image/jpeg;q=0.1, image/png", "image/png"),
    ):
        answer = client.get(rendered, HTTP_ACCEPT=accept, **bearer(read_token))
        assert (answer.status_code, answer["Content-Type"]) == (200, media), accept
    for accept in ("image/gif", "application/dicom", "multipart/related; type=image/jpeg"):
        answer = client.get(rendered, HTTP_ACCEPT=accept, **bearer(read_token))
        assert answer.status_code == 406, accept
        assert "image/jpeg or image/png" in answer.content.decode()


@pytest.mark.django_db
def test_frames_past_the_end_and_unknown_images_are_404(
    client: Client, study: UploadedStudy, read_token: str
) -> None:
    for url in (
        _instance(study, RGB) + "/frames/3/rendered",
        _instance(study, RGB) + "/frames/3/thumbnail",
        _instance(study, CT) + "/frames/2/rendered",
        f"/dicom-web/studies/{study.uid}/series/{study.series_of(CT)}/instances/1.2.3/rendered",
        f"/dicom-web/studies/{study.uid}/series/1.2.3/thumbnail",
    ):
        assert client.get(url, **bearer(read_token)).status_code == 404, url
    second = client.get(
        _instance(study, RGB) + "/frames/2/thumbnail", HTTP_ACCEPT="image/png", **bearer(read_token)
    )
    assert second.status_code == 200
    source = pydicom.dcmread(str(get_testdata_file(RGB))).pixel_array[1]
    # Fits the viewer's thumbnail box (the image is 100 x 100: kept as it is).
    assert np.array_equal(_png(second.content), source)
    # A multi-frame instance's thumbnail is its middle frame, as the viewer's.
    middle = client.get(
        _instance(study, RGB) + "/thumbnail", HTTP_ACCEPT="image/png", **bearer(read_token)
    )
    assert middle.content == second.content


def _all_urls(study: UploadedStudy) -> list[str]:
    series = f"/dicom-web/studies/{study.uid}/series/{study.series_of(CT)}"
    instance = _instance(study, CT)
    return [
        f"/dicom-web/studies/{study.uid}/thumbnail",
        series + "/thumbnail",
        instance + "/rendered",
        instance + "/thumbnail",
        instance + "/frames/1/rendered",
        instance + "/frames/1/thumbnail",
    ]


@pytest.mark.django_db
def test_an_outsider_gets_404_audited_and_nothing_rendered(
    client: Client, study: UploadedStudy, charlie: User
) -> None:
    token = ApiToken.issue(user=charlie, name="dw", access=TokenAccess.READ)[1]
    for url in _all_urls(study):
        assert client.get(url, **bearer(token)).status_code == 404, url
        assert client_for(charlie).get(url).status_code == 404, url
        assert client.get(url).status_code == 401, url
    refused = AuditEvent.objects.filter(action="access_denied", actor=charlie)
    assert refused.filter(study_instance_uid=study.uid).count() == 12
    assert not UsageRecord.objects.exists()


@pytest.mark.django_db
def test_a_view_only_share_renders_and_is_metered_once(
    client: Client, study: UploadedStudy, bob: User, gfc: Facility, dana: User
) -> None:
    share_create(
        facility=study.study.facility,
        created_by=bob,
        studies=[study.study],
        kind="facility",
        recipient_facility=gfc,
        can_download=False,
    )
    headers = bearer(ApiToken.issue(user=dana, name="dw", access=TokenAccess.READ)[1])
    rendered = _instance(study, CT) + "/rendered"
    for _ in range(2):  # fetched again: still one delivery
        answer = client.get(rendered, HTTP_ACCEPT="image/png", **headers)
        assert answer.status_code == 200
    for url in _all_urls(study):
        assert client.get(url, **headers).status_code == 200, url
    # The rendered image is one image delivered; thumbnails deliver bytes, not images.
    usage = UsageRecord.objects.filter(kind="dicomweb")
    assert sum(usage.values_list("images", flat=True)) == 1
    # Like frames: not a copy, and no audit event per image.
    assert not AuditEvent.objects.filter(action="study_download", actor=dana).exists()
    assert not AuditEvent.objects.filter(action="access_denied", actor=dana).exists()


def _damage(sop: str) -> None:
    instance = Instance.objects.get(sop_instance_uid=sop)
    storage = storages["default"]
    with storage.open(instance.storage_key) as f:
        data = bytearray(f.read())
    data[-10] ^= 0xFF
    storage.delete(instance.storage_key)
    storage.save(instance.storage_key, io.BytesIO(bytes(data)))


@pytest.mark.django_db
def test_a_damaged_or_missing_copy_is_500_recorded_and_never_rendered(
    client: Client, study: UploadedStudy, read_token: str
) -> None:
    _damage(study.sop_of(CT))
    damaged = client.get(_instance(study, CT) + "/rendered", **bearer(read_token))
    assert damaged.status_code == 500
    assert "damaged" in damaged.content.decode()
    failed = AuditEvent.objects.filter(action="integrity_failed")
    assert {e.detail["sop_instance_uid"] for e in failed} == {study.sop_of(CT)}
    rgb = Instance.objects.get(sop_instance_uid=study.sop_of(RGB))
    storages["default"].delete(rgb.storage_key)
    missing = client.get(_instance(study, RGB) + "/frames/2/rendered", **bearer(read_token))
    assert missing.status_code == 500
    assert failed.filter(detail__sop_instance_uid=rgb.sop_instance_uid).exists()
